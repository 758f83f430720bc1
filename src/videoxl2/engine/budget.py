"""Memory known before it runs: a session's peak bytes from its token layout, the model config and the mode.

Everything here is arithmetic on sizes (nothing is allocated, the weights are counted on the `meta`
device), so a session can check before it decodes a frame, and the `videoxl2 plan` planner can answer
"what fits" from a checkpoint's config alone. Figures, all in bytes:

* `weights`             parameters x dtype bytes (optional: a loaded model already holds them);
* `video_kv`            the dense KV store of prefix + video, layers x 2 x kv_heads x head_dim per token
                        (`VideoMemory.dense_bytes()`);
* `prefill_globals`     chunked pre-fill's compact copy of the prefix and time-token KV (freed after it);
* `sparse_kv`           bi-level only: per group its time tokens + visual tokens pooled by `compression`
                        (`VideoMemory.sparse_bytes()` once a bi-level question built it);
* `vision_batch`        peak activations of SigLIP + DTS + projector for one frame batch;
* `prefill_block`       peak activations of one pre-fill block (hidden states, Q/K/V, RoPE in fp32, MLP,
                        the gathered key set of a chunked block's visual rows);
* `sparse_build`        bi-level only: temporaries of deriving the sparse KV (a chunk of groups of one layer);
* `assembled_kv`        the video's share of a question's cache: the store itself (dense, chunked) or the
                        bi-level cache (`MixedCache.nbytes()`, the session's `kv_bytes` stat);
* `question_cache`      what a question adds to the KV: dense/chunked, nothing while the question and answer
                        fit the store's spare slots (`prefill.SPARE_TOKENS`); bi-level, the assembled mixed
                        cache (prefix + time tokens + selected units dense + the rest pooled) + its room;
* `question_activations` the question's activations and logits, bi-level scoring's fp32 rows and RoPE
                        temporaries (per chunk of keys).

The peak is the largest of three phases that hold different things at once: pre-fill (weights + store with
its spare slots + globals + the larger of a vision batch and a pre-fill block), building the sparse KV
(bi-level, at its first question), and a question (weights + store [+ sparse] + its cache and activations).
With `offload` the dense store leaves the device after pre-fill and a dense/chunked question gathers a full
copy back. Chunk sizes are read from the engine's modules (`engine_constants`).

The attention kernels are assumed fused (no L x L matrices, grouped K/V heads not expanded), as the engine's
mask-free calls get on CUDA; `benchmarks/gpu_check.py` measures the real peak on a GPU to compare.
Activation figures are estimates (a few percent of the total at long videos); the KV figures are exact.

Quantized layouts the planner assumes (named constants below; the int8 video memory and the quantized
weights are to store exactly this, so the planner's bytes stay equal to the bytes measured):

* `kv_dtype="int8"` (`KV_INT8_*`): every stored key and value element is one int8 byte, with one fp16 scale
  per token, per KV head, per layer, for keys and for values separately (symmetric, `x ~ q * scale`):
  layers x 2 x kv_heads x (head_dim + 2) bytes per token (29,120 B for the 7B: 51% of bf16, 25% of fp32;
  the demo model's head_dim of 32 gives 27% of fp32, where an fp32 scale would give 28%). Per channel
  scales for keys were measured and not needed (docs/engine.md). The dense store, the sparse KV and a
  bi-level question's assembled cache all hold this layout (`prefill.Int8Rows`).
  Attention reads a dequantized copy of one layer's keys and values at a time, in the compute dtype,
  counted with the activations (a pre-fill block's key set, a question's cache).
* `quantize="int8"` (`WEIGHT_INT8_*`): each `nn.Linear` weight of the language model (q/k/v/o, gate/up/down
  in every decoder layer, and `lm_head` unless it is tied to the embedding table) is int8, one byte per
  element, with one fp32 scale per output channel, symmetric (no zero points); `quantize="int4"`
  (`WEIGHT_INT4_*`): two 4-bit values per byte and, per group of 128 input elements, a scale and a zero
  point in the compute dtype (asymmetric: 4 bytes a group in bf16, 8 in fp32); a linear whose input width is
  not a multiple of 128 or whose output width is not a multiple of 16 stays in the compute dtype. Biases,
  embeddings, norms, the vision tower, the DTS and the projector stay in the compute dtype. These are the
  bytes torchao stores (`modeling/quantize.py`: its int8 weight-only tensor without the all-zero zero
  points, its tinygemm int4 on CPU and its plain int4 on CUDA; its tile-packed CUDA int4, used when `mslk`
  is not installed, pads each weight to 1,024 inputs and 8 outputs and so stores more).
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import json
from dataclasses import asdict, dataclass, field

import torch

from ..errors import InputError, MemoryBudgetError

DEFAULT_PREFIX_TOKENS = 14  # ChatML system turn + "<|im_start|>user\n" in Qwen2's tokenizer
DEFAULT_QUESTION_TOKENS = 64  # room for a question and the chat template after the video
DEFAULT_ANSWER_TOKENS = 256  # GenerationSettings.max_new_tokens default
DEFAULT_HEADROOM = 0.05  # share of the free memory left for the allocator's fragmentation and the unforeseen
GB = 1e9

# Quantized layouts (see the module docstring): bytes per element and per scale.
KV_INT8_ELEMENT_BYTES = 1
KV_INT8_SCALE_DTYPE = torch.float16  # the engine stores its int8 KV scales in this dtype
KV_INT8_SCALE_BYTES = 2  # one fp16 scale per token, per KV head, per layer, for keys and for values
WEIGHT_INT8_ELEMENT_BITS = 8
WEIGHT_INT8_SCALE_BYTES = 4  # one fp32 scale per output channel
WEIGHT_INT4_ELEMENT_BITS = 4
WEIGHT_INT4_GROUP_SIZE = 128  # input elements sharing a scale and a zero point (input widths: its multiples)
WEIGHT_INT4_GROUP_VALUES = 2  # a scale and a zero point per group, each in the compute dtype
WEIGHT_INT4_OUT_MULTIPLE = 16  # output widths int4 takes (torch's CPU int4 packing)
WEIGHT_INT4_SCALE_BYTES = WEIGHT_INT4_GROUP_VALUES * 2  # bytes per group in bf16 (the released 7B's case)
WEIGHT_QUANTIZATIONS = ("none", "int8", "int4")
KV_DTYPES = ("bf16", "fp16", "fp32", "int8")


def dtype_of(dtype) -> torch.dtype:
    """torch.dtype from a dtype or a name ("bf16", "bfloat16", "fp16", "float32", ...)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    name = names.get(str(dtype).lower(), str(dtype).lower()).removeprefix("torch.")
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise InputError(f"unknown dtype {dtype!r}")
    return value


