"""The engine on a GPU, in one prepared run (about 5 minutes on one H100): what each attention call gets, and
what the released 7B shape costs.

Random weights at the released shape (Qwen2.5-7B LLM + SigLIP so400m, bf16), random frames fed from memory
(no video file is read), the tiny tokenizer for the prompt text (its time text is a few tokens shorter than
Qwen2's per group). Phases, each timed with the device synchronised and its peak memory taken from torch's
allocator (CPU: the process's peak RSS):

* sessions  - `VideoSession.from_frames` in each mode: dense (256 frames), chunked and bi-level (2,048
              frames): pre-fill seconds and peak, then one question: decode ms/token (from `on_token`
              timestamps), first-token seconds, the question's peak; each beside `engine/budget.py`'s
              estimate of the same session;
* late block - one chunked block at ~200k keys: a `StreamingPrefill` over a ~5,200-frame layout whose
              earlier blocks are skipped (the store is filled with random K/V; if the pre-fill's progress
              counters ever change, the earlier blocks are run instead, within the time left);
* sdpa      - every `scaled_dot_product_attention` call of the phases above is recorded (call site, shapes,
              mask kind, grouped heads); the largest call of each site is replayed with random tensors under
              `sdpa_kernel` restricted to flash, then efficient, then math (and cuDNN on CUDA), recording
              which work, the kernel the profiler saw run, milliseconds and extra memory;
* fits      - the most frames that fit this device per mode: the budget's estimate for the whole card, and
              the same scaled by the measured/estimated peak of the 2,048-frame sessions.

Writes `benchmarks/results/gpu_check-<device>.json` (after every phase, so a run cut short keeps what it
measured) and prints a table. `--tiny` runs the same phases with the tiny random model in fp32 on the CPU in
seconds (`tests/test_gpu_check.py` runs it).

    python benchmarks/gpu_check.py                  # CUDA, released shape, bf16
    python benchmarks/gpu_check.py --tiny           # CPU, tiny shapes, fp32
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import json
import math
import os
import platform
import re
import resource
import sys
import time
import types
import warnings
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

try:  # frames come from memory: PyAV (imported by the video package) is not needed for this check
    import av  # noqa: F401
except ImportError:
    sys.modules["av"] = types.ModuleType("av")

QUESTION = "What happens in the video?"
PRESETS = {
    "full": dict(frames=2048, dense_frames=256, late_keys=200_000, new_tokens=16),
    "tiny": dict(frames=64, dense_frames=32, late_keys=2_000, new_tokens=4),
}
KERNEL_OPS = [  # profiler op names -> kernel
    ("_scaled_dot_product_flash_attention_for_cpu", "flash (cpu)"),
    ("_scaled_dot_product_flash_attention", "flash"),
    ("_flash_attention_forward", "flash"),
    ("_scaled_dot_product_efficient_attention", "efficient"),
    ("_efficient_attention_forward", "efficient"),
    ("_scaled_dot_product_cudnn_attention", "cudnn"),
    ("_scaled_dot_product_fused_attention_overrideable", "fused (overrideable)"),
    ("_scaled_dot_product_attention_math", "math"),
]
GIB = 1 << 30


# -- the device -----------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device, collect: bool = True) -> int:
    """Start a peak window; returns the bytes allocated now (CUDA) or the RSS (CPU)."""
    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    return rss_bytes()


def reserved_bytes(device: torch.device) -> int | None:
    """The allocator's peak reservation (allocated + cached blocks) on CUDA: what the card had to hold."""
    return torch.cuda.max_memory_reserved(device) if device.type == "cuda" else None


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # process peak (kB on Linux)


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine() or "cpu"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def environment(device: torch.device) -> dict:
    import transformers

    info = dict(
        device=device_name(device),
        device_type=device.type,
        torch=torch.__version__,
        transformers=transformers.__version__,
        python=platform.python_version(),
        cpu_count=os.cpu_count(),
        sdp_enabled=dict(
            flash=torch.backends.cuda.flash_sdp_enabled(),
            efficient=torch.backends.cuda.mem_efficient_sdp_enabled(),
            math=torch.backends.cuda.math_sdp_enabled(),
            cudnn=torch.backends.cuda.cudnn_sdp_enabled(),
        ),
    )
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        props = torch.cuda.get_device_properties(device)
        info.update(
            cuda=torch.version.cuda,
            capability=f"{props.major}.{props.minor}",
            total_memory=total,
            free_at_start=free,
            cudnn=torch.backends.cudnn.version(),
        )
    else:
        from videoxl2.engine.budget import available_bytes

        info.update(free_at_start=available_bytes("cpu"))
    return info


