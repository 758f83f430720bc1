"""Weight-only quantization of a loaded model: `load_model(path, quantize="int8" | "int4")`, `--quantize`.

The library is torchao (the optional extra `.[quant]`; install it with `pip install torchao --no-deps` so
that it never pulls another torch). Each quantized `nn.Linear` keeps its module and its bias; only its
`weight` becomes a torchao tensor subclass whose `F.linear` runs the quantized kernel, so the engine's own
calls (`layer.self_attn.q_proj(x)`, `layer.mlp(x)` in `engine/runner.py`) need no change.

What is converted: every `nn.Linear` of the language model (q/k/v/o and gate/up/down in each decoder layer,
and `lm_head` unless it is tied to the embedding table); with `vision=True` also the SigLIP tower's
(q/k/v/out projections, fc1/fc2). Embeddings, norms, biases, the DTS and the projector stay in the compute
dtype. What is stored, as `engine/budget.py` states it (`WEIGHT_INT8_*`, `WEIGHT_INT4_*`):

* int8 (`Int8WeightOnlyConfig`, CPU and CUDA alike): one int8 per weight and one fp32 scale per output
  channel, symmetric. torchao also keeps an all-zero int8 zero point per channel; symmetric weights do not
  read it, so it is dropped (`Int8Tensor`'s documented `zero_point=None`).
* int4, groups of 128 inputs, asymmetric (torchao's tinygemm scheme): two weights per byte and, per group,
  a scale and a zero point in the compute dtype. On CPU `PrototypeInt4WeightOnlyConfig` (aten's CPU
  tinygemm kernel); on CUDA `Int4WeightOnlyConfig` in the plain format when `mslk` is installed (the same
  bytes), else the tinygemm tile-packed format (which pads each weight to 1,024 inputs and 8 outputs).
  Both need bf16 on CUDA. A linear whose input width is not a multiple of 128, or whose output width is
  not a multiple of 16 (CPU kernel's packing), stays in the compute dtype.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ..engine import budget
from ..errors import InputError

QUANTIZE_CHOICES = budget.WEIGHT_QUANTIZATIONS  # "none", "int8", "int4"
INT4_GROUP_SIZE = budget.WEIGHT_INT4_GROUP_SIZE  # inputs sharing a scale and a zero point
INT4_OUT_MULTIPLE = budget.WEIGHT_INT4_OUT_MULTIPLE  # torch's CPU int4 packing takes multiples of 16 outputs
INSTALL = 'pip install torchao --no-deps (or pip install -e ".[quant]")'


def check_quantize(value) -> str | None:
    """`"int8"` or `"int4"`; None for no quantization (None, "" or "none"). Anything else: a one-line
    `InputError`."""
    if value is None or str(value).strip().lower() in ("", "none"):
        return None
    name = str(value).strip().lower()
    if name not in QUANTIZE_CHOICES:
        raise InputError(f"--quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {value!r}")
    return name


class _ImportNoise(logging.Filter):
    """Drops two kinds of log line that installing torchao adds to every command (transformers imports
    torchao as soon as its model classes load): torchao's "Failed to load .../_C*.so" for its CUDA-only
    extensions under a CPU build of torch, and torch's deprecation notice for libraries registering enums
    as pytree constants. Neither is ours to act on, and both broke the one-line errors of the CLI."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if record.name == "torchao":
            return not (torch.version.cuda is None and text.startswith("Failed to load") and ".so" in text)
        return "register_constant() on Enum subclasses is deprecated" not in text


def hush_import_noise() -> None:
    """Install `_ImportNoise` on the two loggers (once). Runs when this module is imported, which
    `videoxl2/__init__.py` does before it imports transformers."""
    for name in ("torchao", "torch.utils._pytree"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _ImportNoise) for f in logger.filters):
            logger.addFilter(_ImportNoise())


hush_import_noise()


def import_torchao():
    """The torchao module, or a one-line `InputError` saying how to install it."""
    try:
        import torchao
        import torchao.quantization  # noqa: F401
    except ImportError as err:
        raise InputError(f"--quantize needs torchao, which is not installed: {INSTALL} ({err})") from err
    return torchao


@dataclass
class QuantizeReport:
    """What `quantize_model` did: the modules converted and those kept in the compute dtype, with why."""

    quantize: str
    vision: bool = False
    quantized: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)


def linear_targets(model, vision: bool = False) -> list[tuple[str, nn.Linear]]:
    """(name, module) of the linears a quantization converts: the language model's (a tied `lm_head` is the
    embedding table and is left alone), and with `vision` the SigLIP tower's."""
    parts = [("language_model", model.language_model)]
    if vision:
        parts.append(("vision_tower", model.vision_tower))
    embedding = model.language_model.get_input_embeddings().weight
    found = []
    for prefix, part in parts:
        for name, module in part.named_modules():
            if isinstance(module, nn.Linear) and module.weight is not embedding:
                found.append((f"{prefix}.{name}", module))
    return found


