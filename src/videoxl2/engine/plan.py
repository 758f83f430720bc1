"""`videoxl2 plan`: what a video will cost in memory, and the most frames that fit a card, from a
checkpoint's config alone.

Nothing is loaded: the config (and, when the folder has one, the tokenizer, to count the time text exactly)
is read from a checkpoint folder, the bundled demo model or a hub id (`org/name[@revision]`, through the
Hugging Face cache: only config and tokenizer files are fetched), the weights are counted on the meta
device, and every figure is `engine/budget.py`'s arithmetic: `estimate` for one frame count,
`frames_that_fit` for a card. Quantized weights (`--quantize int8|int4`) and the int8 video memory
(`--kv-dtype int8`) follow the layouts stated in budget.py's docstring (`WEIGHT_INT*`, `KV_INT8_*`).

    videoxl2 plan --model BAAI/Video-XL-2 --frames 2048 --mode bilevel --quantize int4 --kv-dtype int8 \\
        --gpu-memory 24GB [--json]
"""

from __future__ import annotations

import argparse
import functools
import json
import re
from dataclasses import asdict

from ..errors import CheckpointError, InputError
from . import budget
from .budget import TokenCounts

HELP = "memory a video will take and the most frames that fit a card, from the config alone"
DEFAULT_FRAMES = 1024
DTYPES = ("bf16", "fp16", "fp32", "bfloat16", "float16", "float32")
_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(text: str, name: str = "--gpu-memory") -> int:
    """Bytes from "24GB" (10^9), "24GiB" (2^30), "1.5TB", "25769803776" (bytes); InputError otherwise."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*", str(text))
    unit = match and _UNITS.get(match[2].lower())
    if not unit or float(match[1]) * unit < 1:
        raise InputError(f"{name} {text!r}: expected a size such as 24GB, 24GiB or a byte count")
    return int(float(match[1]) * unit)


# -- what the checkpoint says -----------------------------------------------------------------------------
def read_checkpoint(model, revision: str | None = None):
    """(config, tokenizer or None) of a checkpoint folder or hub id; only small files are read."""
    from ..modeling.checkpoint import TOKENIZER_FILES, read_config, resolve_checkpoint

    folder = resolve_checkpoint(model, revision, allow_patterns=TOKENIZER_FILES)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a checkpoint folder")
    config, _ = read_config(folder)
    tokenizer = None
    if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
        from .. import load_tokenizer

        try:
            tokenizer = load_tokenizer(folder)
        except CheckpointError:
            tokenizer = None  # count the time text as Qwen2's tokenizer does
    return config, tokenizer


def token_counter(config, tokenizer=None, fps: float = 1.0):
    """frames -> `TokenCounts` of a video sampled at `fps`: the prompt's prefix and every group's time text
    counted by `tokenizer` (as a session builds them), or by Qwen2's rule when there is none."""
    per_group, frames_per_group = config.tokens_per_group, config.frames_per_group
    if fps <= 0:
        raise InputError(f"--fps must be > 0, got {fps}")
    if tokenizer is None:
        return lambda frames: TokenCounts.for_frames(
            frames, per_group, fps, frames_per_group=frames_per_group
        )
    from ..prompt import time_text, video_prefix_text

    def encode(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    prefix = encode(video_prefix_text())
    time_tokens = functools.lru_cache(maxsize=None)(lambda seconds: encode(time_text(seconds)))
    return lambda frames: TokenCounts.for_frames(
        frames, per_group, fps, prefix, frames_per_group, lambda s: time_tokens(round(s, 1))
    )


# -- the plan ---------------------------------------------------------------------------------------------
def plan(
    config,
    frames: int,
    settings,
    dtype="bf16",
    quantize: str = "none",
    kv_dtype=None,
    fps: float = 1.0,
    gpu_memory: int | None = None,
    headroom: float = budget.DEFAULT_HEADROOM,
    tokenizer=None,
    frames_per_batch: int | None = None,
) -> dict:
    """Every figure of a session of `frames` frames (bytes), and with `gpu_memory` the most frames that
    fit it with `headroom` of it kept free. JSON-ready."""
    if frames < 1:
        raise InputError(f"--frames must be >= 1, got {frames}")
    if not 0 <= headroom < 1:
        raise InputError(f"--headroom must be in [0, 1), got {headroom}")
    kv_dtype = kv_dtype or dtype
    counts_for = token_counter(config, tokenizer, fps)
    counts = counts_for(frames)
    weights = budget.weight_breakdown(config, dtype, quantize)
    batch = frames_per_batch or budget.default_frames_per_batch(config, settings)
    options = dict(kv_dtype=kv_dtype, weights=weights.total)
    found = budget.estimate(config, counts, settings, dtype, batch, **options)
    shape = budget.Shape.of(config)
    context = counts.video_end + counts.question + counts.answer
    result = found.as_dict()
    result.update(
        kv_dtype=_name(kv_dtype),
        quantize=weights.quantize,
        weights_quantized=weights.quantized,
        weights_other=weights.other,
        parameters=weights.quantized_params + weights.other_params,
        fps=fps,
        groups=counts.groups,
        time_tokens="tokenizer" if tokenizer is not None else "qwen2 rule",
        frames_per_batch=batch,
        settings=asdict(settings),
        shape=asdict(shape),
        context_tokens=context,
        context_limit=config.context_limit,
        within_context=context <= config.context_limit,
        gpu_memory=gpu_memory,
        headroom=headroom,
        usable=None,
        fits=None,
        frames_that_fit=None,
        fit_capped_by_context=None,
    )
    if gpu_memory is not None:
        usable = int(gpu_memory * (1 - headroom))
        fit = budget.frames_that_fit(
            config, settings, dtype, usable, batch, include_weights=True, token_counts=counts_for, **options
        )
        after = counts_for(fit + 4)
        capped = after.video_end + after.question + after.answer > config.context_limit
        result.update(usable=usable, fits=found.total <= usable and context <= config.context_limit)
        result.update(frames_that_fit=fit, fit_capped_by_context=capped)
    return result


def _name(dtype) -> str:
    return str(budget.dtype_of(dtype)).removeprefix("torch.")


def size(value: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= scale:
            return f"{value / scale:,.2f} {unit}"
    return f"{int(value):,} B"


def count(value: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:,.2f}{unit}"
    return f"{value:,}"


def describe(result: dict, model: str = "") -> str:
    """The plan as a few lines of text."""
    s, mode = result["shape"], result["mode"]
    quant = result["quantize"]
    weights = "weights" + (f" ({quant} LLM linears, the rest {result['dtype']})" if quant != "none" else "")
    rows = [
        (weights, result["weights"]),
        (f"vision, per batch of {result['frames_per_batch']} frames (activations)", result["vision_batch"]),
        ("pre-fill, per block (activations)", result["prefill_block"]),
        (f"dense video KV ({result['kv_dtype']}, {result['kv_per_token']:,} B/token)", result["video_kv"]),
    ]
    if mode == "bilevel":
        rows.append(("sparse video KV", result["sparse_kv"]))
    rows.append(("a question's assembled cache (video part)", result["assembled_kv"]))
    phases = ", ".join(f"{name} {size(value)}" for name, value in result["phases"].items())
    width = max(len(label) for label, _ in rows) + 2
    lines = [
        f"{model or 'model'}: {s['layers']} layers, hidden {s['hidden']}, {s['kv_heads']} KV heads x "
        f"{s['head_dim']}, {count(result['parameters'])} parameters",
        f"{result['frames']:,} frames at {result['fps']:g} fps: {result['tokens']:,} tokens "
        f"({result['groups']:,} groups), {mode}, {result['dtype']} compute",
        "",
        *(f"  {label:<{width}}{size(value):>12}" for label, value in rows),
        f"  {'peak (' + result['peak_phase'] + ')':<{width}}{size(result['total']):>12}   [{phases}]",
        "",
    ]
    if not result["within_context"]:
        lines.append(
            f"over the model's context: {result['context_tokens']:,} tokens with a question and answer, "
            f"limit {result['context_limit']:,}"
        )
    if result["gpu_memory"] is None:
        lines.append("frames that fit: pass --gpu-memory (e.g. 24GB or 24GiB)")
    else:
        verdict = "fits" if result["fits"] else "does not fit"
        cap = " (the model's context)" if result["fit_capped_by_context"] else ""
        lines.append(
            f"{size(result['gpu_memory'])} card, {result['headroom']:.0%} kept free "
            f"({size(result['usable'])}): {verdict}; at most {result['frames_that_fit']:,} frames fit in "
            f"{mode} mode{cap}"
        )
    return "\n".join(lines)


# -- the command ------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..cli import _add_memory_args
    from ..defaults import DEFAULT_MODEL

    parser.add_argument(
        "--model",
        default=str(DEFAULT_MODEL),
        help="checkpoint folder or hub id org/name[@revision] (default: the bundled demo model); only its "
        "config and tokenizer files are read",
    )
    parser.add_argument("--revision", default=None, help="hub id: branch, tag or commit (default main)")
    parser.add_argument("--frames", type=int, default=DEFAULT_FRAMES, help=f"default {DEFAULT_FRAMES}")
    parser.add_argument(
        "--fps", type=float, default=1.0, help="sampling rate, sets the time text (default 1)"
    )
    parser.add_argument(
        "--mode", choices=["dense", "chunked", "bilevel"], default=None, help="default: the checkpoint's"
    )
    _add_memory_args(parser, budget.KV_DTYPES, "video memory (default: --dtype)")
    parser.add_argument("--offload", action="store_true", help="dense video KV kept in CPU memory")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16", help="compute dtype (default bf16)")
    parser.add_argument(
        "--quantize", choices=budget.WEIGHT_QUANTIZATIONS, default="none", help="LLM linear weights"
    )
    parser.add_argument(
        "--gpu-memory",
        default=None,
        help="card size: 24GB (10^9 bytes), 24GiB (2^30) or bytes (default: free memory of cuda if any)",
    )
    parser.add_argument(
        "--headroom",
        type=float,
        default=budget.DEFAULT_HEADROOM,
        help=f"share of the card kept free (default {budget.DEFAULT_HEADROOM})",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    from ..cli import _memory_overrides
    from .settings import EngineSettings

    gpu_memory = parse_bytes(args.gpu_memory) if args.gpu_memory is not None else _cuda_free()
    config, tokenizer = read_checkpoint(args.model, args.revision)
    settings = EngineSettings.from_config(
        config, mode=args.mode, offload=args.offload or None, **_memory_overrides(args)
    )
    result = plan(
        config,
        args.frames,
        settings,
        dtype=args.dtype,
        quantize=args.quantize,
        kv_dtype=args.kv_dtype,
        fps=args.fps,
        gpu_memory=gpu_memory,
        headroom=args.headroom,
        tokenizer=tokenizer,
    )
    result = dict(model=str(args.model), revision=args.revision, **result)
    print(json.dumps(result, indent=2) if args.json else describe(result, str(args.model)))
    return 0


def _cuda_free() -> int | None:
    import torch

    return budget.available_bytes("cuda") if torch.cuda.is_available() else None


COMMANDS = {"plan": (HELP, add_arguments, run)}