# -- recording the engine's attention calls ------------------------------------------------------------
def mask_kind(mask) -> str:
    if mask is None:
        return "none"
    from torch.nn.attention.bias import CausalBias

    if isinstance(mask, CausalBias):
        return f"causal_{mask.variant.name.lower()}"
    return f"tensor {str(mask.dtype).removeprefix('torch.')} {list(mask.shape)}"


def call_site() -> str:
    """The package code that made the call: the innermost videoxl2 frame other than a generic `attention`
    helper (file:line qualified name), with the library frame in between when there is one."""
    library = None
    for frame in inspect.stack(context=0)[2:]:
        path = frame.filename.replace(os.sep, "/")
        if "/videoxl2/" in path:
            if frame.function == "attention":
                continue
            name = getattr(frame.frame.f_code, "co_qualname", frame.function)
            where = f"{path.split('/videoxl2/', 1)[1]}:{frame.lineno} {name}"
            return f"{where} via {library}" if library else where
        if library is None and "/torch/" not in path and "gpu_check" not in path:
            library = f"{path.rsplit('/', 2)[-2]}/{path.rsplit('/', 1)[-1]} {frame.function}"
    return library or "?"


class SdpaRecorder:
    """Wraps `torch.nn.functional.scaled_dot_product_attention` while active; per (site, mask kind, dtype,
    grouped heads) it keeps the count, the range of query/key lengths and the largest call's arguments."""

    ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")

    def __init__(self):
        self.sites: dict[tuple, dict] = {}
        self.phase = ""
        self._original = None

    def __enter__(self):
        self._original = torch.nn.functional.scaled_dot_product_attention
        original = self._original

        def wrapper(*args, **kwargs):
            self.record(dict(zip(self.ARGS, args), **kwargs))
            # The original in place while it runs: a CausalBias mask dispatches on `func is
            # torch.nn.functional.scaled_dot_product_attention`, and torch's own inner calls stay unrecorded.
            torch.nn.functional.scaled_dot_product_attention = original
            try:
                return original(*args, **kwargs)
            finally:
                torch.nn.functional.scaled_dot_product_attention = wrapper

        torch.nn.functional.scaled_dot_product_attention = wrapper
        return self

    def __exit__(self, *exc):
        torch.nn.functional.scaled_dot_product_attention = self._original

    def record(self, call: dict) -> None:
        q, k = call["query"], call["key"]
        kind = mask_kind(call.get("attn_mask"))
        gqa = bool(call.get("enable_gqa", False))
        key = (call_site(), kind, str(q.dtype).removeprefix("torch."), gqa)
        n, m = q.shape[-2], k.shape[-2]
        site = self.sites.setdefault(key, dict(count=0, n=[n, n], m=[m, m], phases=[], size=-1, example=None))
        site["count"] += 1
        site["n"] = [min(site["n"][0], n), max(site["n"][1], n)]
        site["m"] = [min(site["m"][0], m), max(site["m"][1], m)]
        if self.phase not in site["phases"]:
            site["phases"].append(self.phase)
        size = q.numel() + k.numel()
        if size > site["size"]:
            mask = call.get("attn_mask")
            site["size"] = size
            site["example"] = dict(
                q=list(q.shape),
                k=list(k.shape),
                v=list(call["value"].shape),
                dtype=str(q.dtype).removeprefix("torch."),
                mask=kind,
                mask_shape=None if mask is None or kind.startswith("causal") else list(mask.shape),
                mask_dtype=None if mask is None or kind.startswith("causal") else str(mask.dtype),
                is_causal=bool(call.get("is_causal", False)),
                scale=call.get("scale"),
                enable_gqa=gqa,
            )