def int4_unfit(module: nn.Linear) -> str | None:
    """Why torchao's int4 kernels cannot take this linear (None: they can)."""
    if module.in_features % INT4_GROUP_SIZE:
        return f"input width {module.in_features} is not a multiple of {INT4_GROUP_SIZE}"
    if module.out_features % INT4_OUT_MULTIPLE:
        return f"output width {module.out_features} is not a multiple of {INT4_OUT_MULTIPLE}"
    return None


def _has_mslk() -> bool:
    try:
        import mslk  # noqa: F401
    except Exception:  # not installed, or its kernels do not load on this machine
        return False
    return True


def check_supported(quantize: str | None, device: torch.device, dtype: torch.dtype) -> None:
    """A one-line `InputError` for what torchao's kernels do not run, before any weight is read."""
    if quantize != "int4" or device.type == "cpu":
        return
    if device.type != "cuda":
        raise InputError(f"--quantize int4 runs on cpu or cuda, not {device.type}")
    if dtype != torch.bfloat16:
        raise InputError(
            f"--quantize int4 on CUDA needs --dtype bfloat16 (torchao's int4 kernels), got {dtype}"
        )


def torchao_config(quantize: str, device: torch.device, dtype: torch.dtype):
    """The torchao config for `quantize` on `device` (see the module docstring)."""
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig

    if quantize == "int8":
        return Int8WeightOnlyConfig(set_inductor_config=False)
    if device.type == "cpu":
        from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig

        return PrototypeInt4WeightOnlyConfig(group_size=INT4_GROUP_SIZE, set_inductor_config=False)
    check_supported(quantize, device, dtype)
    packing = "plain" if _has_mslk() else "tile_packed_to_4d"
    return Int4WeightOnlyConfig(
        group_size=INT4_GROUP_SIZE, int4_packing_format=packing, set_inductor_config=False
    )


def _drop_zero_point(module: nn.Linear) -> None:
    """int8 is symmetric: torchao's all-zero per-channel zero point is never read; keep only data + scale."""
    from torchao.quantization import Int8Tensor

    w = module.weight
    if isinstance(w, Int8Tensor) and w.zero_point is not None and not bool(w.zero_point.any()):
        slim = Int8Tensor(w.qdata, w.scale, w.block_size, w.dtype)
        module.weight = nn.Parameter(slim, requires_grad=False)


def quantize_model(model, quantize: str | None, device=None, vision: bool = False) -> QuantizeReport | None:
    """Quantize `model`'s linear weights in place (`quantize`: "int8", "int4", or None for nothing) on
    `device` (default: where each weight is): each linear is moved there and converted one at a time, so a
    model loaded on the CPU reaches the GPU already quantized. Returns what was converted and what was kept
    (also stored as `model.quantization`)."""
    quantize = check_quantize(quantize)
    if quantize is None:
        return None
    import_torchao()
    from torchao.quantization import quantize_

    dtype = model.get_input_embeddings().weight.dtype
    report = QuantizeReport(quantize, vision)
    configs = {}
    for name, module in linear_targets(model, vision):
        if device is not None:
            module.to(device)
        if quantize == "int4" and (why := int4_unfit(module)) is not None:
            report.kept[name] = why
            continue
        where = module.weight.device
        if where not in configs:
            configs[where] = torchao_config(quantize, where, dtype)
        with torch.no_grad():
            quantize_(module, configs[where])
        if quantize == "int8":
            _drop_zero_point(module)
        if where.type == "cpu":
            # each conversion's float temporaries, back to the system at once: halves the peak
            budget.malloc_trim()
        report.quantized.append(name)
    model.quantization = report
    return report


def release_float_copies(model) -> None:
    """After quantizing on the CPU, give the float weights' memory back. Two things keep it: the parameters
    left in float may be views of the memory-mapped checkpoint, which keeps every page read from the file
    (the quantized weights' too) resident; and freed float tensors sit in malloc's free lists. Copy the
    former into memory of their own, then return the free memory to the system. Measured on a 0.5B-shape
    LLM (1.44 GB fp32): RSS after an int8 load 4.2 GB without both, 0.72 GB with (0.37 GB of it weights)."""
    for param in model.parameters():
        if type(param) is nn.Parameter and param.device.type == "cpu":
            param.data = param.data.clone()
    gc.collect()
    budget.malloc_trim()


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor stores; for a torchao tensor subclass, the sum of its inner tensors."""
    flatten = getattr(type(tensor), "__tensor_flatten__", None)
    if flatten is None or type(tensor) in (torch.Tensor, nn.Parameter):
        return tensor.numel() * tensor.element_size()
    names, _ = tensor.__tensor_flatten__()
    return sum(tensor_bytes(inner) for n in names if (inner := getattr(tensor, n, None)) is not None)


def weight_bytes(model) -> int:
    """Bytes of every parameter of `model` as stored (a tied weight counted once); compare with
    `engine.budget.weight_bytes(config, dtype, quantize)`."""
    return sum(tensor_bytes(p) for p in model.parameters())
