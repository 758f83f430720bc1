"""VideoSession: pre-fill one video once, then answer any number of questions from its memory.

The video streams through the pipeline batch by batch (decode -> SigLIP -> DTS -> projector -> LLM), so
frames and visual features exist only for the batch in flight; what grows with the video is the KV store.
The prefix and video never depend on the question (attention is causal), so each question only runs its
own suffix on top of the stored KV.

A session can also start from a memory already made (`from_video_memory`, or a file: `from_memory`): it
answers like the session that pre-filled it, without the video. Such a session knows its groups' times, and
its frames' only when the memory recorded them (`save_memory` does).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import Cancelled, InputError, MediaNotFoundError
from ..generation import GenerationSettings, decode_answer
from ..prompt import IMAGE_MARKER, TokenLayout, build_prompt, check_clip_start, video_layout
from ..video import (
    expand_to_square,
    iter_frame_batches,
    load_image,
    plan_sampling,
    preprocess_frames,
    probe_video,
)
from ..video.decode import ReadStats
from ..video.pipeline import Prefetcher
from .budget import TokenCounts, check_fits, estimate
from .decode import answer_from_cache
from .memory import VideoMemory, dtype_name, identity_mismatch, memory_header
from .prefill import StreamingPrefill
from .runner import LayerRunner
from .select import choose_units, score_units
from .settings import EngineSettings

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
FRAME_BATCH = 16  # frames decoded and encoded at a time: one pre-fill block, so the model starts (and the
# reader finishes) one small batch apart, which is what lets the two overlap (measured: benchmarks/ingest.py)
PREFETCH_BATCHES = 2  # frame batches the reader thread may hold ready ahead of the model


def _check(cancel) -> None:
    if cancel is not None and (cancel() if callable(cancel) else cancel.is_set()):
        raise Cancelled("pre-fill cancelled")


class StageClock:
    """Seconds per stage. On CUDA the work is asynchronous, so stages are timed with CUDA events read once
    at the end (a clock read after each stage would need a device sync)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds: dict[str, float] = {}
        self.events: list[tuple[str, object, object]] = []

    @contextmanager
    def __call__(self, key: str):
        if self.cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            yield
            end.record()
            self.events.append((key, begin, end))
        else:
            start = time.perf_counter()
            yield
            self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start

    def totals(self) -> dict[str, float]:
        if self.events:
            torch.cuda.synchronize()
            for key, begin, end in self.events:
                self.seconds[key] = self.seconds.get(key, 0.0) + begin.elapsed_time(end) / 1000
            self.events.clear()
        return dict(self.seconds)


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    stats: dict = field(default_factory=dict)