def build_call(example: dict, device: torch.device):
    """Random tensors of a recorded call's shapes: a function that makes the call."""
    from torch.nn.attention.bias import CausalVariant, causal_lower_right, causal_upper_left

    dtype = getattr(torch, example["dtype"])
    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(example[name], dtype=dtype, device=device, generator=generator) for name in "qkv")
    n, m = example["q"][-2], example["k"][-2]
    mask = None
    if example["mask"] == "causal_lower_right":
        mask = causal_lower_right(n, m)
    elif example["mask"] == "causal_upper_left":
        mask = causal_upper_left(n, m)
    elif example["mask"] != "none":
        mask_dtype = getattr(torch, example["mask_dtype"].removeprefix("torch."))
        mask = torch.ones(example["mask_shape"], dtype=mask_dtype, device=device)
        if mask_dtype != torch.bool:
            mask.zero_()
    assert CausalVariant  # the variants the recorder names
    kwargs = dict(attn_mask=mask, is_causal=example["is_causal"], scale=example["scale"])
    if example["enable_gqa"]:
        kwargs["enable_gqa"] = True
    return lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs)


def kernels_run(call, device: torch.device) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
        sync(device)
    names = {event.name for event in prof.events()}
    found = []
    for op, kernel in KERNEL_OPS:
        if any(op in name for name in names) and kernel not in found:
            found.append(kernel)
            break  # the first match in KERNEL_OPS order is the most specific
    return found or sorted(name for name in names if "attention" in name)


def replay(example: dict, device: torch.device, repeats: int = 3) -> dict:
    """The call under each backend restriction: works or not (with torch's reasons), kernel, ms, memory."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {
        "default": None,
        "flash": [SDPBackend.FLASH_ATTENTION],
        "efficient": [SDPBackend.EFFICIENT_ATTENTION],
        "math": [SDPBackend.MATH],
    }
    if device.type == "cuda":
        backends["cudnn"] = [SDPBackend.CUDNN_ATTENTION]
    call = build_call(example, device)
    results = {}
    for name, allowed in backends.items():
        context = sdpa_kernel(allowed) if allowed else contextlib.nullcontext()
        with warnings.catch_warnings(record=True) as caught, context:
            warnings.simplefilter("always")
            try:
                base = reset_peak(device, collect=False)
                call()
                sync(device)
                extra = peak_bytes(device) - base if device.type == "cuda" else None
                kernel = kernels_run(call, device)
                start = time.perf_counter()
                for _ in range(repeats):
                    call()
                sync(device)
                ms = (time.perf_counter() - start) / repeats * 1e3
                results[name] = dict(ok=True, kernel=kernel, ms=round(ms, 3), extra_bytes=extra)
            except RuntimeError as err:
                reasons = [str(w.message).splitlines()[0][:200] for w in caught][:3]
                results[name] = dict(ok=False, error=str(err).splitlines()[0][:200], reasons=reasons)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return results


# -- the model ----------------------------------------------------------------------------------------
def build_model(args, device: torch.device, dtype: torch.dtype):
    """A random model on `device` in `dtype` and the tiny tokenizer."""
    from videoxl2.tokenizer import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    if args.tiny:
        from videoxl2.tiny import build_tiny_model

        model, _ = build_tiny_model(0, tokenizer)
        return model.to(device, dtype).eval(), tokenizer
    from videoxl2.config import RELEASED_MAX_CONTEXT, RELEASED_TEXT, RELEASED_VISION, VideoXL2Config
    from videoxl2.modeling.videoxl2 import VideoXL2ForCausalLM

    text, vision = dict(RELEASED_TEXT), dict(RELEASED_VISION)
    if args.layers:
        text["num_hidden_layers"] = args.layers
    if args.vision_layers:
        vision["num_hidden_layers"] = args.vision_layers
    config = VideoXL2Config(
        text_config=text,
        vision_config=vision,
        video_token_id=tokenizer.convert_tokens_to_ids("<|vision_pad|>"),
        max_context_tokens=RELEASED_MAX_CONTEXT,
    )
    previous = torch.get_default_dtype()
    torch.manual_seed(0)
    try:  # made on the device in its dtype: no fp32 copy of 8B parameters anywhere
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model = VideoXL2ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        for param in model.parameters():
            if param.dtype != dtype:
                param.data = param.data.to(dtype)
    return model.eval(), tokenizer


def random_frames(model, count: int, seed: int = 0) -> np.ndarray:
    """`count` frames at the vision tower's size without `count` copies: one random frame, broadcast."""
    size = model.config.vision_config.image_size
    frame = np.random.default_rng(seed).integers(0, 256, (1, size, size, 3), dtype=np.uint8)
    return np.broadcast_to(frame, (count, size, size, 3))