def dtype_bytes(dtype) -> int:
    return dtype_of(dtype).itemsize


# -- token counts -----------------------------------------------------------------------------------------
def qwen_time_tokens(seconds: float) -> int:
    """Tokens of `Time {t}s:` in Qwen2's tokenizer: "Time", " ", one per digit and the point, "s", ":"."""
    return 4 + len(repr(round(float(seconds), 1)))


@dataclass(frozen=True)
class TokenCounts:
    """What the estimate needs of a token layout: prefix tokens, groups, time tokens (all groups), visual
    tokens per group; `question`/`answer` the room kept after the video for a question and its answer."""

    prefix: int
    groups: int
    time: int
    per_group: int
    max_time: int  # time tokens of the longest group (a pre-fill block's size)
    frames: int
    question: int = DEFAULT_QUESTION_TOKENS
    answer: int = DEFAULT_ANSWER_TOKENS

    @property
    def video_end(self) -> int:
        """Tokens in the dense store: prefix + video (`TokenLayout.video_end`)."""
        return self.prefix + self.time + self.groups * self.per_group

    @classmethod
    def from_layout(
        cls, layout, frames: int | None = None, question: int | None = None, answer: int | None = None
    ):
        """Counts of a `TokenLayout` (frames default to 4 per group)."""
        groups = layout.groups
        if not groups:
            raise InputError("the layout has no frame groups")
        times = [g.visual_start - g.time_start for g in groups]
        suffix = getattr(layout, "suffix_ids", None)
        question = question if question is not None else DEFAULT_QUESTION_TOKENS
        if suffix is not None:
            question = max(question, int(suffix.numel()))
        return cls(
            prefix=int(layout.video_start),
            groups=len(groups),
            time=sum(times),
            per_group=groups[0].end - groups[0].visual_start,
            max_time=max(times),
            frames=int(frames if frames is not None else 4 * len(groups)),
            question=question,
            answer=DEFAULT_ANSWER_TOKENS if answer is None else int(answer),
        )

    @classmethod
    def for_frames(
        cls,
        frames: int,
        per_group: int,
        fps: float = 1.0,
        prefix: int = DEFAULT_PREFIX_TOKENS,
        frames_per_group: int = 4,
        time_tokens=qwen_time_tokens,
        question: int = DEFAULT_QUESTION_TOKENS,
        answer: int = DEFAULT_ANSWER_TOKENS,
    ) -> TokenCounts:
        """Counts for `frames` frames sampled at `fps` (a group's time text is its first frame's second),
        time tokens counted by `time_tokens(seconds)` (Qwen2's tokenizer by default)."""
        if frames < 1:
            raise InputError(f"frames must be >= 1, got {frames}")
        groups = -(-int(frames) // frames_per_group)
        times = [time_tokens(frames_per_group * g / fps) for g in range(groups)]
        return cls(prefix, groups, sum(times), per_group, max(times), int(frames), question, answer)

    def scaled(self, frames: int) -> TokenCounts:
        """The same video shape at another frame count: same prefix, same mean time tokens per group."""
        groups = -(-int(frames) // 4)
        time = round(self.time * groups / self.groups)
        return TokenCounts(
            self.prefix, groups, time, self.per_group, self.max_time, int(frames), self.question, self.answer
        )


# -- the model's sizes -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    vision_hidden: int
    vision_intermediate: int
    patches: int  # per frame, before the resize to the grid
    image_size: int
    grid: int  # resized grid side
    per_group: int
    vision_batch: int
    dts_batch: int

    @classmethod
    def of(cls, config) -> Shape:
        text, vision = config.text_config, config.vision_config
        heads = text.num_attention_heads
        return cls(
            layers=text.num_hidden_layers,
            hidden=text.hidden_size,
            heads=heads,
            kv_heads=text.num_key_value_heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
            intermediate=text.intermediate_size,
            vocab=text.vocab_size,
            vision_hidden=vision.hidden_size,
            vision_intermediate=vision.intermediate_size,
            patches=(vision.image_size // vision.patch_size) ** 2,
            image_size=vision.image_size,
            grid=config.vision_grid,
            per_group=config.tokens_per_group,
            vision_batch=config.vision_batch_size,
            dts_batch=config.dts_batch_size,
        )


def is_int8_kv(kv_dtype) -> bool:
    """Whether `kv_dtype` names the int8 video memory (per-token, per-head scales)."""
    return kv_dtype is not None and dtype_of(kv_dtype) == torch.int8


def kv_bytes_per_token(config, dtype) -> int:
    """Dense KV bytes of one token, all layers: layers x 2 (K, V) x kv_heads x head_dim x dtype bytes; for
    int8, each head's row of head_dim bytes carries its fp16 scale (`KV_INT8_SCALE_BYTES`)."""
    s = Shape.of(config)
    if is_int8_kv(dtype):
        return s.layers * 2 * s.kv_heads * (s.head_dim * KV_INT8_ELEMENT_BYTES + KV_INT8_SCALE_BYTES)
    return s.layers * 2 * s.kv_heads * s.head_dim * dtype_bytes(dtype)


@functools.lru_cache(maxsize=16)
def _weight_shapes(config_json: str) -> tuple[int, tuple[tuple[int, int], ...]]:
    """(all parameters, (out, in) of every language-model linear weight a quantization converts), counted
    on the meta device; a tied `lm_head` is the embedding table and is left out."""
    from ..config import VideoXL2Config
    from ..modeling.videoxl2 import VideoXL2ForCausalLM

    config = VideoXL2Config.from_dict(json.loads(config_json))
    with torch.device("meta"):
        model = VideoXL2ForCausalLM(config)
    embedding = model.language_model.get_input_embeddings().weight
    linears = tuple(
        tuple(module.weight.shape)
        for module in model.language_model.modules()
        if isinstance(module, torch.nn.Linear) and module.weight is not embedding
    )
    return sum(p.numel() for p in model.parameters()), linears


def parameter_count(config) -> int:
    """Parameters of the whole network (vision, DTS, projector, LLM), counted on the meta device."""
    return _weight_shapes(config.to_json_string(use_diff=False))[0]


def int4_takes(out_features: int, in_features: int) -> bool:
    """Whether int4 converts a linear of this shape (else it stays in the compute dtype)."""
    return in_features % WEIGHT_INT4_GROUP_SIZE == 0 and out_features % WEIGHT_INT4_OUT_MULTIPLE == 0


def quantized_linear_bytes(out_features: int, in_features: int, quantize: str, dtype=torch.bfloat16) -> int:
    """Bytes of one linear weight (bias not included) stored as `quantize` ("int8" or "int4") with compute
    `dtype` (int4's scales and zero points are in it; a shape int4 does not take stays in it)."""
    if quantize == "int8":
        return out_features * (in_features * WEIGHT_INT8_ELEMENT_BITS // 8 + WEIGHT_INT8_SCALE_BYTES)
    if quantize == "int4":
        if not int4_takes(out_features, in_features):
            return out_features * in_features * dtype_bytes(dtype)
        packed = in_features * WEIGHT_INT4_ELEMENT_BITS // 8
        groups = in_features // WEIGHT_INT4_GROUP_SIZE
        return out_features * (packed + groups * WEIGHT_INT4_GROUP_VALUES * dtype_bytes(dtype))
    raise InputError(f"quantize must be one of {', '.join(WEIGHT_QUANTIZATIONS)}, got {quantize!r}")


@dataclass(frozen=True)
class WeightBytes:
    """A model's weight bytes: the quantized linear weights (with their scales) and everything else."""

    quantize: str
    quantized_params: int
    quantized: int
    other_params: int
    other: int

    @property
    def total(self) -> int:
        return self.quantized + self.other


def weight_breakdown(config, dtype, quantize: str | None = None) -> WeightBytes:
    """Weight bytes in compute `dtype` with the language model's linear weights stored as `quantize`
    (None or "none": everything in `dtype`)."""
    quantize = quantize or "none"
    if quantize not in WEIGHT_QUANTIZATIONS:
        raise InputError(f"quantize must be one of {', '.join(WEIGHT_QUANTIZATIONS)}, got {quantize!r}")
    total, linears = _weight_shapes(config.to_json_string(use_diff=False))
    b = dtype_bytes(dtype)
    if quantize == "none":
        return WeightBytes(quantize, 0, 0, total, total * b)
    if quantize == "int4":
        linears = tuple((o, i) for o, i in linears if int4_takes(o, i))
    params = sum(o * i for o, i in linears)
    stored = sum(quantized_linear_bytes(o, i, quantize, dtype) for o, i in linears)
    return WeightBytes(quantize, params, stored, total - params, (total - params) * b)


def weight_bytes(config, dtype, quantize: str | None = None) -> int:
    """Parameters x dtype bytes, or with `quantize` ("int8", "int4") the quantized layout's bytes."""
    return weight_breakdown(config, dtype, quantize).total


def default_frames_per_batch(config, settings) -> int:
    """The session's frames per batch (`VideoSession.frames_per_batch`): whole pre-fill blocks."""
    from . import session

    block = config.frames_per_group * settings.block_size
    return max(1, getattr(session, "FRAME_BATCH", 64) // block) * block


# -- the estimate ------------------------------------------------------------------------------------------
@dataclass
class MemoryEstimate:
    """Named byte figures of one session and the peak of its phases (`total`)."""

    frames: int
    tokens: int  # prefix + video, the dense store's length
    mode: str
    dtype: str
    kv_per_token: int
    weights: int
    video_kv: int
    prefill_globals: int
    sparse_kv: int
    vision_batch: int
    prefill_block: int
    sparse_build: int
    assembled_kv: int  # the video's share of a question's cache (the store itself unless bi-level)
    question_cache: int
    question_activations: int
    phases: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    def as_dict(self) -> dict:
        return dict(asdict(self), total=self.total, peak_phase=self.peak_phase)

    def describe(self) -> str:
        """One line: the total and what it is made of at the peak."""
        parts = [("weights", self.weights), ("video KV", self.video_kv)]
        if self.sparse_kv:
            parts.append(("sparse KV", self.sparse_kv))
        parts.append(("activations and caches", self.total - sum(v for _, v in parts)))
        made = ", ".join(f"{name} {gb(value)}" for name, value in parts if value)
        return f"{gb(self.total)} at {self.peak_phase} ({made})"


def gb(value: float) -> str:
    return f"{value / GB:.2f} GB"


def engine_constants() -> dict[str, int | None]:
    """Chunk sizes the engine works in (read from its modules, so the estimate follows them): spare store
    slots for questions, groups per sparse-build chunk, keys per scoring chunk and per RoPE chunk. None:
    the engine does that step in one piece."""

    def read(module: str, name: str, default):
        try:
            return getattr(importlib.import_module(f"{__package__}.{module}"), name, default)
        except ImportError:
            return default

    return dict(
        spare=read("prefill", "SPARE_TOKENS", 0),
        sparse_groups=read("memory", "SPARSE_CHUNK_GROUPS", None),
        score_keys=read("select", "SCORE_CHUNK", None),
        rope_keys=read("runner", "ROPE_CHUNK", None),
    )


def estimate(
    config,
    counts: TokenCounts,
    settings,
    dtype,
    frames_per_batch: int | None = None,
    include_weights: bool = True,
    kv_dtype=None,
    weights: int | None = None,
) -> MemoryEstimate:
    """Peak bytes of a session of `counts` tokens in `settings.mode` (an `EngineSettings`).

    `kv_dtype` (default `dtype`) is the video memory's element type ("int8": the layout in the module
    docstring); `weights` overrides the weight bytes (e.g. `weight_bytes(config, dtype, "int4")`);
    `include_weights=False` leaves them out (they are already loaded)."""
    s = Shape.of(config)
    b = dtype_bytes(dtype)
    kvpt = kv_bytes_per_token(config, kv_dtype if kv_dtype is not None else dtype)
    dequant = is_int8_kv(kv_dtype)
    # what attention reads: the store's own elements, or a dequantized copy (compute dtype) of an int8 one
    read_kvpt = kv_bytes_per_token(config, dtype) if dequant else kvpt
    const = engine_constants()
    mode = settings.mode
    bilevel = mode == "bilevel"
    batch = frames_per_batch or default_frames_per_batch(config, settings)
    if not include_weights:
        weights = 0
    elif weights is None:
        weights = weight_bytes(config, dtype)

    video_kv = counts.video_end * kvpt
    store = video_kv + const["spare"] * kvpt
    globals_ = (counts.prefix + counts.time) * kvpt if mode != "dense" else 0
    pooled = counts.groups * (counts.per_group // max(1, settings.compression))
    sparse_kv = (counts.time + pooled) * kvpt if bilevel else 0

    vision = vision_batch_bytes(s, batch, b)
    block = prefill_block_bytes(s, counts, settings, batch, b, read_kvpt)
    build = sparse_build_bytes(s, counts, b, const["sparse_groups"]) if bilevel else 0
    cache, acts = question_bytes(s, counts, settings, b, kvpt, const)
    assembled = video_kv if not bilevel else assembled_tokens(counts, settings) * kvpt
    if dequant:  # one layer's keys and values dequantized at a time
        if mode == "dense":  # a dense block reads every earlier key (chunked: its gathered set, above)
            block += counts.video_end * read_kvpt // s.layers
        read = assembled // kvpt + counts.question + counts.answer
        acts += read * read_kvpt // s.layers

    resident = weights + (0 if settings.offload else store)
    phases = {"pre-fill": weights + store + globals_ + max(vision, block)}
    if bilevel:  # built by the first bi-level question, after pre-fill
        phases["sparse build"] = resident + sparse_kv + build
    phases["question"] = resident + sparse_kv + cache + acts
    return MemoryEstimate(
        frames=counts.frames,
        tokens=counts.video_end,
        mode=mode,
        dtype=str(dtype_of(dtype)).removeprefix("torch."),
        kv_per_token=kvpt,
        weights=weights,
        video_kv=video_kv,
        prefill_globals=globals_,
        sparse_kv=sparse_kv,
        vision_batch=vision,
        prefill_block=block,
        sparse_build=build,
        assembled_kv=assembled,
        question_cache=cache,
        question_activations=acts,
        phases=phases,
    )


def vision_batch_bytes(s: Shape, frames: int, b: int) -> int:
    """SigLIP (in chunks of `vision_batch` frames) -> resized maps -> DTS (chunks of `dts_batch` groups) ->
    projector, for one batch of `frames` frames: the pixels and the maps of the whole batch stay while the
    largest stage runs."""
    groups = -(-frames // 4)
    tower = min(frames, s.vision_batch)
    pixels = frames * 3 * s.image_size**2 * b
    maps = frames * s.vision_hidden * s.grid**2 * b  # kept per chunk, then concatenated (x2)
    siglip = tower * s.patches * (3 * s.vision_hidden + 2 * s.vision_intermediate) * b
    resize = tower * s.vision_hidden * (s.patches + s.grid**2) * 4  # bilinear in fp32
    chunk = min(groups, s.dts_batch)
    dts_elems = chunk * 4 * s.grid**2 * s.vision_hidden
    dts = 8 * dts_elems * b + 2 * dts_elems * 4 + chunk * 4 * s.grid**4 * 4  # + single-head scores (fp32)
    features = groups * s.grid**2 * s.vision_hidden * b * 2
    projector = chunk * s.grid**2 * 3 * s.hidden * b + groups * s.per_group * s.hidden * b * 2
    return pixels + 2 * maps + max(siglip + resize, dts + features, projector + features)


def token_activation_bytes(s: Shape, b: int) -> int:
    """Live bytes per token inside one decoder layer: residual, norm, Q/K/V, attention output, RoPE's fp32
    copies of the queries, and the MLP's gate/up/product."""
    qd, kd = s.heads * s.head_dim, s.kv_heads * s.head_dim
    return b * (4 * s.hidden + 4 * qd + 2 * kd + 3 * s.intermediate) + 4 * 3 * qd


def prefill_block_bytes(s: Shape, counts: TokenCounts, settings, frames: int, b: int, kvpt: int) -> int:
    """One block (`block_size` groups) through the layers, the batch's visual embeddings waiting, and for a
    chunked block the gathered key set of its visual rows (prefix + all time tokens + the window); `kvpt`:
    bytes per token of that key set (all layers)."""
    n = settings.block_size * (counts.per_group + counts.max_time)
    n = max(n, counts.prefix)
    embeds = (-(-frames // 4)) * s.per_group * s.hidden * b
    hidden = 2 * n * s.hidden * b  # embeddings, then with the visual rows written in
    gathered = 0
    if settings.mode != "dense":
        window = (settings.prev_blocks + 1) * n
        gathered = (counts.prefix + counts.time + window) * kvpt // s.layers  # one layer's K and V
    out = 2 * n * s.heads * s.head_dim * b  # the block's output buffer and a row slice of Q
    return embeds + hidden + n * token_activation_bytes(s, b) + gathered + out


def rope_temporaries(s: Shape, keys: int, b: int) -> int:
    """Rotating `keys` keys of one layer: cos/sin tables and the fp32 copies RoPE makes."""
    return 2 * keys * s.head_dim * 4 + s.kv_heads * keys * s.head_dim * (2 * b + 4 * 4)


def sparse_build_bytes(s: Shape, counts: TokenCounts, b: int, chunk_groups: int | None) -> int:
    """Deriving the sparse KV one chunk of groups and one layer at a time: the chunk's keys un-rotated
    (tables and fp32 copies), its values, and the gathered rows before pooling."""
    groups = min(counts.groups, chunk_groups or counts.groups)
    tokens = groups * (counts.per_group + counts.max_time)
    return rope_temporaries(s, tokens, b) + 2 * s.kv_heads * tokens * s.head_dim * b


def question_bytes(s: Shape, counts: TokenCounts, settings, b: int, kvpt: int, const) -> tuple[int, int]:
    """(cache, activations) of one question. Dense/chunked: the question and answer run in the store's
    spare slots (grown if short; a full copy when the store was offloaded). Bi-level: scoring reads the
    sparse KV chunk by chunk (fp32 rows of the question's attention), then the mixed cache is assembled
    and re-rotated chunk by chunk."""
    extra = counts.question + counts.answer
    n = counts.question
    decode = n * token_activation_bytes(s, b) + s.vocab * 4 * 2  # + the logits
    if settings.mode != "bilevel":
        if settings.offload:
            return (counts.video_end + extra) * kvpt, decode
        short = max(0, extra - const["spare"])
        grow = counts.video_end * kvpt // s.layers // 2 if short else 0  # one layer's K or V re-allocated
        return short * kvpt, decode + grow
    all_sparse = (
        counts.prefix + counts.time + counts.groups * (counts.per_group // max(1, settings.compression))
    )
    chunk = min(all_sparse, const["score_keys"] or all_sparse)
    scoring = rope_temporaries(s, chunk, b) + 3 * n * s.heads * chunk * 4 + decode
    mixed = assembled_tokens(counts, settings)
    rotate = rope_temporaries(s, min(mixed, const["rope_keys"] or mixed), b)
    cache = (mixed + extra) * kvpt
    return cache, max(scoring - cache, rotate + decode, 0)


def assembled_tokens(counts: TokenCounts, settings) -> int:
    """Length of a bi-level question's cache before the question: prefix, every time token, the selected
    groups' visual tokens and the others' pooled ones."""
    dense = selected_groups(counts.groups, settings.unit_size, settings.topk)
    pooled = counts.per_group // max(1, settings.compression)
    return counts.prefix + counts.time + dense * counts.per_group + (counts.groups - dense) * pooled


def selected_groups(groups: int, unit_size: int, topk: int) -> int:
    """Most groups a bi-level cache keeps dense: the first and last unit (the last may be short) and the
    `topk` best of the others."""
    units = -(-groups // unit_size)
    if units <= 2:
        return groups
    last = groups - (units - 1) * unit_size
    return unit_size * (1 + min(topk, units - 2)) + last


# -- what the device has --------------------------------------------------------------------------------
def available_bytes(device) -> int | None:
    """Bytes a session can still allocate on `device`: CUDA's free memory plus what torch's allocator holds
    unused; on CPU the kernel's MemAvailable (psutil where /proc is absent); None when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        free, _ = torch.cuda.mem_get_info(index)
        cached = torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)
        return int(free + max(0, cached))
    if device.type == "mps":
        try:
            return int(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
        except (AttributeError, RuntimeError):
            return None
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as handle:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in handle if ":" in line}
        return info.get("MemAvailable", info.get("MemFree"))
    except OSError:
        pass
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def frames_that_fit(
    config,
    settings,
    dtype,
    budget_bytes: int,
    frames_per_batch: int | None = None,
    counts: TokenCounts | None = None,
    include_weights: bool = False,
    max_frames: int | None = None,
    token_counts=None,
    **options,
) -> int:
    """The largest frame count (a multiple of 4) whose estimate is within `budget_bytes`, 0 if none.
    Token counts come from `token_counts(frames)` when given, else scale from `counts` (default: 1 fps and
    Qwen2's time text); at most `max_frames` (default: the model's context limit). `options` go to
    `estimate` (`kv_dtype`, `weights`)."""
    s = Shape.of(config)

    def counts_for(frames: int) -> TokenCounts:
        if token_counts is not None:
            return token_counts(frames)
        if counts is not None:
            return counts.scaled(frames)
        return TokenCounts.for_frames(frames, s.per_group)

    def fits(frames: int) -> bool:
        kept = counts_for(frames)
        if kept.video_end + kept.question + kept.answer > config.context_limit and max_frames is None:
            return False
        found = estimate(config, kept, settings, dtype, frames_per_batch, include_weights, **options)
        return found.total <= budget_bytes

    limit = (max_frames or 4 * config.context_limit) // 4 * 4
    if limit < 4 or not fits(4):
        return 0
    low, high = 4, 8
    while high <= limit and fits(high):
        low, high = high, high * 2
    high = min(high, limit + 4)
    while high - low > 4:  # low fits, high does not (or is past the limit)
        mid = (low + high) // 8 * 4
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def check_fits(
    config,
    layout,
    settings,
    dtype,
    frames_per_batch: int | None,
    device,
    budget_bytes: int | None = None,
    include_weights: bool = False,
    headroom: float = DEFAULT_HEADROOM,
    frames: int | None = None,
) -> MemoryEstimate:
    """Raise `MemoryBudgetError` (one line, naming the frames that fit) when the session of `layout` would
    not fit `budget_bytes` (default: what `device` has free, less `headroom`); return the estimate.
    The model's weights are taken as already loaded unless `include_weights`."""
    counts = TokenCounts.from_layout(layout, frames)
    options = {"kv_dtype": "int8"} if getattr(settings, "kv_dtype", "auto") == "int8" else {}
    found = estimate(config, counts, settings, dtype, frames_per_batch, include_weights, **options)
    if budget_bytes is None:
        free = available_bytes(device)
        if free is None:
            return found
        budget_bytes = int(free * (1 - headroom))
        where = f"free on {torch.device(device)}"
    else:
        where = "in the memory budget"
    if found.total <= budget_bytes:
        return found
    fit = frames_that_fit(
        config, settings, dtype, budget_bytes, frames_per_batch, counts, include_weights, counts.frames,
        **options,
    )  # fmt: skip
    advice = f"at most {fit:,} frames fit: lower max_num_frames" if fit else "not even 4 frames fit"
    raise MemoryBudgetError(
        f"{counts.frames:,} frames ({counts.video_end:,} tokens, {settings.mode}, {found.dtype}) need "
        f"~{found.describe()}, but {gb(budget_bytes)} is {where}: {advice}",
        needed=found.total,
        available=budget_bytes,
        frames_that_fit=fit,
    )


def malloc_trim() -> None:
    """Hand memory freed by the allocator back to the system (glibc's `malloc_trim`; elsewhere nothing).
    Tensors of a few MB come from malloc's heap, and freed ones otherwise stay in the process."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