class VideoSession:
    """One video (or image) in memory; `ask` answers questions about it."""

    def __init__(
        self,
        model,
        tokenizer,
        frame_batches: Callable[[int], Iterator[np.ndarray]],
        timestamps: Sequence[float],
        settings: EngineSettings | None = None,
        source: str = "<frames>",
        progress: bool | None = None,
        memory_budget: int | None = None,
    ):
        """`memory_budget`: bytes this session may use beyond the loaded weights (default: what the model's
        device has free); a session whose estimated peak is over it fails here, before any frame is decoded,
        naming how many frames would fit (`MemoryBudgetError`)."""
        if not timestamps:
            raise InputError(f"{source}: no frames were sampled")
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings or EngineSettings.from_config(model.config)
        self.source = source
        self.timestamps = [float(t) for t in timestamps]
        self.progress = progress
        self._frame_batches = frame_batches
        config = model.config
        per_group = config.frames_per_group
        self.group_seconds = self.timestamps[::per_group]
        self.layout: TokenLayout = video_layout(tokenizer, config, self.group_seconds)
        if self.layout.length >= config.context_limit:
            raise InputError(
                f"{source}: {len(self.timestamps)} frames make {self.layout.length} tokens, over the model's "
                f"context of {config.context_limit}: lower max_num_frames"
            )
        self.memory_estimate = check_fits(
            config,
            self.layout,
            self.settings,
            self.dtype,
            self.frames_per_batch(),
            self.device,
            memory_budget,
            frames=len(self.timestamps),
        )
        self.read_stats: ReadStats | None = None
        self._clock = StageClock(torch.device("cpu"))
        self.memory: VideoMemory | None = None
        self.runner = None
        self.stats: dict = {"frames": len(self.timestamps), "groups": len(self.group_seconds)}

    # -- construction ----------------------------------------------------------------------------------
    @classmethod
    def from_path(
        cls,
        model,
        tokenizer,
        path,
        max_num_frames: int = 512,
        sample_fps: float | None = 1.0,
        max_sample_fps: float | None = None,
        settings: EngineSettings | None = None,
        progress: bool | None = None,
        remainder: str = "pad",
        decode_threads: int | None = None,
        decode_workers: int = 1,
        memory_budget: int | None = None,
        clip_start: float = 0.0,
    ) -> VideoSession:
        """A video file (sampled as the release does) or an image file (4 identical frames).

        `remainder`: a sampled frame count that is not a multiple of 4 is padded by the model with copies
        of the last frame ("pad", the default), or cut to whole groups of 4 ("drop", as the release's plain
        evaluation did; `videoxl2 eval --protocol release` asks for it). An image is never cut.
        `decode_threads`: FFmpeg decoding threads (None: FFmpeg's choice); `decode_workers`: processes
        decoding keyframe-delimited stretches in parallel (1: in this process); the frames are the same.
        `clip_start`: seconds added to every timestamp, so a clip cut from a longer video is told its
        source's times (as training's `clip_start` does); an image has no time and ignores it.
        """
        path = Path(path)
        if not path.is_file():
            raise MediaNotFoundError(f"{path}: no such file")
        clip_start = check_clip_start(clip_start, str(path))
        if path.suffix.lower() in IMAGE_SUFFIXES:
            image = expand_to_square(load_image(path))
            return cls(
                model, tokenizer, lambda size: iter([image[None]]), [0.0], settings, str(path), progress
            )
        info = probe_video(path)
        plan = plan_sampling(
            info.num_frames, info.avg_fps, max_num_frames, sample_fps, max_sample_fps, remainder=remainder
        )
        read_stats = ReadStats()
        batches = lambda size: iter_frame_batches(  # noqa: E731
            path, plan.indices, size, threads=decode_threads, workers=decode_workers, stats=read_stats
        )
        timestamps = [t + clip_start for t in plan.timestamps]
        session = cls(model, tokenizer, batches, timestamps, settings, str(path), progress, memory_budget)
        session.read_stats = read_stats
        session.stats["sampled_indices"] = list(plan.indices)
        session.stats["video_fps"] = info.avg_fps
        return session

    @classmethod
    def from_frames(
        cls, model, tokenizer, frames: np.ndarray, timestamps: Sequence[float], **kwargs
    ) -> VideoSession:
        """Decoded RGB frames (F, H, W, 3) uint8 already in memory, with their timestamps."""
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) != len(timestamps):
            raise InputError(f"frames must be (F, H, W, 3) with one timestamp each, got {frames.shape}")
        batches = lambda size: (frames[i : i + size] for i in range(0, len(frames), size))  # noqa: E731
        return cls(model, tokenizer, batches, timestamps, **kwargs)

    @classmethod
    def from_video_memory(
        cls,
        model,
        tokenizer,
        memory: VideoMemory,
        settings: EngineSettings | None = None,
        source: str = "<memory>",
        stats: dict | None = None,
        timestamps: Sequence[float] | None = None,
    ) -> VideoSession:
        """A session answering from `memory` (already pre-filled, e.g. by a live session or read from a
        file); nothing is decoded or pre-filled again. `settings` (default: the checkpoint's, with the
        memory's unit_size, compression and kv_dtype) must agree with what the memory fixes; `stats` seed
        the answers' stats; `timestamps` are the frame times if known (else `timestamps` is None and
        `group_seconds` holds the groups' times, which the memory always knows)."""
        config = model.config
        layout = memory.layout
        held = dict(unit_size=memory.unit_size, compression=memory.compression, kv_dtype=memory.kv_dtype)
        if settings is None:
            settings = EngineSettings.from_config(config).with_overrides(**held)
        wrong = [
            f"{k} {getattr(settings, k)!r} (the memory: {v!r})"
            for k, v in held.items()
            if getattr(settings, k) != v
        ]
        if wrong:
            raise InputError(f"{source}: settings the memory cannot honour: {', '.join(wrong)}")
        _check_geometry(memory, config, source)
        session = cls.__new__(cls)
        session.model, session.tokenizer, session.settings = model, tokenizer, settings
        session.source, session.progress, session._frame_batches = source, False, None
        session.timestamps = None if timestamps is None else [float(t) for t in timestamps]
        session.group_seconds = [g.seconds for g in layout.groups]
        session.layout = layout
        session.read_stats = None
        session._clock = StageClock(torch.device("cpu"))
        session.runner = LayerRunner(model)
        memory.check_model(session.runner)
        if settings.offload and session.device.type != "cpu":
            memory.to("cpu")
        session.memory = memory
        frames = len(session.timestamps) if session.timestamps is not None else None
        options = {"kv_dtype": "int8"} if memory.int8 else {}
        session.memory_estimate = estimate(
            config,
            TokenCounts.from_layout(layout, frames),
            settings,
            session.dtype,
            session.frames_per_batch(),
            include_weights=False,
            **options,
        )
        session.stats = dict(
            frames=frames,
            groups=layout.num_groups,
            video_tokens=layout.video_end,
            dense_kv_bytes=memory.dense_bytes(),
            sparse_kv_bytes=memory.sparse_size_bytes(),
        )
        session.stats.update(stats or {})
        return session

    @classmethod
    def from_memory(
        cls, model, tokenizer, path, settings: EngineSettings | dict | None = None
    ) -> VideoSession:
        """Reopen a memory file (`save_memory`, `VideoMemory.save`) and answer from it without the video.

        A memory that records another model (architecture, weights fingerprint or weight quantization) is
        refused in one line (`InputError`). `settings` (default: those the memory records) may change what is
        decided per question — on a chunked memory the mode (chunked or dense: the full KV; bilevel), and
        `topk`, `rerotate`, `offload` — as an `EngineSettings` or a dict of the fields to change; pre-fill
        settings other than the memory's are refused. A float memory made in another compute dtype than the
        model's is converted (answers then differ by that rounding); an int8 memory serves any dtype.

        A file written without a record of its origin (before memories recorded one) is taken to come from
        this model, pre-filled with `settings` (default: the checkpoint's) and the file's own unit_size,
        compression and kv_dtype; `stats["memory_origin"]` says "unrecorded" then."""
        path = Path(path)
        if not path.is_file():
            raise MediaNotFoundError(f"{path}: no such memory file")
        header = memory_header(path)
        if header is None:
            raise InputError(f"{path}: not a videoxl2 memory file")
        recorded = header.get("model")
        if recorded is not None:
            why = identity_mismatch(recorded, model)
            if why is not None:
                raise InputError(
                    f"{path}: made by another model ({why}): reopen it with the model that wrote it"
                )
        try:
            settings = reopen_settings(path, header, model, settings)
        except (KeyError, TypeError, ValueError) as err:
            if isinstance(err, InputError) and str(err).startswith(str(path)):
                raise
            raise InputError(f"{path}: unreadable memory header ({err!r})") from err
        device = "cpu" if settings.offload else model.get_input_embeddings().weight.device
        dtype = model.get_input_embeddings().weight.dtype
        start = time.perf_counter()
        memory, _ = VideoMemory.load(path, device=device, dtype=None if header.get("kv_dtype") else dtype)
        stats = dict(
            memory_file=str(path),
            memory_load_s=time.perf_counter() - start,
            memory_origin="recorded" if recorded is not None else "unrecorded",
        )
        made_in = header.get("compute_dtype")
        if made_in is not None and made_in != dtype_name(dtype):
            stats["memory_compute_dtype"] = made_in
        return cls.from_video_memory(
            model,
            tokenizer,
            memory,
            settings,
            source=header.get("source") or str(path),
            stats=stats,
            timestamps=header.get("timestamps"),
        )

    def save_memory(self, path, metadata: dict | None = None) -> Path:
        """Pre-fill if not done yet, then write the memory with what reopening it needs (the model's
        identity, these settings, the frame times, the source): `from_memory` answers from the file as this
        session does. A bi-level session that has answered saves its sparse KV too."""
        memory = self.prefill()
        return memory.save(
            path,
            metadata,
            model=self.model,
            settings=self.settings,
            timestamps=self.timestamps,
            source=self.source,
        )

    # -- pre-fill -----------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    def frames_per_batch(self) -> int:
        """Frames decoded and encoded at a time: a whole number of pre-fill blocks."""
        block = self.model.config.frames_per_group * self.settings.block_size
        return max(1, FRAME_BATCH // block) * block

    def _pixel_batches(self) -> Iterator[tuple[int, torch.Tensor]]:
        """Decoded and preprocessed frame batches: the reader thread's share of the work."""
        size = self.model.config.vision_config.image_size
        pin = self.device.type == "cuda"  # pinned pages let the copy to the GPU run asynchronously
        for batch in self._frame_batches(self.frames_per_batch()):
            pixels = preprocess_frames(batch, image_size=size)
            yield len(batch), (pixels.pin_memory() if pin else pixels)

    def iter_group_embeddings(self, cancel=None) -> Iterator[torch.Tensor]:
        """Visual embeddings batch by batch (vision -> DTS -> projector), while a background thread decodes
        and preprocesses the next batches (at most `PREFETCH_BATCHES` ahead). Closing this iterator stops
        the reader thread."""
        model = self.model
        dtype = model.get_input_embeddings().weight.dtype
        groups = frames_seen = 0
        with Prefetcher(self._pixel_batches, depth=PREFETCH_BATCHES) as reader:
            try:
                for count, pixels in reader:
                    _check(cancel)
                    with self._clock("vision_s"):
                        embeds = model.encode_video(pixels.to(self.device, dtype, non_blocking=True))
                    frames_seen += count
                    groups += embeds.shape[0]
                    yield embeds
            finally:
                self.stats["decode_s"] = reader.busy_s
                self.stats["decode_wait_s"] = reader.wait_s
        if groups != self.layout.num_groups:
            raise InputError(
                f"{self.source}: decoded {frames_seen} frames, expected {len(self.timestamps)} "
                "(the file may be truncated)"
            )

    @torch.inference_mode()
    def prefill(self, cancel=None) -> VideoMemory:
        """Stream the video into a VideoMemory (once; later calls return it).

        `cancel`: a `threading.Event` (or a callable returning True) checked between frame batches and
        between pre-fill blocks; once set, `Cancelled` is raised, the reader stops and nothing is kept."""
        if self.memory is not None:
            return self.memory
        settings = self.settings
        self._clock = StageClock(self.device)
        started = time.perf_counter()
        bar = tqdm(total=self.layout.num_groups, desc="prefill", unit="group", disable=self._quiet())
        prefill = StreamingPrefill(
            self.model,
            self.layout,
            settings.mode != "dense",
            settings.block_size,
            settings.prev_blocks,
            kv_dtype=settings.kv_dtype,
        )
        prefill.run_prefix()
        embeddings = self.iter_group_embeddings(cancel)
        try:
            for embeds in embeddings:
                for offset in range(0, embeds.shape[0], settings.block_size):
                    _check(cancel)
                    with self._clock("prefill_s"):
                        prefill.add_groups(embeds[offset : offset + settings.block_size])
                bar.update(embeds.shape[0])
        finally:
            embeddings.close()
            bar.close()
        self.stats.update(self._clock.totals())
        self._report_overlap(time.perf_counter() - started)
        self.runner = prefill.runner
        self.memory = VideoMemory.from_store(
            prefill.store, self.layout, prefill.runner, settings.unit_size, settings.compression
        )
        if settings.offload and self.memory.device.type != "cpu":
            self.memory.to("cpu")
        actual, dense = prefill.stats.flops(prefill.runner)
        self.stats.update(
            video_tokens=self.layout.video_end,
            prefill_attention_flops=actual,
            dense_attention_flops=dense,
            dense_kv_bytes=self.memory.dense_bytes(),
            sparse_kv_bytes=self.memory.sparse_size_bytes(),
        )
        return self.memory

    def _report_overlap(self, wall: float) -> None:
        """Reading vs model time: `overlap_s` is how much of the two ran at the same time."""
        stats = self.stats
        model_s = stats.get("vision_s", 0.0) + stats.get("prefill_s", 0.0)
        stats["ingest_wall_s"] = wall
        stats["overlap_s"] = max(0.0, stats.get("decode_s", 0.0) + model_s - wall)
        if self.read_stats is not None:
            stats["read"] = self.read_stats.as_dict()

    def _quiet(self) -> bool | None:
        return None if self.progress is None else not self.progress

    # -- questions -------------------------------------------------------------------------------------
    def question_ids(self, question: str, history=None) -> torch.Tensor:
        """Token ids of the text after the video: question, earlier turns, and the assistant header."""
        suffix_text = build_prompt(question, history).split(IMAGE_MARKER, 1)[1]
        return torch.tensor(
            self.tokenizer(suffix_text, add_special_tokens=False)["input_ids"], dtype=torch.long
        )

    @torch.inference_mode()
    def ask(
        self, question: str, history=None, generation_config: dict | None = None, units=None, on_token=None
    ) -> Answer:
        """Answer one question (after `history` turns) from the stored video; the memory is not changed.

        `units`: an external selection of dense units (bilevel mode), replacing the model's own scoring.
        `on_token`: called with each new token id as it is generated (streaming, cancellation).
        """
        settings = GenerationSettings.from_dict(generation_config)
        question_ids = self.question_ids(question, history)
        total = self.layout.video_end + question_ids.numel() + int(settings.max_new_tokens)
        if total > self.model.config.context_limit:
            raise InputError(
                f"prompt and answer need {total} tokens, "
                f"over the model's context of {self.model.config.context_limit}"
            )
        memory = self.prefill()
        start = time.perf_counter()
        stats = dict(self.stats)
        dense_units, unit_scores = None, None
        if self.settings.mode == "bilevel":
            if units is None:
                unit_scores = score_units(self.model, memory, question_ids)
                dense_units = choose_units(unit_scores, self.settings.topk)
            else:
                dense_units = sorted({0, memory.num_units - 1, *units})
            stats["select_s"] = time.perf_counter() - start
        rerotate = self.settings.rerotate and self.settings.mode == "bilevel"
        reserve = question_ids.numel() + int(settings.max_new_tokens)
        # Dense and chunked questions run on the pre-fill store itself (its spare slots); bi-level ones on
        # an assembled mixed cache.
        with memory.question_cache(
            self.runner, dense_units, rerotate=rerotate, device=self.device, reserve=reserve
        ) as mixed:
            video_kv_tokens, video_kv_bytes = mixed.length, mixed.nbytes()
            ids = answer_from_cache(self.model, self.tokenizer, mixed, question_ids, settings, on_token)
            selected = set(mixed.dense_units)
        infos = memory.units()
        for info in infos:
            info.dense = info.index in selected
            info.score = None if unit_scores is None else float(unit_scores[info.index])
        stats.update(
            mode=self.settings.mode,
            question_tokens=int(question_ids.numel()),
            new_tokens=len(ids),
            kv_tokens=video_kv_tokens,
            kv_bytes=video_kv_bytes,
            units=[vars(info) for info in infos],
            answer_s=time.perf_counter() - start,
        )
        return Answer(decode_answer(self.tokenizer, ids, settings), ids, stats)


def recorded_settings(header: dict, model) -> EngineSettings:
    """The settings a memory file records; for a file without them, the checkpoint's with the file's own
    unit_size, compression and kv_dtype."""
    held = dict(
        unit_size=header["unit_size"],
        compression=header["compression"],
        kv_dtype=header.get("kv_dtype", "auto"),
    )
    engine = header.get("engine")
    if engine is None:
        return EngineSettings.from_config(model.config).with_overrides(**held)
    known = {f.name for f in fields(EngineSettings)}
    return EngineSettings(**{**{k: v for k, v in engine.items() if k in known}, **held})


def reopen_settings(path, header: dict, model, wanted: EngineSettings | dict | None) -> EngineSettings:
    """The settings a reopened memory answers with: `wanted` where it changes only what is decided per
    question, else a one-line `InputError` naming what the memory cannot honour."""
    recorded = recorded_settings(header, model)
    if wanted is None:
        return recorded
    if isinstance(wanted, dict):
        wanted = recorded.with_overrides(**wanted)
    chunked = recorded.mode != "dense"
    if chunked and wanted.mode == "dense":
        wanted = wanted.with_overrides(mode="chunked")  # dense decoding of a chunked pre-fill
    if header.get("engine") is None:
        fixed = ("unit_size", "compression", "kv_dtype")  # the rest cannot be checked: trusted
    else:
        fixed = ("unit_size", "compression", "kv_dtype") + (("block_size", "prev_blocks") if chunked else ())
    wrong = [f"{k} {getattr(wanted, k)!r}" for k in fixed if getattr(wanted, k) != getattr(recorded, k)]
    if header.get("engine") is not None and (wanted.mode != "dense") != chunked:
        wrong.insert(0, f"mode {wanted.mode!r}")
    if wrong:
        made = "dense" if not chunked else f"chunked, block_size {recorded.block_size}, prev_blocks "
        made += "" if not chunked else str(recorded.prev_blocks)
        made += f", unit_size {recorded.unit_size}, compression {recorded.compression}, kv_dtype "
        made += repr(recorded.kv_dtype)
        raise InputError(f"{path}: cannot answer with {', '.join(wrong)}: the memory was pre-filled {made}")
    return wanted


def _check_geometry(memory: VideoMemory, config, source: str) -> None:
    """Refuse (one line) a memory whose KV cannot belong to this model's architecture: layers, KV heads,
    head size, visual tokens per group, video token, context. (A file that records its model was already
    compared in full; this also guards in-memory memories and files that record nothing.)"""
    text = config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    heads, _, dim = memory.keys[0].shape
    found = dict(
        layers=len(memory.keys),
        kv_heads=int(heads),
        head_dim=int(dim),
        video_token_id=memory.layout.video_token_id,
    )
    want = dict(
        layers=text.num_hidden_layers,
        kv_heads=text.num_key_value_heads,
        head_dim=head_dim,
        video_token_id=config.video_token_id,
    )
    per_group = {g.end - g.visual_start for g in memory.layout.groups}
    if per_group != {config.tokens_per_group}:
        found["tokens_per_group"], want["tokens_per_group"] = sorted(per_group), config.tokens_per_group
    wrong = [f"{k} {found[k]} vs this model's {want[k]}" for k in want if found[k] != want[k]]
    if wrong:
        raise InputError(f"{source}: a memory of another model ({', '.join(wrong)})")
    if memory.layout.video_end >= config.context_limit:
        raise InputError(
            f"{source}: the memory holds {memory.layout.video_end} tokens, over the model's context of "
            f"{config.context_limit}"
        )
