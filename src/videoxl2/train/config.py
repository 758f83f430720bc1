"""The training config: one YAML file naming the model, the data, what trains and the Trainer's arguments.

    model: tiny | PATH | {tiny: {tiny_config overrides}}   # a checkpoint folder, or a fresh tiny model
    tokenizer: PATH                 # optional; default: the model folder's (tiny: build_tiny_tokenizer())
    model_dtype: float32            # weights as loaded; bfloat16 halves host memory under DeepSpeed bf16
    data: {path: data.yaml, video_folder, image_folder, video_fps, frames_upbound, fps_upbound,
           model_max_length}         # or the data YAML's `datasets:` list inline
    trainable: stage3 | stage4 | projector_only | {vision: bool, dts: bool, projector: bool, llm: bool}
    lora: {r, alpha, dropout, target_modules}   # optional: LoRA adapters on the LLM instead of full weights
    learning_rates: {vision: 2e-6, ...}  # optional per-part rates (the release's mm_vision_tower_lr idea);
                                    # parts not named use training.learning_rate
    training: {TrainingArguments keys; deepspeed: zero2 | zero3 | PATH}
    feature_cache: PATH             # optional, vision and DTS frozen: store their output per video there and
                                    # reuse it (each video decoded and encoded once; see train/features.py)
    haystacks: {lengths, count, needles_per_step, extra_dense, weight, families, seed, start_step}
                                    # optional: a needle-reading loss over long pre-filled synthetic
                                    # haystacks' bi-level caches, added to every step (train/haystack.py)
    rope: {rope_type: yarn, rope_theta, factor, original_max_position_embeddings, ...}
                                    # optional: encode the LLM's positions anew before training (the
                                    # context-extension step; transformers' `rope_parameters`)

Every relative path is relative to the folder of the file that holds it, so a config runs from anywhere.
Typos fail early: unknown keys are errors that name the file and the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from .data import DataSettings, read_yaml

PARTS = ("vision", "dts", "projector", "llm")
# The release trains every part in stages 3 and 4 (vision tower unfrozen); stage 2 trains the projector alone.
PRESETS = {
    "stage3": dict.fromkeys(PARTS, True),
    "stage4": dict.fromkeys(PARTS, True),
    "projector_only": dict(vision=False, dts=False, projector=True, llm=False),
}
LORA_DEFAULTS = dict(
    r=16,
    alpha=32,
    dropout=0.05,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
)
# The release's stage-3/4 settings where they are not the Trainer's own defaults.
TRAINING_DEFAULTS = dict(
    learning_rate=1e-5,
    num_train_epochs=1,
    per_device_train_batch_size=1,
    gradient_accumulation_steps=8,
    weight_decay=0.0,
    warmup_steps=0.03,
    lr_scheduler_type="cosine",
    logging_steps=1,
    save_steps=500,
    report_to="none",
)
CONFIG_DIR = Path(__file__).parent / "configs"
DEEPSPEED_PRESETS = {"zero2": CONFIG_DIR / "zero2.json", "zero3": CONFIG_DIR / "zero3.json"}
_TOP_KEYS = {
    "model",
    "tokenizer",
    "model_dtype",
    "data",
    "trainable",
    "lora",
    "learning_rates",
    "training",
    "feature_cache",
    "haystacks",
    "rope",
}


@dataclass
class TrainConfig:
    source: Path
    model: str | dict  # "tiny", {"tiny": overrides} or a checkpoint path
    tokenizer: Path | None
    model_dtype: str
    data: DataSettings
    trainable: dict[str, bool]
    lora: dict | None
    training: dict
    learning_rates: dict[str, float] = dataclasses.field(default_factory=dict)
    feature_cache: Path | None = None
    haystacks: object | None = None  # train/haystack.py's HaystackSettings
    rope: dict | None = None  # transformers' rope_parameters, set on the model before training

    @property
    def tiny_overrides(self) -> dict | None:
        """tiny_config overrides when the model is a fresh tiny one, else None."""
        if self.model == "tiny":
            return {}
        return self.model["tiny"] if isinstance(self.model, dict) else None


def _unknown(keys, allowed, where: str) -> None:
    extra = sorted(set(keys) - set(allowed))
    if extra:
        raise ConfigError(f"{where}: unknown keys {extra} (allowed: {sorted(allowed)})")


def _path(base: Path, value) -> Path | None:
    return None if value is None else base / Path(str(value)).expanduser()


def _resolve_data(section: dict, base: Path, where: str) -> dict:
    out = dict(section)
    for key in ("video_folder", "image_folder"):
        if key in out:
            out[key] = _path(base, out[key])
    if "datasets" in out:
        if not isinstance(out["datasets"], list):
            raise ConfigError(f"{where}: datasets must be a list of {{json_path, sampling_strategy}}")
        out["datasets"] = [
            {**spec, "json_path": _path(base, spec["json_path"])}
            if isinstance(spec, dict) and "json_path" in spec
            else spec
            for spec in out["datasets"]
        ]
    return out


def parse_data(section, base: Path, where: str) -> DataSettings:
    if isinstance(section, str):
        section = {"path": section}
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: data must be a data YAML path or a mapping")
    merged = {}
    if "path" in section:
        file = _path(base, section["path"])
        merged.update(_resolve_data(read_yaml(file), file.parent, str(file)))
    merged.update(_resolve_data({k: v for k, v in section.items() if k != "path"}, base, where))
    _unknown(merged, [f.name for f in dataclasses.fields(DataSettings)], f"{where}: data")
    if "datasets" not in merged:
        raise ConfigError(f"{where}: data has no datasets (give data.path, a data YAML, or data.datasets)")
    try:
        settings = DataSettings(**merged)
        settings.frames_upbound = int(settings.frames_upbound)
        settings.model_max_length = int(settings.model_max_length)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: data: {err}") from err
    if settings.frames_upbound < 1 or settings.model_max_length < 1:
        raise ConfigError(f"{where}: data: frames_upbound and model_max_length must be >= 1")
    return settings


def parse_trainable(value, where: str) -> dict[str, bool]:
    """A preset name, or a mapping of parts (missing parts train, as in stages 3 and 4)."""
    if value is None or isinstance(value, str):
        name = value or "stage3"
        if name not in PRESETS:
            raise ConfigError(f"{where}: trainable preset {name!r} is not one of {sorted(PRESETS)}")
        return dict(PRESETS[name])
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: trainable must be a preset name or a mapping of {list(PARTS)}")
    _unknown(value, PARTS, f"{where}: trainable")
    if any(not isinstance(v, bool) for v in value.values()):
        raise ConfigError(f"{where}: trainable values must be true or false")
    parts = {part: value.get(part, True) for part in PARTS}
    if not any(parts.values()):
        raise ConfigError(f"{where}: trainable freezes every part; nothing would train")
    return parts


def parse_learning_rates(value, where: str) -> dict[str, float]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: learning_rates must be a mapping of {list(PARTS)} to numbers")
    _unknown(value, PARTS, f"{where}: learning_rates")
    try:
        rates = {part: float(rate) for part, rate in value.items()}
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: learning_rates values must be numbers: {err}") from err
    if any(rate < 0 for rate in rates.values()):
        raise ConfigError(f"{where}: learning_rates must be >= 0")
    return rates


def parse_training(section, base: Path, where: str, overrides: dict) -> dict:
    import torch

    if not isinstance(section, dict):
        raise ConfigError(f"{where}: training must be a mapping of TrainingArguments keys")
    args = {**TRAINING_DEFAULTS, **section, **{k: v for k, v in overrides.items() if v is not None}}
    if "output_dir" not in args:
        raise ConfigError(f"{where}: training.output_dir is required")
    args["output_dir"] = str(_path(base, args["output_dir"]))
    deepspeed = args.get("deepspeed")
    if isinstance(deepspeed, str):
        args["deepspeed"] = str(DEEPSPEED_PRESETS.get(deepspeed) or _path(base, deepspeed))
    if "bf16" not in args and "fp16" not in args:
        args["bf16"] = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    args.setdefault("dataloader_pin_memory", torch.cuda.is_available())
    return args


def load_config(path, overrides: dict | None = None) -> TrainConfig:
    """Read and check a training config; `overrides` (e.g. max_steps, output_dir) replace `training:` keys."""
    path = Path(path)
    raw = read_yaml(path)
    where, base = str(path), path.parent
    _unknown(raw, _TOP_KEYS, where)
    for key in ("model", "data", "training"):
        if key not in raw:
            raise ConfigError(f"{where}: missing required key {key!r}")
    model = raw["model"]
    if isinstance(model, dict):
        _unknown(model, ["tiny"], f"{where}: model")
        if not isinstance(model.get("tiny") or {}, dict):
            raise ConfigError(f"{where}: model.tiny must be a mapping of tiny_config overrides")
        model = {"tiny": model.get("tiny") or {}}
    elif model != "tiny":
        model = str(_path(base, model))
    lora = raw.get("lora")
    trainable = parse_trainable(raw.get("trainable"), where)
    if lora is not None:
        if not isinstance(lora, dict):
            raise ConfigError(f"{where}: lora must be a mapping of {sorted(LORA_DEFAULTS)}")
        _unknown(lora, LORA_DEFAULTS, f"{where}: lora")
        if not trainable["llm"]:
            raise ConfigError(f"{where}: lora trains the LLM through adapters; set trainable.llm to true")
        lora = {**LORA_DEFAULTS, **lora}
    feature_cache = _path(base, raw.get("feature_cache"))
    if feature_cache is not None and (trainable["vision"] or trainable["dts"]):
        raise ConfigError(
            f"{where}: feature_cache stores the vision side's output, so trainable.vision and trainable.dts "
            "must be false"
        )
    dtype = str(raw.get("model_dtype", "float32"))
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"{where}: model_dtype must be float32, bfloat16 or float16, got {dtype!r}")
    haystacks = None
    if raw.get("haystacks") is not None:
        from .haystack import HaystackSettings

        haystacks = HaystackSettings.parse(raw["haystacks"], where)
        if trainable["vision"] or trainable["dts"]:
            raise ConfigError(
                f"{where}: haystacks re-encode needle frames without training the vision side; "
                "set trainable.vision and trainable.dts to false"
            )
    rope = raw.get("rope")
    if rope is not None and not (isinstance(rope, dict) and isinstance(rope.get("rope_type"), str)):
        raise ConfigError(f"{where}: rope must be rope_parameters naming a rope_type, got {rope!r}")
    return TrainConfig(
        source=path,
        model=model,
        tokenizer=_path(base, raw.get("tokenizer")),
        model_dtype=dtype,
        data=parse_data(raw["data"], base, where),
        trainable=trainable,
        lora=lora,
        training=parse_training(raw["training"], base, where, overrides or {}),
        learning_rates=parse_learning_rates(raw.get("learning_rates"), where),
        feature_cache=feature_cache,
        haystacks=haystacks,
        rope=dict(rope) if rope is not None else None,
    )
