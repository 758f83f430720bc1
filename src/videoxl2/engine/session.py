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
from ..generation import GenerationSettings, decode_answer, generate_tokens
from ..prompt import IMAGE_MARKER, TokenLayout, build_layout, build_prompt
from ..video import expand_to_square, iter_frame_batches, load_image, plan_sampling, preprocess_frames, probe_video
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
        frame_batches: Callable[[], Iterator[np.ndarray]],
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
            tokenizer, prefix_text + IMAGE_MARKER, self.group_seconds, config.tokens_per_group, config.video_token_id
        )
        if self.layout.length >= config.context_limit:
            raise InputError(
                f"{source}: {len(self.timestamps)} frames make {self.layout.length} tokens, over the model's "
                f"context of {config.context_limit}: lower max_num_frames"
            )
        self.cache = None
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
    ) -> VideoSession:
        """A video file (sampled as the release does) or an image file (4 identical frames)."""
        path = Path(path)
        if not path.is_file():
            raise MediaNotFoundError(f"{path}: no such file")
        if path.suffix.lower() in IMAGE_SUFFIXES:
            image = expand_to_square(load_image(path))
            return cls(model, tokenizer, lambda: iter([image[None]]), [0.0], settings, str(path), progress)
        info = probe_video(path)
        plan = plan_sampling(info.num_frames, info.avg_fps, max_num_frames, sample_fps, max_sample_fps)
        batches = lambda: iter_frame_batches(path, plan.indices, batch_size=FRAME_BATCH)  # noqa: E731
        session = cls(model, tokenizer, batches, plan.timestamps, settings, str(path), progress)
        session.stats["sampled_indices"] = list(plan.indices)
        session.stats["video_fps"] = info.avg_fps
        return session

    @classmethod
    def from_frames(cls, model, tokenizer, frames: np.ndarray, timestamps: Sequence[float], **kwargs) -> VideoSession:
        """Decoded RGB frames (F, H, W, 3) uint8 already in memory, with their timestamps."""
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) != len(timestamps):
            raise InputError(f"frames must be (F, H, W, 3) with one timestamp each, got {frames.shape}")
        batches = lambda: (frames[i : i + FRAME_BATCH] for i in range(0, len(frames), FRAME_BATCH))  # noqa: E731
        return cls(model, tokenizer, batches, timestamps, **kwargs)

    # -- pre-fill -----------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def iter_group_embeddings(self) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (first group index, visual embeddings) batch by batch, timing decode and vision."""
        model, config = self.model, self.model.config
        size = config.vision_config.image_size
        dtype = model.get_input_embeddings().weight.dtype
        group = 0
        frames_seen = 0
        batches = self._frame_batches()
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
            yield group, embeds
            group += embeds.shape[0]
        if group != self.layout.num_groups:
            raise InputError(
                f"{self.source}: decoded {frames_seen} frames ({group} groups), expected {len(self.timestamps)} frames"
            )

    def _add_time(self, key: str, start: float) -> None:
        self.stats[key] = self.stats.get(key, 0.0) + time.perf_counter() - start

    @torch.inference_mode()
    def prefill(self) -> None:
        """Stream the video into the KV store (dense mode: a plain causal cache)."""
        if self.cache is not None:
            return
        from transformers import DynamicCache

        model, layout = self.model, self.layout
        self.cache = DynamicCache(config=model.config.text_config)
        self._run_tokens(layout.input_ids[: layout.video_start], start=0)
        bar = tqdm(total=layout.num_groups, desc="prefill", unit="group", disable=self._quiet())
        for first, embeds in self.iter_group_embeddings():
            last = first + embeds.shape[0] - 1
            span_start, span_end = layout.groups[first].time_start, layout.groups[last].end
            start = time.perf_counter()
            ids = layout.input_ids[span_start:span_end].to(self.device)
            self._run_embeds(model.embed_inputs(ids, embeds), start=span_start)
            self._add_time("prefill_s", start)
            bar.update(embeds.shape[0])
        bar.close()
        self.stats["video_tokens"] = layout.video_end
        self.stats["kv_bytes"] = kv_bytes(self.cache)

    def _quiet(self) -> bool | None:
        return None if self.progress is None else not self.progress

    def _run_tokens(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        return self._run_embeds(self.model.get_input_embeddings()(ids.to(self.device)), start)

    def _run_embeds(self, embeds: torch.Tensor, start: int) -> torch.Tensor:
        """Causal forward of `embeds` at positions start.. on top of the cache; returns last hidden states."""
        positions = torch.arange(start, start + embeds.shape[0], device=self.device)[None]
        out = self.model.llm(inputs_embeds=embeds[None], position_ids=positions, past_key_values=self.cache, use_cache=True)
        return out.last_hidden_state[0]

    # -- questions -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def ask(self, question: str, history=None, generation_config: dict | None = None) -> Answer:
        """Answer one question (after `history` turns) from the stored video; the store is left unchanged."""
        settings = GenerationSettings.from_dict(generation_config)
        suffix_text = build_prompt(question, history).split(IMAGE_MARKER, 1)[1]
        suffix = torch.tensor(self.tokenizer(suffix_text, add_special_tokens=False)["input_ids"], dtype=torch.long)
        total = self.layout.video_end + suffix.numel() + int(settings.max_new_tokens)
        if total > self.model.config.context_limit:
            raise InputError(
                f"prompt and answer need {total} tokens, over the model's context of {self.model.config.context_limit}"
            )
        self.prefill()
        start = time.perf_counter()
        lm_head = self.model.get_output_embeddings()
        length = self.layout.video_end
        try:
            hidden = self._run_tokens(suffix, start=length)
            position = length + suffix.numel()

            def step(token: int) -> torch.Tensor:
                nonlocal position
                h = self._run_tokens(torch.tensor([token]), start=position)
                position += 1
                return lm_head(h[-1])

            ids = generate_tokens(lm_head(hidden[-1]), step, self.tokenizer, settings)
        finally:
            self.cache.crop(length)
        stats = dict(self.stats)
        stats.update(mode=self.settings.mode, question_tokens=int(suffix.numel()), new_tokens=len(ids))
        stats["answer_s"] = time.perf_counter() - start
        return Answer(decode_answer(self.tokenizer, ids, settings), ids, stats)


def kv_bytes(cache) -> int:
    """Bytes held by a transformers cache's key and value tensors."""
    total = 0
    for layer in cache.layers:
        for tensor in (layer.keys, layer.values):
            if tensor is not None and tensor.numel():
                total += tensor.numel() * tensor.element_size()
    return total