# -- phases -------------------------------------------------------------------------------------------
def run_session(model, tokenizer, mode: str, frames: int, args, device, dtype, recorder) -> dict:
    from videoxl2.engine.budget import TokenCounts, estimate
    from videoxl2.engine.session import VideoSession
    from videoxl2.engine.settings import EngineSettings

    settings = EngineSettings(mode=mode, offload=False)
    recorder.phase = f"{mode} {frames} frames"
    base = reset_peak(device)
    start = time.perf_counter()
    session = VideoSession.from_frames(
        model, tokenizer, random_frames(model, frames), [float(i) for i in range(frames)],
        settings=settings, progress=False,
    )  # fmt: skip
    counts = TokenCounts.from_layout(session.layout)
    counts = TokenCounts(**{**vars(counts), "answer": args.new_tokens})
    found = estimate(model.config, counts, settings, dtype, session.frames_per_batch(), include_weights=True)
    session.prefill()
    sync(device)
    out = dict(
        mode=mode,
        frames=frames,
        tokens=session.layout.video_end,
        prefill_s=round(time.perf_counter() - start, 3),
        prefill_peak_bytes=peak_bytes(device),
        prefill_reserved_bytes=reserved_bytes(device),
        base_bytes=base,
        stage_s={k: round(v, 3) for k, v in session.stats.items() if k.endswith("_s")},
        estimate=found.as_dict(),
    )
    reset_peak(device)
    stamps: list[float] = []
    start = time.perf_counter()
    answer = session.ask(
        QUESTION,
        generation_config=dict(max_new_tokens=args.new_tokens, stop_strings=()),
        on_token=lambda _: stamps.append(time.perf_counter()),
    )
    sync(device)
    steps = len(stamps) - 1
    out["question"] = dict(
        s=round(time.perf_counter() - start, 3),
        first_token_s=round(stamps[0] - start, 3) if stamps else None,
        new_tokens=len(answer.token_ids),
        ms_per_token=round((stamps[-1] - stamps[0]) / steps * 1e3, 3) if steps > 0 else None,
        peak_bytes=peak_bytes(device),
        reserved_bytes=reserved_bytes(device),
        kv_bytes=answer.stats.get("kv_bytes"),
        select_s=answer.stats.get("select_s"),
    )
    out["peak_bytes"] = max(out["prefill_peak_bytes"], out["question"]["peak_bytes"])
    out["peak_over_estimate"] = round(out["peak_bytes"] / found.total, 3) if device.type == "cuda" else None
    del session, answer
    return out


