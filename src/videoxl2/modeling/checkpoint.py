"""Loading checkpoints: the released `BAAI/Video-XL-2` folder unchanged, and our own `save_pretrained` output.

The release is a LLaVA-style `llava_qwen` model whose weight names follow transformers 4.x (SigLIP nested in
`vision_model`, DTS under `model.sae`, projector as `model.mm_projector.{0,2}`). We check every name and
shape against the model from the safetensors headers first (cheap, precise errors), then let transformers'
`from_pretrained` do the loading from that folder, with an explicit rename table.

A name that is not an existing path but reads as a hub id (`org/name`, optionally `org/name@revision`) is
resolved through huggingface_hub's cache (`resolve_checkpoint`): `HF_HUB_CACHE` / `HF_HOME` and
`HF_HUB_OFFLINE` are read when it is called. Offline (or `local_files_only=True`), only the cache is looked
at; online, missing files are downloaded into it. A local path always wins over an id.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open

from ..config import VideoXL2Config, check_release_values
from ..errors import CheckpointError, ConfigError

# Release name -> our name, first match wins. `None` drops the weight (accepted but unused).
RELEASE_RENAMES: list[tuple[str, str | None]] = [
    (r"^model\.vision_tower\.vision_tower\.vision_model\.", "vision_tower."),
    (r"^model\.sae\.", "dts."),
    (r"^model\.mm_projector\.0\.", "projector.linear_1."),
    (r"^model\.mm_projector\.2\.", "projector.linear_2."),
    (r"^model\.text_mlp\.", None),
    (r"^model\.", "language_model.model."),
    (r"^lm_head\.", "language_model.lm_head."),
]
RELEASE_MODEL_TYPES = {"llava_qwen", "llava_qwen2", "videoxl2_qwen"}
_LIST_LIMIT = 20

# `org/name` or `org/name@revision` (a branch, tag or commit hash)
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?$")
TOKENIZER_FILES = ["*.json", "*.txt", "*.model", "*.tiktoken"]  # config, tokenizer, generation config
CHECKPOINT_FILES = [*TOKENIZER_FILES, "*.safetensors"]  # no .bin/.pt copies of the weights
_TRUE = {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    """`HF_HUB_OFFLINE` as set now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE")
    return value.upper() in _TRUE if value is not None else bool(constants.HF_HUB_OFFLINE)


def hub_cache_dir() -> Path:
    """The hub cache as the environment says now: `HF_HUB_CACHE`, else `HF_HOME`/hub, else the default."""
    from huggingface_hub import constants

    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return Path(os.environ[name]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def resolve_checkpoint(
    path_or_id,
    revision: str | None = None,
    local_files_only: bool | None = None,
    allow_patterns: list[str] | None = None,
) -> Path:
    """The folder holding checkpoint `path_or_id`: the path itself when it exists, else the hub cache's
    snapshot of that id at `revision` (default: the id's `@revision`, else "main"). `local_files_only`
    (default: `HF_HUB_OFFLINE`) never downloads; `allow_patterns` limits what a download fetches (default:
    config, tokenizer and safetensors files). Raises a one-line `CheckpointError` saying how to get it."""
    path = Path(path_or_id).expanduser()
    if path.exists():
        return path
    match = HUB_ID.match(str(path_or_id))
    if match is None:
        raise CheckpointError(f"{path}: not a checkpoint folder")
    repo_id = match["repo"]
    revision = revision or match["revision"]
    offline = hub_offline() if local_files_only is None else bool(local_files_only)
    cache = hub_cache_dir()
    at = f" at revision {revision}" if revision else ""
    get = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache,
            local_files_only=offline,
            allow_patterns=allow_patterns or CHECKPOINT_FILES,
        )
    except LocalEntryNotFoundError as err:
        if local_files_only:
            why = "local_files_only is set"
        else:
            why = "HF_HUB_OFFLINE is set" if offline else "the hub could not be reached"
        raise CheckpointError(
            f"{path_or_id}: no such folder, and {repo_id}{at} is not in the Hugging Face cache {cache} "
            f"({why}): download it once with `{get}` (`huggingface-cli download` on older huggingface_hub), "
            "unset HF_HUB_OFFLINE, or pass a local folder"
        ) from err
    except Exception as err:  # repository or revision not found, gated, incomplete snapshot, bad id, network
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path_or_id}: hub id {repo_id}{at}: {first}") from err
    return Path(folder)


def rename_release_key(name: str) -> str | None:
    for pattern, target in RELEASE_RENAMES:
        if re.match(pattern, name):
            return None if target is None else re.sub(pattern, target, name, count=1)
    return name


def read_config(path: Path) -> tuple[VideoXL2Config, bool]:
    """Our config from `config.json`; the flag says whether the folder is in the release's format."""
    file = path / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{path}: no config.json (expected a Video-XL-2 checkpoint folder)")
    try:
        raw = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{file}: not valid JSON ({err})") from err
    model_type = raw.get("model_type")
    release = model_type in RELEASE_MODEL_TYPES or "LlavaQwenForCausalLM" in (raw.get("architectures") or [])
    if release and model_type != VideoXL2Config.model_type:
        check_release_values(raw, str(file))  # ConfigError naming the key: unimplemented, not unloadable
    try:
        if model_type == VideoXL2Config.model_type:
            return VideoXL2Config.from_dict(raw), False
        if release:
            return VideoXL2Config.from_release_dict(raw), True
    except (ConfigError, TypeError, ValueError) as err:
        raise CheckpointError(f"{file}: {err}") from err
    raise CheckpointError(
        f"{file}: model_type {model_type!r} is neither 'videoxl2' nor the release's 'llava_qwen'"
    )


def weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"{index}: unreadable index ({err})") from err
        files = [path / n for n in names]
        missing = [str(f.name) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{path}: index names missing shard files: {', '.join(missing)}")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


def read_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Names and shapes from the safetensors headers, without reading the tensors."""
    shapes = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as handle:
                for name in handle.keys():
                    shapes[name] = tuple(handle.get_slice(name).get_shape())
        except Exception as err:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{file}: not a readable safetensors file ({err})") from err
    return shapes


def expected_shapes(config: VideoXL2Config) -> dict[str, tuple[int, ...]]:
    from .videoxl2 import VideoXL2ForCausalLM

    with torch.device("meta"):
        model = VideoXL2ForCausalLM(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _listing(title: str, items: list[str]) -> str:
    shown = ", ".join(items[:_LIST_LIMIT])
    more = f" ... and {len(items) - _LIST_LIMIT} more" if len(items) > _LIST_LIMIT else ""
    return f"{title} ({len(items)}): {shown}{more}"


def check_weights(path: Path, config: VideoXL2Config, release: bool, files: list[Path]) -> None:
    """Compare the checkpoint's names/shapes (renamed if it is the release's) with the model's."""
    found = read_shapes(files)
    expected = expected_shapes(config)
    renamed: dict[str, str] = {}
    for name in found:
        target = rename_release_key(name) if release else name
        if target is not None:
            renamed[target] = name
    missing = sorted(set(expected) - set(renamed))
    unexpected = sorted(renamed[n] for n in set(renamed) - set(expected))
    mismatched = sorted(
        f"{renamed[n]} {found[renamed[n]]} (expected {expected[n]})"
        for n in set(renamed) & set(expected)
        if tuple(found[renamed[n]]) != expected[n]
    )
    problems = [
        _listing(title, items)
        for title, items in (
            ("missing weights", missing),
            ("unexpected weights", unexpected),
            ("weights with the wrong shape", mismatched),
        )
        if items
    ]
    if problems:
        raise CheckpointError(f"{path}: checkpoint does not match the model: " + "; ".join(problems))


def load_model(
    path,
    device: str | torch.device | None = "cpu",
    dtype: torch.dtype | str | None = None,
    revision: str | None = None,
    local_files_only: bool | None = None,
    quantize: str | None = None,
    quantize_vision: bool = False,
    device_map=None,
    offload_folder=None,
):
    """Load a Video-XL-2 checkpoint (release or ours) onto `device` in `dtype` (default: float32 on CPU,
    bfloat16 elsewhere): a folder, or a hub id such as "BAAI/Video-XL-2" resolved through the Hugging Face
    cache at `revision` (`resolve_checkpoint`; `local_files_only` defaults to `HF_HUB_OFFLINE`).
    `device=None` places nothing (DeepSpeed ZeRO-3 partitions the model itself).
    `quantize` ("int8", "int4"; None or "none": off) stores the language model's linear weights quantized
    through torchao (`modeling/quantize.py`; `quantize_vision` the SigLIP tower's too): the model is read
    into host memory, each linear is quantized on its way to `device`, then the rest follows, so the device
    never holds the full-precision weights.
    `device_map` ("auto", "balanced", "sequential", or {module: "cuda:0" | "cpu" | "disk"}; see
    `modeling/offload.py`) spreads the weights with accelerate instead of placing them on `device`: the
    model is read into host memory, then dispatched; "disk" entries go to `offload_folder` (default a
    temporary folder). The engine runs such a model when its layers compute on one device.
    Raises `CheckpointError` naming what is wrong, and `ConfigError` naming a release config.json key whose
    value the code does not implement (`videoxl2.config.RELEASE_IMPLEMENTED`)."""
    from .quantize import (
        check_quantize,
        check_supported,
        import_torchao,
        quantize_model,
        release_float_copies,
    )
    from .videoxl2 import VideoXL2ForCausalLM

    quantize = check_quantize(quantize)  # a bad value or a missing torchao fails before any weight is read
    if device_map is not None:
        if quantize is not None:
            raise CheckpointError("quantize and device_map together are not supported: choose one")
        device = "cpu"  # read into host memory, then dispatched
    if quantize is not None:
        if device is None:
            raise CheckpointError("quantize needs a device to load onto (device=None: the caller places)")
        import_torchao()
    path = resolve_checkpoint(path, revision, local_files_only)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint folder")
    config, release = read_config(path)
    files = weight_files(path)
    check_weights(path, config, release, files)
    device = None if device is None else torch.device(device)
    if dtype is None:
        on_cpu = device is None or device.type == "cpu"
        if device_map is not None:
            on_cpu = not _maps_to_gpu(device_map)
        dtype = torch.float32 if on_cpu else torch.bfloat16
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if quantize is not None:
        check_supported(quantize, device, dtype)
    # The release's unused text_mlp is renamed out of the language model's way, then ignored.
    key_mapping = {p: (t if t is not None else "text_mlp.") for p, t in RELEASE_RENAMES} if release else None
    load_on = torch.device("cpu") if quantize is not None else device  # quantized on the way to `device`
    model = VideoXL2ForCausalLM.from_pretrained(
        path,
        config=config,
        dtype=dtype,
        device_map=None if load_on is None else {"": load_on},
        key_mapping=key_mapping,
        local_files_only=True,
    )
    if quantize is not None:
        quantize_model(model, quantize, device=device, vision=quantize_vision)
        model.to(device)
        release_float_copies(model)
    if device_map is not None:
        from .offload import dispatch

        model = dispatch(model, device_map, offload_folder)
    return model.eval()


def _maps_to_gpu(device_map) -> bool:
    """Whether a device map puts weights on an accelerator ("auto" and friends do when one is present)."""
    if isinstance(device_map, str):
        return torch.cuda.is_available()
    return any(str(d) not in ("cpu", "disk", "meta") for d in device_map.values())
