"""Needle reading at long range: a training loss over the caches bi-level decoding builds (`haystacks:`).

A model trained on short videos finds a needle in a long one (selection keeps its unit dense) but cannot
read it among thousands of sparse rows at distances it never met. Full-length training sequences do not fit
a small budget, and training on a few pre-filled long videos teaches their answers by heart. So:

- a pool of long synthetic haystacks, each with one needle, is pre-filled once by the engine (chunked
  pre-fill, bi-level memory; no gradient);
- each needle sample draws a new needle (colour and shape) for a haystack's needle group, re-encodes that
  group's unit as the video with the new needle decodes it, pre-fills the unit again *with gradients* at
  its true position (its context: the store's rows, detached, seen exactly as chunked pre-fill sees them),
  splices the unit's rows into the bi-level cache the engine assembles around it (first, last and a few
  other units dense, the rest sparse, keys at their pre-fill positions) and scores the answer to a
  question about the needle.

The later rows still carry the pool's own needle, as a real video's later rows carry its needle: the
answer must come from the unit, not from that trace, and it is a new draw every time, so nothing about a
haystack predicts it. (Needle-free haystacks with the needle drawn anywhere give every position, not one
per haystack, but read worse in the one comparison made; model card.) The loss is added to the Trainer's
on every micro-batch (`train/trainer.py`), so short videos keep training alongside.

Draws are keyed, not streamed: haystack i comes from (seed, i) and the j-th needle sample of part p of
optimizer step s from (seed, s, p, j), a step's parts being its micro-batches on every rank. A resumed run
goes on with new needles instead of repeating the first ones, and haystack i is the same video whatever
the number of ranks. Under torchrun each rank pre-fills its share of the pool (haystacks rank, rank +
world, ...) and draws its samples from it; their gradients join DDP's all-reduce with the Trainer's.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError

FAMILIES = ("what", "choice", "when", "count")
# The synthetic videos' encoder (video/synthetic.py: mpeg4) puts a keyframe every 12 frames; a clip that
# starts on one at least a GOP before the needle and runs a few frames past it decodes as the long video.
CODEC_GOP, CODEC_LEAD, CODEC_TAIL = 12, 12, 4


@dataclass
class HaystackSettings:
    lengths: list[int]  # haystack frames (at 1 fps), cycled over the pool
    count: int  # haystacks pre-filled
    needles_per_step: int  # needle samples per optimizer step (spread over its micro-batches)
    extra_dense: int = 3  # dense units besides the first, the last and the needle's (the engine keeps topk)
    weight: float = 1.0  # of the needle loss against the Trainer's
    families: dict[str, float] = field(default_factory=lambda: {"what": 0.6, "choice": 0.4})
    seed: int = 0
    start_step: int = 0  # optimizer step from which the loss joins (the pool is pre-filled then)

    KEYS = ("lengths", "count", "needles_per_step", "extra_dense", "weight", "families", "seed", "start_step")

    @classmethod
    def parse(cls, section, where: str) -> HaystackSettings:
        if not isinstance(section, dict):
            raise ConfigError(f"{where}: haystacks must be a mapping of {list(cls.KEYS)}")
        extra = sorted(set(section) - set(cls.KEYS))
        if extra:
            raise ConfigError(f"{where}: haystacks: unknown keys {extra} (allowed: {sorted(cls.KEYS)})")
        for key in ("lengths", "count", "needles_per_step"):
            if key not in section:
                raise ConfigError(f"{where}: haystacks: missing required key {key!r}")
        lengths = section["lengths"]
        if (
            not isinstance(lengths, list)
            or not lengths
            or any(not isinstance(n, int) or n < 8 for n in lengths)
        ):
            raise ConfigError(
                f"{where}: haystacks.lengths must be a list of frame counts >= 8, got {lengths!r}"
            )
        settings = cls(
            lengths=lengths,
            count=section["count"],
            needles_per_step=section["needles_per_step"],
            extra_dense=section.get("extra_dense", 3),
            weight=float(section.get("weight", 1.0)),
            families=dict(section.get("families") or {"what": 0.6, "choice": 0.4}),
            seed=section.get("seed", 0),
            start_step=section.get("start_step", 0),
        )
        for key in ("count", "needles_per_step"):
            value = getattr(settings, key)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{where}: haystacks.{key} must be a positive integer, got {value!r}")
        for key in ("extra_dense", "start_step"):
            if not isinstance(getattr(settings, key), int) or getattr(settings, key) < 0:
                raise ConfigError(f"{where}: haystacks.{key} must be an integer >= 0")
        unknown = sorted(set(settings.families) - set(FAMILIES))
        weights = list(settings.families.values())
        if (
            unknown
            or not weights
            or any(not isinstance(w, (int, float)) or w < 0 for w in weights)
            or not sum(weights)
        ):
            raise ConfigError(
                f"{where}: haystacks.families must map some of {list(FAMILIES)} to weights >= 0, "
                f"got {settings.families!r}"
            )
        return settings


@dataclass
class Haystack:
    spec: object  # data.synthetic.VideoSpec: the pool's video (one needle)
    frames: np.ndarray  # decoded frames, (F, H, W, 3) uint8
    memory: object  # engine.memory.VideoMemory (chunked pre-fill, sparse KV built)
    question_ids: object  # question text -> token ids after the video (the session's own prompt)


class HaystackPool:
    """The pre-filled haystacks and the needle loss over them (module notes)."""

    def __init__(
        self,
        model,
        tokenizer,
        settings: HaystackSettings,
        progress: bool = True,
        rank: int = 0,
        world: int = 1,
    ):
        from ..engine.runner import LayerRunner
        from ..engine.settings import EngineSettings

        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.engine = EngineSettings.from_config(model.config, mode="bilevel")
        self.runner = LayerRunner(model)
        self.rank, self.world = rank, world
        closing = tokenizer("<|im_end|>\n", add_special_tokens=False)["input_ids"]
        self._closing = closing
        self._global_rows: dict[int, tuple] = {}
        self._progress = progress and rank == 0
        if world > settings.count:
            raise ConfigError(
                f"haystacks.count: {settings.count} haystacks for {world} ranks; each rank needs one at least"
            )
        self.check_context()
        self._haystacks: list[Haystack] | None = None

    def check_context(self) -> None:
        """Fail before training, not at `start_step`, when the longest haystack is over the context."""
        from ..prompt import video_layout

        config, frames = self.model.config, max(self.settings.lengths)
        seconds = [float(t) for t in range(0, frames, config.frames_per_group)]
        layout = video_layout(self.tokenizer, config, seconds)
        if layout.length >= config.context_limit:
            raise ConfigError(
                f"haystacks.lengths: {frames} frames make {layout.length} tokens, over the model's context "
                f"of {config.context_limit}; use shorter haystacks or a model with a longer context"
            )

    @property
    def haystacks(self) -> list[Haystack]:
        """The pre-filled haystacks, made on first use: with the weights of that moment (`start_step`)."""
        if self._haystacks is None:
            self._haystacks = self._build(self._progress)
        return self._haystacks

    def _build(self, progress: bool) -> list[Haystack]:
        from tqdm.auto import tqdm

        from ..data.synthetic import COLOURS, SHAPES, Needle, VideoSpec, write_video
        from ..engine.session import VideoSession
        from ..video import read_video

        out, lengths = [], self.settings.lengths
        own = range(self.rank, self.settings.count, self.world)
        with tempfile.TemporaryDirectory(prefix="videoxl2-haystacks-") as tmp, torch.no_grad():
            for i in tqdm(own, desc="haystacks", disable=not progress):
                rng = np.random.default_rng([self.settings.seed, i])
                frames_count = lengths[i % len(lengths)]
                group = int(rng.integers(frames_count // 4))
                needle = Needle(str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)), group * 4)
                spec = VideoSpec(frames_count, 1.0, int(rng.integers(2**31)), (needle,))
                path = write_video(spec, Path(tmp) / f"haystack-{i}.mp4")
                plan, batches = read_video(path, max_num_frames=frames_count, sample_fps=1.0)
                frames = np.concatenate(list(batches))
                path.unlink()
                session = VideoSession.from_frames(
                    self.model, self.tokenizer, frames, plan.timestamps, settings=self.engine, progress=False
                )
                memory = session.prefill()
                memory.build_sparse(session.runner)
                out.append(Haystack(spec, frames, memory, session.question_ids))
        return out

    # -- one sample ---------------------------------------------------------------------------------------
    def unit_frames(self, haystack: Haystack, needle, first: int, last: int) -> np.ndarray:
        """The frames of groups first..last of the haystack's video with `needle` in place of its own, as
        that video decodes them. The codec codes the needle against the frames before it (a fresh clip
        of the needle alone decodes far cleaner than a long video does: mean error 5 against 14.5 on
        0-255), so the clip is encoded from a keyframe at least `CODEC_LEAD` frames earlier through
        `CODEC_TAIL` frames after the unit: the frames it gives are the long video's, bit for bit
        (`tests/test_haystack.py`)."""
        from ..data.synthetic import VideoSpec, render_frame
        from ..video import read_video
        from ..video.synthetic import write_synthetic_video

        spec = haystack.spec
        drawn = VideoSpec(spec.num_frames, spec.fps, spec.seed, (needle,))
        start, end = first * 4, (last + 1) * 4
        base = max(0, (needle.start_frame - CODEC_LEAD) // CODEC_GOP * CODEC_GOP)
        stop = min(spec.num_frames, end + CODEC_TAIL)
        frames = haystack.frames[start:end].copy()
        with tempfile.TemporaryDirectory(prefix="videoxl2-needle-") as tmp:
            path = write_synthetic_video(
                Path(tmp) / "needle.mp4",
                stop - base,
                spec.fps,
                spec.size,
                spec.seed,
                lambda j: render_frame(drawn, base + j),
            )
            _, batches = read_video(path, max_num_frames=stop - base, sample_fps=spec.fps)
            clip = np.concatenate(list(batches))
        frames[needle.start_frame - start :] = clip[needle.start_frame - base : end - base]
        return frames

    def global_rows(self, memory):
        """Per layer, the prefix's and every group's time-token K/V in order, and how many of them come
        before each group: what a visual token sees of the groups before its block window (gathered once
        per haystack, then sliced)."""
        cached = self._global_rows.get(id(memory))
        if cached is None:
            layout = memory.layout
            spans = [torch.arange(layout.video_start)]
            count = [layout.video_start]
            for g in layout.groups:
                spans.append(torch.arange(g.time_start, g.visual_start))
                count.append(count[-1] + g.visual_start - g.time_start)
            index = torch.cat(spans)
            cached = (
                [k.index_select(1, index) for k in memory.keys],
                [v.index_select(1, index) for v in memory.values],
                count,
            )
            self._global_rows[id(memory)] = cached
        return cached

    def unit_rows(self, memory, first: int, last: int, embeds: torch.Tensor):
        """K/V (per layer) of the groups first..last pre-filled again with gradients, each token seeing what
        chunked pre-fill shows it: a time token every earlier row, a visual token the prefix, the earlier
        groups' time tokens and the rows of its block's window. The context is the store's (detached)."""
        from ..engine.runner import attention

        layout, engine, runner = memory.layout, self.engine, self.runner
        a, b = layout.groups[first].time_start, layout.groups[last].end
        hidden = self.model.embed_inputs(layout.input_ids[a:b].clone(), embeds)  # (not an inference tensor)
        keys, values = [None] * runner.num_layers, [None] * runner.num_layers

        global_k, global_v, global_count = self.global_rows(memory)

        def attend(layer, q, k, v):
            keys[layer], values[layer] = k, v
            stored_k, stored_v = memory.keys[layer], memory.values[layer]
            out = []
            for index in range(first, last + 1):
                g = layout.groups[index]
                window_group = max(0, index // engine.block_size - engine.prev_blocks) * engine.block_size
                ws = layout.groups[window_group].time_start
                t0, v0, e0 = g.time_start - a, g.visual_start - a, g.end - a
                out.append(
                    attention(
                        q[:, t0:v0],
                        torch.cat([stored_k[:, :a], k[:, :v0]], 1),
                        torch.cat([stored_v[:, :a], v[:, :v0]], 1),
                        causal=True,
                    )
                )
                seen = global_count[window_group]

                out.append(
                    attention(
                        q[:, v0:e0],
                        window_set(stored_k, global_k[layer], k, seen, ws, a, e0),
                        window_set(stored_v, global_v[layer], v, seen, ws, a, e0),
                        causal=True,
                    )
                )
            return torch.cat(out, 1)

        runner.forward(hidden, torch.arange(a, b), attend)
        return keys, values

    def sample_loss(self, rng: np.random.Generator) -> torch.Tensor:
        """Cross-entropy of one needle sample's answer (module notes), drawn from `rng`, differentiable in
        the LLM and the projector."""
        from ..data.synthetic import COLOURS, SHAPES, Needle, questions
        from ..engine.runner import attention
        from ..video.preprocess import preprocess_frames

        model, settings = self.model, self.settings
        haystack = self.haystacks[int(rng.integers(len(self.haystacks)))]
        memory, spec = haystack.memory, haystack.spec
        group = spec.needles[0].start_frame // 4
        unit = group // memory.unit_size
        first, last = memory.unit_groups(unit)
        needle = Needle(str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)), group * 4)
        frames = self.unit_frames(haystack, needle, first, last)
        pixels = preprocess_frames(frames, image_size=model.config.vision_config.image_size)
        unit_k, unit_v = self.unit_rows(memory, first, last, model.encode_video(pixels))

        count = memory.num_units
        others = [u for u in range(count) if u not in (0, count - 1, unit)]
        picked = rng.permutation(len(others))[: settings.extra_dense]
        dense = sorted({0, count - 1, unit, *(others[int(i)] for i in picked)})
        with torch.no_grad():
            cache = memory.assemble(self.runner, dense, rerotate=False)
        s0, s1 = cache.unit_slices[unit]
        keys = [torch.cat([k[:, :s0], own, k[:, s1 : cache.length]], 1) for k, own in zip(cache.keys, unit_k)]
        values = [
            torch.cat([v[:, :s0], own, v[:, s1 : cache.length]], 1) for v, own in zip(cache.values, unit_v)
        ]

        drawn = type(spec)(spec.num_frames, spec.fps, spec.seed, (needle,))
        names, weights = zip(*settings.families.items())
        family = names[int(rng.choice(len(names), p=np.array(weights) / sum(weights)))]
        question = next(q for q in questions(drawn, rng) if q.family == family)
        asked = haystack.question_ids(question.question)
        answer = torch.tensor(
            self.tokenizer(question.answer, add_special_tokens=False)["input_ids"] + self._closing
        )
        ids = torch.cat([asked, answer])

        def attend(layer, q, k, v):
            return attention(q, torch.cat([keys[layer], k], 1), torch.cat([values[layer], v], 1), causal=True)

        positions = torch.arange(ids.numel()) + cache.next_position
        hidden = self.runner.forward(model.get_input_embeddings()(ids), positions, attend)
        logits = model.get_output_embeddings()(self.runner.llm.norm(hidden[asked.numel() - 1 : -1]))
        return F.cross_entropy(logits.float(), answer)

    def loss(self, samples: int, step: int = 0, part: int = 0) -> torch.Tensor:
        """Mean loss of the `samples` needle samples of part `part` of optimizer step `step` (notes above)."""
        seed = self.settings.seed
        draws = [np.random.default_rng([seed, step, part, j]) for j in range(samples)]
        return sum(self.sample_loss(rng) for rng in draws) / samples


def window_set(stored, earlier, own, seen: int, start: int, a: int, end: int) -> torch.Tensor:
    """A visual token's key (or value) set in chunked pre-fill, for a unit whose rows start at `a`: the first
    `seen` global rows (prefix and earlier time tokens), then the rows from its window's `start` to the
    unit's local `end`: the store's before the unit, the unit's own after."""
    if start < a:
        return torch.cat([earlier[:, :seen], stored[:, start:a], own[:, :end]], 1)
    return torch.cat([earlier[:, :seen], own[:, start - a : end]], 1)


def split_evenly(total: int, parts: int, index: int) -> int:
    """How many of `total` items the `index`-th of `parts` calls takes (the first ones take the remainder)."""
    return total // parts + (1 if index % parts < total % parts else 0)