def layout_for_keys(tokenizer, config, keys: int, block_frames: int):
    """The session's layout (1 fps) of the fewest whole blocks whose video reaches `keys` tokens."""
    from videoxl2.prompt import IMAGE_MARKER, build_layout, build_prompt

    prefix = build_prompt(QUESTION).split(IMAGE_MARKER)[0] + IMAGE_MARKER
    frames = block_frames
    while True:
        seconds = [4.0 * g for g in range(frames // 4)]
        layout = build_layout(tokenizer, prefix, seconds, config.tokens_per_group, config.video_token_id)
        if layout.video_end >= keys:
            return layout, frames
        per_frame = layout.video_end / frames
        frames = max(frames + block_frames, int(keys / per_frame) // block_frames * block_frames)


def fast_forward(prefill, layout, first_group: int) -> bool:
    """Pretend the groups before `first_group` were pre-filled: random K/V in the store, progress counters
    moved. False (nothing changed) when the pre-fill does not keep the counters this knows."""
    store = prefill.store
    if not (hasattr(prefill, "groups_done") and hasattr(store, "filled") and hasattr(store, "global_filled")):
        return False
    tensors = [
        *getattr(store, "key_buffers", store.keys),
        *getattr(store, "value_buffers", store.values),
        *getattr(store, "global_keys", []),
        *getattr(store, "global_values", []),
    ]
    with torch.no_grad():
        for t in tensors:
            t.normal_()
    group = layout.groups[first_group]
    starts = getattr(prefill, "global_start", None)
    before = sum(g.visual_start - g.time_start for g in layout.groups[:first_group])
    prefill.groups_done = first_group
    store.filled = group.time_start
    store.global_filled = starts[first_group] if starts else layout.video_start + before
    return True


def late_block(model, tokenizer, args, device, dtype, recorder, deadline: float) -> dict:
    from videoxl2.engine.prefill import StreamingPrefill
    from videoxl2.engine.settings import EngineSettings

    settings = EngineSettings(mode="chunked")
    config = model.config
    block_frames = config.frames_per_group * settings.block_size
    layout, frames = layout_for_keys(tokenizer, config, args.late_keys, block_frames)
    recorder.phase = f"late block {layout.video_end} keys"
    base = reset_peak(device)
    with torch.inference_mode():
        prefill = StreamingPrefill(model, layout, True, settings.block_size, settings.prev_blocks)
        prefill.run_prefix()
        last = (layout.num_groups - 1) // settings.block_size * settings.block_size
        skipped = fast_forward(prefill, layout, last)
        shape = (settings.block_size, config.tokens_per_group, config.hidden_size)
        generator = torch.Generator(device=device).manual_seed(0)
        if not skipped:  # run the earlier blocks for real, while time allows
            for _ in range(0, last, settings.block_size):
                if time.perf_counter() > deadline:
                    return dict(
                        frames=frames, keys=layout.video_end, skipped="out of time before the last block"
                    )
                prefill.add_groups(torch.randn(shape, dtype=dtype, device=device, generator=generator))
        embeds = torch.randn(
            (layout.num_groups - last, *shape[1:]), dtype=dtype, device=device, generator=generator
        )
        sync(device)
        times = []
        for _ in range(2 if skipped else 1):  # with a fast-forward, once to warm up, once timed
            if skipped:
                fast_forward(prefill, layout, last)
            start = time.perf_counter()
            prefill.add_groups(embeds)
            sync(device)
            times.append(time.perf_counter() - start)
    group = layout.groups[-1]
    out = dict(
        frames=frames,
        keys=layout.video_end,
        time_token_keys=group.visual_start,
        block_groups=layout.num_groups - last,
        fast_forward=skipped,
        block_s=round(times[-1], 4),
        peak_bytes=peak_bytes(device),
        base_bytes=base,
    )
    del prefill
    return out


def fits(model, dtype, device, info: dict, sessions: dict) -> dict:
    """Frames that fit this device per mode: budget estimate for the whole card (or free RAM), and scaled
    by the measured/estimated peak of the sessions run here."""
    from videoxl2.engine.budget import DEFAULT_HEADROOM, frames_that_fit
    from videoxl2.engine.settings import EngineSettings

    card = info.get("total_memory") or info.get("free_at_start") or 0
    budget = int(card * (1 - DEFAULT_HEADROOM))
    out = dict(budget_bytes=budget, basis="total memory" if info.get("total_memory") else "free memory")
    for mode in ("dense", "chunked", "bilevel"):
        settings = EngineSettings(mode=mode)
        row = dict(estimate=frames_that_fit(model.config, settings, dtype, budget, include_weights=True))
        ratio = (sessions.get(mode) or {}).get("peak_over_estimate")
        if ratio:
            row["calibrated"] = frames_that_fit(
                model.config, settings, dtype, int(budget / ratio), include_weights=True
            )
            row["peak_over_estimate"] = ratio
        out[mode] = row
    return out


# -- report -------------------------------------------------------------------------------------------
def gb(value) -> str:
    return "-" if value is None else f"{value / GIB:.2f}"


def table(result: dict) -> str:
    lines = [
        f"# gpu_check on {result['env']['device']} (torch {result['env']['torch']}, {result['dtype']}, "
        f"{result['shape']} shape)",
        "",
        "## sessions (peak GiB: the allocator's on CUDA, process RSS on CPU)",
        "| mode | frames | tokens | pre-fill s | pre-fill peak | estimate | question peak | ms/token | "
        "first token s | KV MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mode, row in result.get("sessions", {}).items():
        if "error" in row or "skipped" in row:
            lines.append(f"| {mode} | {row.get('error') or row.get('skipped')} |")
            continue
        q = row["question"]
        kv = q.get("kv_bytes")
        lines.append(
            f"| {mode} | {row['frames']} | {row['tokens']:,} | {row['prefill_s']} | "
            f"{gb(row['prefill_peak_bytes'])} | {gb(row['estimate']['total'])} | {gb(q['peak_bytes'])} | "
            f"{q['ms_per_token']} | {q['first_token_s']} | {'-' if kv is None else f'{kv / 2**20:.1f}'} |"
        )
    late = result.get("late_block") or {}
    if late:
        lines += ["", f"late block: {json.dumps(late)}"]
    lines += [
        "",
        "## attention calls (largest of each site, replayed; kernel the profiler saw, ms)",
        "| site | mask | q | k | calls | default | flash | efficient | math |",
        "|---|---|---|---|---:|---|---|---|---|",
    ]

    def cell(runs, name):
        r = runs.get(name)
        if r is None:
            return "-"
        return f"{'/'.join(r['kernel'])} {r['ms']} ms" if r["ok"] else "no"

    for site in result.get("sdpa", []):
        ex, runs = site["example"], site.get("runs", {})

        lines.append(
            f"| {site['site']} | {ex['mask']}{' gqa' if ex['enable_gqa'] else ''} | {ex['q']} | {ex['k']} | "
            f"{site['count']} | "
            + " | ".join(cell(runs, name) for name in ("default", "flash", "efficient", "math"))
            + " |"
        )
    fit = result.get("fits") or {}
    if fit:
        lines += ["", f"## frames that fit ({gb(fit.get('budget_bytes'))} GiB, {fit.get('basis')})"]
        for mode in ("dense", "chunked", "bilevel"):
            if mode in fit:
                lines.append(f"- {mode}: {json.dumps(fit[mode])}")
    errors = result.get("errors") or {}
    if errors:
        lines += ["", "## errors"] + [f"- {k}: {v}" for k, v in errors.items()]
    return "\n".join(lines)


# -- driver -------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random model, fp32, CPU: seconds")
    parser.add_argument("--device", help="default: cuda if available (cpu with --tiny)")
    parser.add_argument("--dtype", help="default: bfloat16 on CUDA, float32 elsewhere")
    parser.add_argument("--frames", type=int, help="chunked and bi-level sessions (default 2048; tiny 64)")
    parser.add_argument("--dense-frames", type=int, help="dense session (default 256; tiny 32)")
    parser.add_argument("--late-keys", type=int, help="keys before the late block (default 200000)")
    parser.add_argument("--new-tokens", type=int, help="tokens generated per question (default 16)")
    parser.add_argument("--layers", type=int, help="LLM layers (default: the released 28)")
    parser.add_argument("--vision-layers", type=int, help="SigLIP layers (default: the released 26)")
    parser.add_argument("--max-seconds", type=float, default=280, help="later phases are skipped past this")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    preset = PRESETS["tiny" if args.tiny else "full"]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    default_device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    device = torch.device(args.device or default_device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else torch.bfloat16
        if device.type == "cuda"
        else torch.float32
    )
    if args.frames % 16 or args.dense_frames % 16:
        parser.error("--frames and --dense-frames must be multiples of 16 (whole pre-fill blocks)")

    began = time.perf_counter()
    deadline = began + args.max_seconds
    info = environment(device)
    name = slug(info["device"]) + ("-tiny" if args.tiny else "")
    path = args.out / f"gpu_check-{name}.json"
    result = dict(
        env=info,
        shape="tiny" if args.tiny else "released",
        dtype=str(dtype).removeprefix("torch."),
        settings=dict(vars(args), out=str(args.out)),
        started=datetime.now().isoformat(timespec="seconds"),
        sessions={},
        errors={},
    )

    def save() -> None:
        result["wall_s"] = round(time.perf_counter() - began, 1)
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1, default=str) + "\n")

    def phase(label: str, function, *fargs, reserve: float = 0.0):
        if time.perf_counter() > deadline - reserve:
            print(f"{label}: skipped (out of time)", file=sys.stderr, flush=True)
            return dict(skipped="out of time")
        print(f"{label} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            value = function(*fargs)
        except Exception as err:  # record and go on: one failing phase must not lose the others
            value = dict(error=f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}")
            result["errors"][label] = value["error"]
            if device.type == "cuda":
                gc.collect()
                torch.cuda.empty_cache()
        print(f"{label}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        save()
        return value

    save()
    model, tokenizer = build_model(args, device, dtype)
    result["build_s"] = round(time.perf_counter() - began, 1)
    result["weights_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    with SdpaRecorder() as recorder:
        sessions = result["sessions"]
        for mode, frames in (
            ("chunked", args.frames),
            ("bilevel", args.frames),
            ("dense", args.dense_frames),
        ):
            sessions[mode] = phase(
                f"{mode} session", run_session, model, tokenizer, mode, frames, args, device, dtype, recorder,
                reserve=60,
            )  # fmt: skip
        result["late_block"] = phase(
            "late block",
            late_block,
            model,
            tokenizer,
            args,
            device,
            dtype,
            recorder,
            deadline - 40,
            reserve=40,
        )
    sites = []
    for (site, kind, dt, gqa), record in sorted(recorder.sites.items(), key=lambda kv: kv[0][0]):
        sites.append(
            dict(
                site=site,
                mask=kind if not kind.startswith("tensor") else "tensor",
                dtype=dt,
                enable_gqa=gqa,
                count=record["count"],
                n=record["n"],
                m=record["m"],
                phases=record["phases"],
                example=record["example"],
            )
        )
    result["sdpa"] = sites
    for index, site in enumerate(sites):
        runs = phase(f"sdpa {index + 1}/{len(sites)}", replay, site["example"], device, reserve=-30)
        site["runs"] = runs
    result["fits"] = phase("fits", fits, model, dtype, device, info, sessions, reserve=-math.inf)
    result["table"] = table(result)
    save()
    print(result["table"])
    print(f"wrote {path}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
