"""VideoSession: pre-fill one video once, then answer any number of questions from its memory.

The video streams through the pipeline batch by batch (decode -> SigLIP -> DTS -> projector -> LLM), so
frames and visual features exist only for the batch in flight; what grows with the video is the KV store.
The prefix and video never depend on the question (attention is causal), so each question only runs its
own suffix on top of the stored KV.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import InputError, MediaNotFoundError
from ..generation import GenerationSettings, decode_answer
from ..prompt import IMAGE_MARKER, TokenLayout, build_layout, build_prompt
from ..video import (
    expand_to_square,
    iter_frame_batches,
    load_image,
    plan_sampling,
    preprocess_frames,
    probe_video,
)
from .decode import answer_from_cache
from .memory import VideoMemory
from .prefill import StreamingPrefill
from .select import choose_units, score_units
from .settings import EngineSettings

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
FRAME_BATCH = 64  # frames decoded and encoded at a time (a multiple of 4)


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
    ):
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
        prefix_text = build_prompt("?").split(IMAGE_MARKER)[0]
        self.layout: TokenLayout = build_layout(
            tokenizer,
            prefix_text + IMAGE_MARKER,
            self.group_seconds,
            config.tokens_per_group,
            config.video_token_id,
        )
        if self.layout.length >= config.context_limit:
            raise InputError(
                f"{source}: {len(self.timestamps)} frames make {self.layout.length} tokens, over the model's "
                f"context of {config.context_limit}: lower max_num_frames"
            )
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
    ) -> VideoSession:
        """A video file (sampled as the release does) or an image file (4 identical frames).

        `remainder`: a sampled frame count that is not a multiple of 4 is padded by the model with copies
        of the last frame ("pad", the default), or cut to whole groups of 4 ("drop", as the release's plain
        evaluation did; `videoxl2 eval --protocol release` asks for it). An image is never cut.
        """
        path = Path(path)
        if not path.is_file():
            raise MediaNotFoundError(f"{path}: no such file")
        if path.suffix.lower() in IMAGE_SUFFIXES:
            image = expand_to_square(load_image(path))
            return cls(
                model, tokenizer, lambda size: iter([image[None]]), [0.0], settings, str(path), progress
            )
        info = probe_video(path)
        plan = plan_sampling(
            info.num_frames, info.avg_fps, max_num_frames, sample_fps, max_sample_fps, remainder=remainder
        )
        batches = lambda size: iter_frame_batches(path, plan.indices, batch_size=size)  # noqa: E731
        session = cls(model, tokenizer, batches, plan.timestamps, settings, str(path), progress)
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

    # -- pre-fill -----------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def frames_per_batch(self) -> int:
        """Frames decoded and encoded at a time: a whole number of pre-fill blocks."""
        block = self.model.config.frames_per_group * self.settings.block_size
        return max(1, FRAME_BATCH // block) * block

    def iter_group_embeddings(self) -> Iterator[torch.Tensor]:
        """Visual embeddings batch by batch (decode -> preprocess -> vision -> DTS -> projector), timed."""
        model, config = self.model, self.model.config
        size = config.vision_config.image_size
        dtype = model.get_input_embeddings().weight.dtype
        groups = frames_seen = 0
        batches = self._frame_batches(self.frames_per_batch())
        while True:
            start = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                break
            pixels = preprocess_frames(batch, image_size=size).to(self.device, dtype)
            self._add_time("decode_s", start)
            start = time.perf_counter()
            embeds = model.encode_video(pixels)
            self._add_time("vision_s", start)
            frames_seen += len(batch)
            groups += embeds.shape[0]
            yield embeds
        if groups != self.layout.num_groups:
            raise InputError(
                f"{self.source}: decoded {frames_seen} frames, expected {len(self.timestamps)} "
                "(the file may be truncated)"
            )

    def _add_time(self, key: str, start: float) -> None:
        self.stats[key] = self.stats.get(key, 0.0) + time.perf_counter() - start

    @torch.inference_mode()
    def prefill(self) -> VideoMemory:
        """Stream the video into a VideoMemory (once; later calls return it)."""
        if self.memory is not None:
            return self.memory
        settings = self.settings
        bar = tqdm(total=self.layout.num_groups, desc="prefill", unit="group", disable=self._quiet())
        prefill = StreamingPrefill(
            self.model, self.layout, settings.mode != "dense", settings.block_size, settings.prev_blocks
        )
        prefill.run_prefix()
        for embeds in self.iter_group_embeddings():
            start = time.perf_counter()
            prefill.add_groups(embeds)
            self._add_time("prefill_s", start)
            bar.update(embeds.shape[0])
        bar.close()
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
            sparse_kv_bytes=self.memory.sparse_bytes(),
        )
        return self.memory

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
        mixed = memory.assemble(
            self.runner, dense_units, rerotate=rerotate, device=self.device, reserve=reserve
        )
        video_kv_tokens, video_kv_bytes = mixed.length, mixed.nbytes()
        ids = answer_from_cache(self.model, self.tokenizer, mixed, question_ids, settings, on_token)
        infos = memory.units()
        for info in infos:
            info.dense = info.index in mixed.dense_units
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
