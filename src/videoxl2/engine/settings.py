"""Engine settings and how the seed API's switches map onto them."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..config import ENGINE_MODES
from ..errors import InputError

KV_DTYPES = ("auto", "int8")  # the video memory: the model's compute dtype, or int8 with per-token scales


@dataclass(frozen=True)
class EngineSettings:
    """`dense`: plain causal attention; `chunked`: chunk-based pre-fill (blocks of `block_size` groups see
    `prev_blocks` earlier blocks), dense decoding; `bilevel`: chunked pre-fill, then per question the
    `topk` most relevant units of `unit_size` groups keep dense KV and the rest keep KV pooled by
    `compression`. `rerotate`: bi-level keys are re-rotated at contiguous positions (the release's way);
    off, every key keeps the position pre-fill gave it, as a model trained only on dense videos expects.
    `offload`: after pre-filling on a GPU, keep the dense KV in CPU memory and gather per question only
    what the assembled cache needs. `kv_dtype`: the video memory's element type, "auto" (the model's
    compute dtype) or "int8" (one scale per token and KV head; see `prefill.Int8Rows`)."""

    mode: str = "dense"
    block_size: int = 4
    prev_blocks: int = 3
    unit_size: int = 4
    topk: int = 8
    compression: int = 4
    rerotate: bool = True
    offload: bool = False
    kv_dtype: str = "auto"

    def __post_init__(self):
        if self.mode not in ENGINE_MODES:
            raise InputError(f"engine mode must be one of {', '.join(ENGINE_MODES)}, got {self.mode!r}")
        for name in ("block_size", "unit_size", "compression"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"engine setting {name} must be >= 1, got {getattr(self, name)}")
        for name in ("prev_blocks", "topk"):
            if int(getattr(self, name)) < 0:
                raise InputError(f"engine setting {name} must be >= 0, got {getattr(self, name)}")
        if self.kv_dtype not in KV_DTYPES:
            raise InputError(
                f"engine setting kv_dtype must be one of {', '.join(KV_DTYPES)}, got {self.kv_dtype!r}"
            )

    def with_overrides(self, **overrides) -> EngineSettings:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    @classmethod
    def from_config(cls, config, **overrides) -> EngineSettings:
        """Read `config.engine_mode` & co., then the seed spellings, which win when set by a user:
        `enable_sparse` + `sparse_config {block_size_chosed, prev_blocks_num}` -> chunked (`sparse_mode`
        "streaming" or "mask" both run our exact streaming pre-fill), and the later
        `enable_chunk_prefill` + `prefill_config {chunk_size, ...}`; `selected_config {selected_topk,
        selected_chunk_size, compression}` or `enable_bilevel` switch to bilevel."""
        values = dict(
            mode=getattr(config, "engine_mode", "dense"),
            block_size=getattr(config, "block_size", 4),
            prev_blocks=getattr(config, "prev_blocks", 3),
            unit_size=getattr(config, "unit_size", 4),
            topk=getattr(config, "topk", 8),
            compression=getattr(config, "compression", 4),
            rerotate=bool(getattr(config, "rerotate", True)),
            kv_dtype=getattr(config, "kv_dtype", None) or "auto",
        )
        if getattr(config, "enable_sparse", None) is not None:
            values["mode"] = "chunked" if config.enable_sparse else "dense"
            sparse = getattr(config, "sparse_config", None) or {}
            values["block_size"] = sparse.get("block_size_chosed", values["block_size"])
            values["prev_blocks"] = sparse.get("prev_blocks_num", values["prev_blocks"])
        if getattr(config, "enable_chunk_prefill", None):
            values["mode"] = "chunked"
            prefill = getattr(config, "prefill_config", None) or {}
            values["block_size"] = prefill.get("chunk_size", values["block_size"])
            values["prev_blocks"] = prefill.get("prev_blocks_num", values["prev_blocks"])
        selected = getattr(config, "selected_config", None)
        if getattr(config, "enable_bilevel", False) or selected:
            values["mode"] = "bilevel"
            selected = selected or {}
            values["topk"] = selected.get("selected_topk", values["topk"])
            values["unit_size"] = selected.get("selected_chunk_size", values["unit_size"])
            values["compression"] = selected.get("compression", values["compression"])
        return cls(**values).with_overrides(**overrides)
