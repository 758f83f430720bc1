"""VideoXL2Config: one config for the whole network (LLM + vision + DTS) and the engine defaults.

Any size is a config: the released 8B model (`VideoXL2Config.released()`), and tiny ones for tests. The
released checkpoint ships a flat LLaVA-style `llava_qwen` config.json; `from_release_dict` turns it into
ours, building the SigLIP part from known constants because we never reach a hub.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig, Qwen2Config, SiglipVisionConfig

from .errors import ConfigError

# SigLIP so400m-patch14-384 with its last (27th) encoder layer removed, as the release runs it.
RELEASED_VISION = dict(
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=26,
    num_attention_heads=16,
    image_size=384,
    patch_size=14,
    num_channels=3,
    hidden_act="gelu_pytorch_tanh",
    layer_norm_eps=1e-6,
    vision_use_head=False,
)

# Qwen2.5-7B-Instruct, the release's language model.
RELEASED_TEXT = dict(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    tie_word_embeddings=False,
    bos_token_id=151643,
    eos_token_id=151645,
)

RELEASED_VIDEO_TOKEN_ID = 151654  # Qwen2's <|vision_pad|>, the placeholder of one visual embedding
ENGINE_MODES = ("dense", "chunked", "bilevel")
# The release runs far past Qwen2.5's 32k positions (thousands of frames, ~37 tokens per frame); cap at the
# ~10,000 frames the paper reports rather than at max_position_embeddings.
RELEASED_MAX_CONTEXT = 400_000

# Keys of the release's config.json that choose computations, with the values this code computes. Another
# value is refused rather than ignored: the release would build a different network from it, or (the
# select layer, which the release ignores) the file asks for a layer neither the release nor we compute.
# - mm_projector_type: only "mlp2x_gelu" (Linear-GELU-Linear). The release's builder reads a missing key as
#   "linear", so a missing key is refused too.
# - mm_spatial_pool_mode: only "average" (the release also has "max"). Missing: its evaluation sets
#   "average" itself.
# - mm_vision_select_layer: the release's SigLIP tower ignores the key and always takes the output of the
#   last kept layer (26 of 27). Its training writes -1 (the default neither training stage overrides:
#   the last layer of the 26-layer tower); -2 names the same layer counted on the full 27-layer SigLIP, the
#   LLaVA convention. Missing: ignored, as there.
RELEASE_IMPLEMENTED: dict[str, tuple[Any, ...]] = {
    "mm_projector_type": ("mlp2x_gelu",),
    "mm_spatial_pool_mode": ("average",),
    "mm_vision_select_layer": (-1, -2),
}
RELEASE_MISSING_MEANS = {"mm_projector_type": "linear"}  # what the release reads a missing key as


def check_release_values(release: dict[str, Any], source: str = "release config.json") -> None:
    """Raise `ConfigError` naming each release config key whose value this code does not implement."""
    problems = []
    for key, implemented in RELEASE_IMPLEMENTED.items():
        shown = " or ".join(repr(v) for v in implemented)
        if key in release:
            value = release[key]
            if isinstance(value, bool) or value not in implemented:
                problems.append(f"{key} = {value!r} is not implemented (implemented: {shown})")
        elif key in RELEASE_MISSING_MEANS:
            means = RELEASE_MISSING_MEANS[key]
            problems.append(f"{key} is missing, which the release reads as {means!r} (implemented: {shown})")
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))


class VideoXL2Config(PretrainedConfig):
    """Configuration of `VideoXL2ForCausalLM`.

    Video geometry: each frame gives a `vision_grid` x `vision_grid` feature map after resizing SigLIP's
    patch grid; `frames_per_group` frames are fused by the DTS into one map, projected, and average-pooled
    by `pool_stride`, so a group yields `(vision_grid // pool_stride) ** 2` visual tokens (144 released).

    Engine settings (`engine_mode`, `block_size`, `prev_blocks`, `unit_size`, `topk`, `compression`,
    `rerotate`) are the defaults of chat and sessions. The seed API's spellings (`enable_sparse`,
    `sparse_mode`, `sparse_config`, `enable_chunk_prefill`, `prefill_config`) may be set on the config
    too; see `videoxl2.engine.settings` for how they map.
    """

    model_type = "videoxl2"
    sub_configs = {"text_config": Qwen2Config, "vision_config": SiglipVisionConfig}

    def __init__(
        self,
        text_config: dict | Qwen2Config | None = None,
        vision_config: dict | SiglipVisionConfig | None = None,
        frames_per_group: int = 4,
        vision_grid: int = 24,
        pool_stride: int = 2,
        dts_max_relative_position: int = 64,
        video_token_id: int = RELEASED_VIDEO_TOKEN_ID,
        vision_batch_size: int = 600,
        dts_batch_size: int = 24,
        engine_mode: str = "dense",
        block_size: int = 4,
        prev_blocks: int = 3,
        unit_size: int = 4,
        topk: int = 8,
        compression: int = 4,
        rerotate: bool = True,
        max_context_tokens: int | None = None,
        **kwargs: Any,
    ):
        if isinstance(text_config, dict):
            text_config = Qwen2Config(**{k: v for k, v in text_config.items() if k != "model_type"})
        if isinstance(vision_config, dict):
            vision_config = SiglipVisionConfig(
                **{k: v for k, v in vision_config.items() if k != "model_type"}
            )
        self.text_config = text_config if text_config is not None else Qwen2Config(**RELEASED_TEXT)
        self.vision_config = (
            vision_config if vision_config is not None else SiglipVisionConfig(**RELEASED_VISION)
        )
        self.frames_per_group = frames_per_group
        self.vision_grid = vision_grid
        self.pool_stride = pool_stride
        self.dts_max_relative_position = dts_max_relative_position
        self.video_token_id = video_token_id
        self.vision_batch_size = vision_batch_size
        self.dts_batch_size = dts_batch_size
        self.engine_mode = engine_mode
        self.block_size = block_size
        self.prev_blocks = prev_blocks
        self.unit_size = unit_size
        self.topk = topk
        self.compression = compression
        self.rerotate = bool(rerotate)
        self.max_context_tokens = max_context_tokens
        kwargs.setdefault(
            "tie_word_embeddings", bool(getattr(self.text_config, "tie_word_embeddings", False))
        )
        super().__init__(**kwargs)
        self.validate_geometry()

    # -- derived sizes -------------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.text_config.vocab_size

    @property
    def context_limit(self) -> int:
        """Longest prompt accepted: `max_context_tokens`, else the LLM's `max_position_embeddings`."""
        return int(self.max_context_tokens or self.text_config.max_position_embeddings)

    @property
    def tokens_per_group(self) -> int:
        return (self.vision_grid // self.pool_stride) ** 2

    def validate_geometry(self) -> None:
        """Fail at construction, not deep inside a conv, when the video geometry cannot work."""
        v = self.vision_config
        problems = []
        if v.image_size < v.patch_size:
            problems.append(f"vision image_size {v.image_size} is smaller than patch_size {v.patch_size}")
        if self.vision_grid % self.pool_stride:
            problems.append(
                f"vision_grid {self.vision_grid} is not a multiple of pool_stride {self.pool_stride}"
            )
        if v.hidden_size % 32:
            problems.append(
                f"vision hidden_size {v.hidden_size} must be a multiple of 32 (DTS GroupNorm(32))"
            )
        if self.frames_per_group != 4:
            problems.append(
                f"frames_per_group must be 4 (the DTS halves time twice), got {self.frames_per_group}"
            )
        if self.engine_mode not in ENGINE_MODES:
            problems.append(f"engine_mode must be one of {ENGINE_MODES}, got {self.engine_mode!r}")
        for name in ("block_size", "unit_size", "compression", "vision_batch_size", "dts_batch_size"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if int(self.prev_blocks) < 0 or int(self.topk) < 0:
            problems.append("prev_blocks and topk must be >= 0")
        if problems:
            raise ConfigError("invalid VideoXL2Config: " + "; ".join(problems))

    # -- the release's flat config.json --------------------------------------------------------------
    @classmethod
    def released(cls, **overrides: Any) -> VideoXL2Config:
        """The released Video-XL-2 (Qwen2.5-7B + SigLIP so400m minus one layer) geometry."""
        overrides.setdefault("max_context_tokens", RELEASED_MAX_CONTEXT)
        return cls(text_config=dict(RELEASED_TEXT), vision_config=dict(RELEASED_VISION), **overrides)

    @classmethod
    def from_release_dict(cls, release: dict[str, Any]) -> VideoXL2Config:
        """Build our config from the release's flat `llava_qwen` config.json.

        The Qwen2 keys are taken as they are; the SigLIP tower is so400m minus its last layer (the release's
        config only names the tower); `rope_scaling` is dropped because the release forces it to None.
        A `videoxl2` object in the file, absent from the release, overrides our settings (e.g.
        `vision_config`, `vision_grid`, `video_token_id`) so release-format test checkpoints can be tiny.
        Values the code does not implement (`RELEASE_IMPLEMENTED`) raise `ConfigError` naming the key.
        """
        check_release_values(release)
        qwen_keys = set(Qwen2Config().to_dict()) | {"rope_theta"}
        skip = {
            "model_type",
            "architectures",
            "rope_scaling",
            "rope_parameters",
            "auto_map",
            "transformers_version",
        }
        text = {k: v for k, v in release.items() if k in qwen_keys and k not in skip}
        if "rope_theta" not in text:
            text["rope_theta"] = RELEASED_TEXT["rope_theta"]
        missing = [
            k
            for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
            if k not in text
        ]
        if missing:
            raise ConfigError(f"release config.json lacks {', '.join(missing)}")
        values = dict(
            text_config=text,
            vision_config=dict(RELEASED_VISION),
            pool_stride=int(release.get("mm_spatial_pool_stride", 2) or 2),
            max_context_tokens=RELEASED_MAX_CONTEXT,
        )
        values.update(release.get("videoxl2") or {})
        return cls(**values)
