"""Pre-fill and decode cost of the long-video engine against the dense baselines (random models, fp32 CPU).

For N frames (N/4 groups of `Time {t}s:` tokens + 144 visual tokens, the released layout) it measures the
pre-fill of the same prefix + video tokens three ways:

* plain   - one dense causal forward (`reference_forward(mask=None)`: SDPA with is_causal);
* masked  - the dense-mask reference (`reference_forward` with the L x L `chunk_visibility` mask, whose
            construction is timed too): what the release computes; the mask hides pairs but SDPA still
            multiplies every query by every key;
* chunked - our streaming chunked pre-fill (`prefill_video`: blocks of 4 groups see 3 earlier blocks; fed in
            batches of 4 blocks as the session streams them, embeddings made batch by batch),

and reports seconds, peak RSS (each case runs in a fresh subprocess; "working" = peak minus the RSS after
the model was built and the inputs made) and attention FLOPs. From the chunked pre-fill's VideoMemory it then
times greedy decoding on the dense cache and on the bi-level cache (first + last + top-8 units by the
model's own attention-mass scores dense, the rest pooled 4x), with their KV bytes.

FLOP convention: a (query, key) pair costs 4 * head_dim FLOPs per head and layer (QK^T and PV, 2 per
multiply-add). Kernel pairs are those handed to the attention kernels: plain = the causal triangle
L(L+1)/2 (is_causal skips the upper half), masked = all L^2 pairs (a boolean mask saves no work), chunked =
its PrefillStats (lower-right causal calls per group: the causal halves are skipped, so this equals the
visible pairs; before the calls were mask-free it was the gathered rectangles). Visible pairs = the mask's
true entries, the work an ideal kernel would do. A case whose estimated time or memory is over the budget is
skipped, with the reason; estimates extrapolate the same method's largest measured case (time by FLOPs,
memory linearly, or by L^2 for the masked reference).

The visual path is not run: random group embeddings go straight into the LLM. The layout is the session's
(prefix + video; the question's tokens run at decode), so all three pre-fill exactly the same tokens. The
vocabulary is the tiny tokenizer's 512 ids for both shapes: the vocab does not change pre-fill attention.

`--question-memory` measures instead what asking costs in memory after a pre-fill, per engine mode (dense,
chunked; each in a fresh process): the RSS of the pre-filled session (the dense KV and the model), then the
peak RSS while a question is answered (16 tokens) on the pre-fill store itself, as sessions do, a second
time, and, for contrast, on a copy of the video KV (`VideoMemory.assemble`, what every dense or chunked
question did before); in chunked mode also a bi-level question (its sparse KV built on first need plus its
assembled cache). Peaks come from VmHWM, reset before each question (`/proc/self/clear_refs`), after
`malloc_trim`. Rises are against the pre-filled session's RSS and shown as a share of the video KV bytes.

    python benchmarks/engine.py --quick --shape small
    python benchmarks/engine.py --frames 64 256 1024 4096 --shape both
    python benchmarks/engine.py --question-memory --frames 1024
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import torch

QUESTION = "What happens in the video?"
SHAPES = {  # Qwen2 LLM geometry; qwen0.5b is Qwen2.5-0.5B's
    "small": dict(
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=1408,
    ),
    "qwen0.5b": dict(
        hidden_size=896,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        intermediate_size=4864,
    ),
}
MAX_FRAMES = {"qwen0.5b": 256}  # the 0.5B shape only up to 256 frames
METHODS = ("plain", "masked", "chunked")
SETTINGS = dict(
    block_size=4, prev_blocks=3, batch_blocks=4, unit_size=4, compression=4, topk=8, new_tokens=16, seed=0
)
DEFAULT_RATE = {"plain": 60e9, "masked": 30e9, "chunked": 40e9}  # FLOP/s, until a smaller N is measured
MASK_BYTES_PER_PAIR = 10  # masked working memory per L^2 pair, until a smaller N is measured
GIB = 1 << 30


# -- shared by driver and workers -------------------------------------------------------------------------
def build_layout_for(frames: int, tokenizer=None):
    """The session's layout: prefix + video at 1 fps timestamps (the question comes at decode)."""
    from videoxl2.prompt import IMAGE_MARKER, build_layout, build_prompt
    from videoxl2.tokenizer import build_tiny_tokenizer

    tokenizer = tokenizer or build_tiny_tokenizer()
    prefix = build_prompt(QUESTION).split(IMAGE_MARKER)[0] + IMAGE_MARKER
    seconds = [4 * g / 1.0 for g in range(frames // 4)]
    return build_layout(tokenizer, prefix, seconds, 144, tokenizer.convert_tokens_to_ids("<|vision_pad|>"))


def visible_pairs(layout, block_size: int, prev_blocks: int) -> int:
    """True entries of `chunk_visibility(layout, ...)`, counted without building the L x L mask."""
    from videoxl2.engine.reference import token_blocks

    pos = torch.arange(layout.length)
    time_mask, visual = layout.time_mask(), layout.visual_mask()
    block_starts = torch.tensor([g.time_start for g in layout.groups[::block_size]])
    window = block_starts[(token_blocks(layout, block_size)[visual] - prev_blocks).clamp(min=0)]
    time_before = time_mask.long().cumsum(0) - time_mask.long()
    seen = layout.video_start + time_before[window] + pos[visual] - window + 1
    return int((pos[~visual] + 1).sum() + seen.sum())


def pair_flops(shape: dict) -> int:
    return 4 * shape["hidden_size"] * shape["num_hidden_layers"]  # 4 * head_dim * heads * layers


def linear_flops(shape: dict, tokens: int, vocab: int) -> int:
    """Projections, MLP and LM head of `tokens` tokens (the reference computes logits for all of them)."""
    h, i = shape["hidden_size"], shape["intermediate_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    return 2 * tokens * (shape["num_hidden_layers"] * (2 * h * h + 2 * h * kv + 3 * h * i) + h * vocab)


def kernel_pairs(method: str, tokens: int, visible: int) -> int:
    """Pairs handed to the attention kernels (for chunked, before measuring: the visible pairs)."""
    return {"plain": tokens * (tokens + 1) // 2, "masked": tokens * tokens, "chunked": visible}[method]


# -- one case, in a fresh process -------------------------------------------------------------------------
def group_batches(frames: int, hidden: int, seed: int, groups_per_batch: int):
    """Random visual embeddings (G, 144, H), made batch by batch as the session streams them."""
    generator = torch.Generator().manual_seed(seed + 1)
    groups = frames // 4
    for start in range(0, groups, groups_per_batch):
        yield torch.randn(min(groups_per_batch, groups - start), 144, hidden, generator=generator)


def time_answer(model, tokenizer, mixed, question_ids) -> dict:
    """Answer from an assembled cache: time to the first token, then ms per token fed back (LLM calls are
    time-stamped by a hook on the final norm, which each LLM call ends with: the first call runs the
    question, each later one a generated token)."""
    from videoxl2.engine.decode import answer_from_cache
    from videoxl2.generation import GenerationSettings

    settings = GenerationSettings(max_new_tokens=SETTINGS["new_tokens"], stop_strings=())
    starts: list[float] = []
    kv_tokens, kv_bytes = mixed.length, mixed.nbytes()  # the video's share, before the question is appended
    hook = model.llm.norm.register_forward_hook(lambda *_: starts.append(time.perf_counter()))
    begin = time.perf_counter()
    try:
        ids = answer_from_cache(model, tokenizer, mixed, question_ids, settings)
    finally:
        hook.remove()
    steps = len(starts) - 1
    return dict(
        kv_tokens=kv_tokens,
        kv_bytes=kv_bytes,
        new_tokens=len(ids),
        decode_steps=steps,
        first_token_s=starts[0] - begin,
        ms_per_token=(starts[-1] - starts[0]) / steps * 1e3 if steps else None,
    )


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


@torch.inference_mode()
def run_case(case: dict) -> dict:
    from videoxl2.engine.memory import VideoMemory
    from videoxl2.engine.prefill import prefill_video
    from videoxl2.engine.reference import chunk_visibility, reference_forward
    from videoxl2.engine.select import choose_units, score_units
    from videoxl2.prompt import IMAGE_MARKER, build_prompt
    from videoxl2.tiny import build_tiny_model
    from videoxl2.tokenizer import build_tiny_tokenizer

    torch.set_num_threads(case["threads"])
    s, shape, method = SETTINGS, SHAPES[case["shape"]], case["method"]
    tokenizer = build_tiny_tokenizer()
    text = dict(shape, max_position_embeddings=1 << 18, rope_theta=1e6)
    model, _ = build_tiny_model(s["seed"], tokenizer, text=text, vision_grid=24, pool_stride=2)
    assert model.config.tokens_per_group == 144, model.config.tokens_per_group
    layout = build_layout_for(case["frames"], tokenizer)
    embeds = group_batches(
        case["frames"], shape["hidden_size"], s["seed"], s["block_size"] * s["batch_blocks"]
    )
    if method != "chunked":
        embeds = torch.cat(list(embeds))
    gc.collect()
    out = dict(case, tokens=layout.length, rss_after_model=rss_bytes())
    start = time.perf_counter()
    if method == "chunked":
        prefill = prefill_video(model, layout, embeds, True, s["block_size"], s["prev_blocks"])
        out.update(kernel_pairs=prefill.stats.attention_pairs, dense_pairs=prefill.stats.dense_pairs)
    else:
        mask = None
        if method == "masked":  # building the mask is part of the reference's cost
            mask = chunk_visibility(layout, s["block_size"], s["prev_blocks"])
            out["mask_s"] = time.perf_counter() - start
            out["mask_true_pairs"] = int(torch.count_nonzero(mask))  # not timed
            start = time.perf_counter() - out["mask_s"]
        result = reference_forward(model, layout, embeds, mask)
    out["prefill_s"] = time.perf_counter() - start
    out["peak_rss"] = peak_rss_bytes()
    out["working_rss"] = out["peak_rss"] - out["rss_after_model"]
    if method != "chunked":
        del result, mask
        return out

    start = time.perf_counter()
    memory = VideoMemory.from_store(prefill.store, layout, prefill.runner, s["unit_size"], s["compression"])
    memory.build_sparse(prefill.runner)  # what the first bi-level question does
    out.update(memory_s=time.perf_counter() - start, sparse_kv_bytes=memory.sparse_bytes())
    suffix = build_prompt(QUESTION).split(IMAGE_MARKER, 1)[1]
    question = torch.tensor(tokenizer(suffix, add_special_tokens=False)["input_ids"])
    # Warm-up: the first decode and scoring calls pay one-off kernel and allocator costs.
    score_units(model, memory, question)
    time_answer(model, tokenizer, memory.assemble(prefill.runner, [0], rerotate=True), question)
    with memory.question_cache(prefill.runner, None, rerotate=False, reserve=256) as dense:
        out["dense"] = time_answer(model, tokenizer, dense, question)
    start = time.perf_counter()
    units = choose_units(score_units(model, memory, question), s["topk"])
    out.update(select_s=time.perf_counter() - start, dense_units=len(units), units=memory.num_units)
    out["bilevel"] = time_answer(
        model, tokenizer, memory.assemble(prefill.runner, units, rerotate=True), question
    )
    out["peak_rss_with_decode"] = peak_rss_bytes()
    return out


def proc_status(field: str) -> int:
    """A kB field of /proc/self/status (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def settle_memory() -> int:
    """Collect garbage, give free heap back to the system, reset the peak (VmHWM); returns VmRSS."""
    import ctypes

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return proc_status("VmRSS")


@torch.inference_mode()
def run_question_memory(case: dict) -> dict:
    """Peak RSS while asking after a pre-fill (see `--question-memory` in the module notes)."""
    from videoxl2.engine.decode import answer_from_cache
    from videoxl2.engine.memory import VideoMemory
    from videoxl2.engine.prefill import StreamingPrefill
    from videoxl2.engine.select import choose_units, score_units
    from videoxl2.generation import GenerationSettings
    from videoxl2.prompt import IMAGE_MARKER, build_prompt
    from videoxl2.tiny import build_tiny_model
    from videoxl2.tokenizer import build_tiny_tokenizer

    torch.set_num_threads(case["threads"])
    s, shape, mode = SETTINGS, SHAPES[case["shape"]], case["mode"]
    tokenizer = build_tiny_tokenizer()
    text = dict(shape, max_position_embeddings=1 << 18, rope_theta=1e6)
    model, _ = build_tiny_model(s["seed"], tokenizer, text=text, vision_grid=24, pool_stride=2)
    layout = build_layout_for(case["frames"], tokenizer)
    out = dict(case, tokens=layout.length)
    start = time.perf_counter()
    prefill = StreamingPrefill(model, layout, mode == "chunked", s["block_size"], s["prev_blocks"])
    prefill.run_prefix()
    groups = s["block_size"] * s["batch_blocks"]
    for embeds in group_batches(case["frames"], shape["hidden_size"], s["seed"], groups):
        prefill.add_groups(embeds)
    runner = prefill.runner
    memory = VideoMemory.from_store(prefill.store, layout, runner, s["unit_size"], s["compression"])
    out["prefill_s"] = time.perf_counter() - start
    out["peak_rss_prefill"] = proc_status("VmHWM")
    del prefill
    out.update(
        video_kv_bytes=memory.dense_bytes(),
        sparse_kv_bytes_held=memory.sparse_bytes(),
        sparse_kv_bytes_if_built=memory.sparse_size_bytes(),
        spare_tokens=memory.spare,
    )
    suffix = build_prompt(QUESTION).split(IMAGE_MARKER, 1)[1]
    question = torch.tensor(tokenizer(suffix, add_special_tokens=False)["input_ids"])
    settings = GenerationSettings(max_new_tokens=s["new_tokens"], stop_strings=())
    reserve = question.numel() + s["new_tokens"]
    rss_prefilled = out["rss_prefilled"] = settle_memory()

    def in_place():
        with memory.question_cache(runner, None, rerotate=False, reserve=reserve) as mixed:
            shared = mixed.keys[0].untyped_storage().data_ptr() == memory.keys[0].untyped_storage().data_ptr()
            return answer_from_cache(model, tokenizer, mixed, question, settings), shared

    def copy():
        mixed = memory.assemble(runner, None, rerotate=False, reserve=reserve)
        return answer_from_cache(model, tokenizer, mixed, question, settings), False

    def bilevel():
        units = choose_units(score_units(model, memory, question), s["topk"])
        mixed = memory.assemble(runner, units, rerotate=True, reserve=reserve)
        return answer_from_cache(model, tokenizer, mixed, question, settings), False

    asks = [("in place", in_place), ("in place again", in_place), ("copy (assemble)", copy)]
    if mode == "chunked":
        asks.append(("bi-level", bilevel))
    out["questions"] = []
    for name, ask in asks:
        before = settle_memory()
        begin = time.perf_counter()
        ids, shared = ask()
        peak = proc_status("VmHWM")
        out["questions"].append(
            dict(
                name=name,
                seconds=time.perf_counter() - begin,
                new_tokens=len(ids),
                runs_on_store=shared,
                rss_before=before,
                peak_rss=peak,
                rise_over_prefilled=peak - rss_prefilled,
                rise_share_of_video_kv=(peak - rss_prefilled) / out["video_kv_bytes"],
                sparse_kv_bytes_held_after=memory.sparse_bytes(),
            )
        )
    return out


def question_memory_report(rows: list[dict], threads: int) -> str:
    lines = [
        "Peak RSS while answering one question (16 tokens) after pre-filling, against the pre-filled "
        f"session's RSS (small shape, fp32 CPU, {threads} threads). Video KV = the dense KV of prefix + "
        "video.",
        "",
        "| mode | frames | video KV MiB | pre-filled RSS MiB | question | on the store | peak MiB "
        "| rise MiB | rise / video KV | sparse KV held MiB |",
        "|---|---:|---:|---:|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['mode']} | {r['frames']} | failed: {r['failed']} |")
            continue
        for q in r["questions"]:
            mib = lambda x: x / 2**20  # noqa: E731
            lines.append(
                f"| {r['mode']} | {r['frames']} | {mib(r['video_kv_bytes']):.1f} "
                f"| {mib(r['rss_prefilled']):.1f} | {q['name']} | {'yes' if q['runs_on_store'] else 'no'} "
                f"| {mib(q['peak_rss']):.1f} | {mib(q['rise_over_prefilled']):+.1f} "
                f"| {100 * q['rise_share_of_video_kv']:+.1f}% | {mib(q['sparse_kv_bytes_held_after']):.1f} |"
            )
    return "\n".join(lines)


def question_memory_main(args, machine: dict, stamp: str) -> None:
    rows = []
    for frames in sorted(set(args.frames)):
        for mode in ("dense", "chunked"):
            case = dict(kind="question_memory", shape="small", frames=frames, mode=mode, threads=args.threads)
            print(f"[question memory] {frames} frames {mode} ...", file=sys.stderr, flush=True)
            rows.append(run_worker(case, 3600))
    table = question_memory_report(rows, args.threads)
    print(table + "\n", flush=True)
    record = dict(
        kind="question_memory",
        shape="small",
        config=SHAPES["small"],
        machine=machine,
        settings=SETTINGS,
        notes=__doc__.split("\n\n")[6],
        results=rows,
        table=table,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"engine-question-memory-small-{stamp}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}", file=sys.stderr)


def run_worker(case: dict, timeout: float) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(case["threads"]), MKL_NUM_THREADS=str(case["threads"]))
    command = [sys.executable, __file__, "--worker", json.dumps(case)]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(case, failed=f"killed after {timeout:.0f} s (the estimate was far off)")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return dict(case, failed=f"worker exit {proc.returncode}: {' | '.join(tail)}")
    return json.loads(lines[-1][len("RESULT ") :])


# -- the driver -------------------------------------------------------------------------------------------
def cpu_name() -> str:
    with open("/proc/cpuinfo") as handle:
        names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
    return names[0] if names else platform.machine()


def available_memory() -> int:
    with open("/proc/meminfo") as handle:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in handle}
    return info.get("MemAvailable", info["MemTotal"])


def estimate(case: dict, tokens: int, visible: int, vocab: int, done: list[dict]) -> tuple[float, float]:
    """(seconds, working bytes), from the same method's largest measured case, else from rough rates."""
    shape, method = SHAPES[case["shape"]], case["method"]
    flops = pair_flops(shape) * kernel_pairs(method, tokens, visible) + linear_flops(shape, tokens, vocab)
    prior = [r for r in done if r["method"] == method and "prefill_s" in r]
    if not prior:
        h, i, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
        per_token = 4 * (2 * layers * h + 6 * i + vocab)
        working = MASK_BYTES_PER_PAIR * tokens**2 if method == "masked" else per_token * tokens
        return flops / DEFAULT_RATE[method], working
    last = max(prior, key=lambda r: r["tokens"])
    grow = (tokens / last["tokens"]) ** (2 if method == "masked" else 1)
    return flops * last["prefill_s"] / last["total_flops"], last["working_rss"] * grow


def skip_reason(seconds: float, working: float, args) -> str | None:
    if working > args.max_memory:
        return f"needs ~{working / GIB:.0f} GiB working memory, over the {args.max_memory / GIB:.0f} GiB cap"
    if seconds > args.max_seconds_per_case:
        return f"estimated {seconds:.0f} s, over --max-seconds-per-case {args.max_seconds_per_case:.0f}"
    return None


def run_shape(shape_name: str, frames: list[int], methods: list[str], args, tokenizer) -> list[dict]:
    shape, rows = SHAPES[shape_name], []
    for n in [n for n in frames if n <= MAX_FRAMES.get(shape_name, n)]:
        layout = build_layout_for(n, tokenizer)
        tokens = layout.length
        visible = visible_pairs(layout, SETTINGS["block_size"], SETTINGS["prev_blocks"])
        for method in methods:
            case = dict(shape=shape_name, frames=n, method=method, threads=args.threads)
            seconds, working = estimate(case, tokens, visible, len(tokenizer), rows)
            info = dict(tokens=tokens, visible_pairs=visible, visible_flops=visible * pair_flops(shape))
            info.update(estimated_s=round(seconds, 1), estimated_working_bytes=int(working))
            if method != "chunked":  # analytic, run or not
                info["kernel_pairs"] = kernel_pairs(method, tokens, visible)
                info["attention_flops"] = info["kernel_pairs"] * pair_flops(shape)
            label = f"[{shape_name}] {n:5d} frames {method:7s}:"
            reason = skip_reason(seconds, working, args)
            if reason:
                rows.append(dict(case, **info, skipped=reason))
                print(f"{label} skipped ({reason})", file=sys.stderr)
                continue
            print(f"{label} running (estimate {seconds:.0f} s) ...", end="", file=sys.stderr, flush=True)
            wall = time.perf_counter()
            row = dict(info, **run_worker(case, 3 * args.max_seconds_per_case + 300))
            row["case_wall_s"] = round(time.perf_counter() - wall, 1)
            if "failed" in row:
                print(f" FAILED: {row['failed']}", file=sys.stderr)
            else:
                row["attention_flops"] = row["kernel_pairs"] * pair_flops(shape)
                row["total_flops"] = row["attention_flops"] + linear_flops(shape, tokens, len(tokenizer))
                print(
                    f" {row['prefill_s']:.2f} s, peak {row['peak_rss'] / GIB:.2f} GiB "
                    f"(working {row['working_rss'] / GIB:.2f}); case took {row['case_wall_s']} s",
                    file=sys.stderr,
                )
            rows.append(row)
    return rows


def ratio(a, b) -> str:
    return f"{a / b:.1f}x" if a and b else "-"


def table_rows(cells: list[list]) -> list[str]:
    return ["| " + " | ".join(map(str, row)) + " |" for row in cells]


def report(shape_name: str, rows: list[dict], threads: int) -> str:
    shape = SHAPES[shape_name]
    by = {(r["frames"], r["method"]): r for r in rows}
    frames = sorted({r["frames"] for r in rows})

    def get(n, method, key):
        return by.get((n, method), {}).get(key)

    def fmt(value, spec=".2f", scale=1.0):
        return "-" if value is None else f"{value / scale:{spec}}"

    def cell(n, method, key, spec=".2f", scale=1.0):
        """The value, else why not: "skip" (over budget), "fail", "-" (not asked for)."""
        row = by.get((n, method), {})
        return "skip" if "skipped" in row else "fail" if "failed" in row else fmt(row.get(key), spec, scale)

    prefill, flops, decode = [], [], []
    for n in frames:
        first = next(r for r in rows if r["frames"] == n)
        t = {m: get(n, m, "prefill_s") for m in METHODS}
        peak = {m: get(n, m, "peak_rss") for m in METHODS}
        work = {m: get(n, m, "working_rss") for m in METHODS}
        prefill.append(
            [n, f"{first['tokens']:,}"]
            + [cell(n, m, "prefill_s") for m in METHODS]
            + [f"{cell(n, m, 'peak_rss', scale=GIB)} ({fmt(work[m], scale=GIB)})" for m in METHODS]
            + [ratio(t[m], t["chunked"]) for m in ("masked", "plain")]
            + [
                f"{ratio(peak[m], peak['chunked'])} ({ratio(work[m], work['chunked'])})"
                for m in ("masked", "plain")
            ]
        )
        f = {m: kernel_pairs(m, first["tokens"], first["visible_pairs"]) * pair_flops(shape) for m in METHODS}
        f["chunked"] = get(n, "chunked", "attention_flops")
        flops.append(
            [n]
            + [fmt(f[m], scale=1e12) for m in METHODS]
            + [fmt(first["visible_flops"], scale=1e12)]
            + [fmt(f["chunked"] / f[m], ".3f") if f["chunked"] else "-" for m in ("plain", "masked")]
        )
        r = by.get((n, "chunked"), {})
        if "dense" in r:
            d, b = r["dense"], r["bilevel"]
            decode.append(
                [
                    n,
                    fmt(d["kv_bytes"], ".1f", 2**20),
                    fmt(b["kv_bytes"], ".1f", 2**20),
                    f"{r['dense_units']}/{r['units']}",
                ]
                + [fmt(x["ms_per_token"], ".1f") for x in (d, b)]
                + [f"{d['first_token_s']:.3f} / {b['first_token_s']:.3f}", f"{r['select_s']:.3f}"]
                + [f"{d['new_tokens']} / {b['new_tokens']}"]
            )
    lines = [
        f"## {shape_name}: hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers, "
        f"{shape['num_attention_heads']} heads ({shape['num_key_value_heads']} KV), "
        f"MLP {shape['intermediate_size']}; fp32 CPU, {threads} threads; vocab 512, the tiny tokenizer's"
        + (" (Qwen2.5: 151,936)" if shape_name == "qwen0.5b" else "")
        + ": the vocab does not affect pre-fill attention",
        "",
        "Pre-fill seconds and peak RSS GiB (working = peak - RSS after model build). Ratios against this"
        " run's masked and plain: speedup = t_ref / t_chunked, memory = peak_ref / peak_chunked (working in"
        " brackets).",
        "",
        "| frames | tokens | plain s | masked s | chunked s | plain GiB | masked GiB | chunked GiB "
        "| speedup vs masked | vs plain | memory vs masked | vs plain |",
        "|" + "---:|" * 12,
        *table_rows(prefill),
        "",
        "Attention TFLOP: kernel pairs (plain L(L+1)/2, masked L^2: analytic, run or not; chunked: measured)"
        " x 4 * head_dim * heads * layers; visible = the mask's true pairs (ideal).",
        "",
        "| frames | plain | masked | chunked | visible | chunked / plain | chunked / masked |",
        "|" + "---:|" * 7,
        *table_rows(flops),
    ]
    if decode:
        lines += [
            "",
            f"Decode from the chunked memory: greedy, at most {SETTINGS['new_tokens']} tokens (EOS may end"
            " it earlier); ms/token = time after the first token / tokens fed back. Bi-level: first, last and"
            " top-8 units (4 groups) dense, the rest pooled 4x, re-rotated; dense: all units, original"
            " positions.",
            "",
            "| frames | dense KV MiB | bi-level KV MiB | dense units | dense ms/tok | bi-level ms/tok "
            "| first token s (dense / bi-level) | select s | tokens (dense / bi-level) |",
            "|" + "---:|" * 9,
            *table_rows(decode),
        ]
    missing = [r for r in rows if "skipped" in r or "failed" in r]
    if missing:
        lines += ["", "Not measured:"]
        lines += [
            f"- {r['frames']} frames {r['method']}: {r.get('skipped') or r.get('failed')}" for r in missing
        ]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[64, 256, 1024, 4096])
    parser.add_argument("--shape", choices=["small", "qwen0.5b", "both"], default="small")
    parser.add_argument("--quick", action="store_true", help="frames 64 256 only")
    parser.add_argument("--skip-plain", action="store_true", help="do not run the plain dense causal forward")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="default: all")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every case")
    parser.add_argument("--max-seconds-per-case", type=float, default=900, help="skip longer estimates")
    parser.add_argument(
        "--max-memory-gb", type=float, help="skip larger estimates (default 85%% of MemAvailable)"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument(
        "--question-memory", action="store_true", help="peak RSS of asking after pre-fill (dense, chunked)"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        case = json.loads(args.worker)
        run = run_question_memory if case.get("kind") == "question_memory" else run_case
        print("RESULT " + json.dumps(run(case)), flush=True)
        return
    import transformers

    from videoxl2.tokenizer import build_tiny_tokenizer

    frames = [64, 256] if args.quick else sorted(set(args.frames))
    if any(n < 4 or n % 4 for n in frames):
        parser.error("frames must be positive multiples of 4")
    args.max_memory = args.max_memory_gb * GIB if args.max_memory_gb else 0.85 * available_memory()
    methods = [m for m in METHODS if m in args.methods and not (args.skip_plain and m == "plain")]
    if not methods:
        parser.error("no method left to run")
    tokenizer = build_tiny_tokenizer()
    stamp = datetime.now().strftime("%Y%m%d-%H%M")
    machine = dict(
        cpu_count=os.cpu_count(),
        cpu=cpu_name(),
        threads=args.threads,
        torch=torch.__version__,
        transformers=transformers.__version__,
        python=platform.python_version(),
        device="cpu",
        dtype="float32",
    )
    if args.question_memory:
        question_memory_main(args, machine, stamp)
        return
    for shape_name in ["small", "qwen0.5b"] if args.shape == "both" else [args.shape]:
        rows = run_shape(shape_name, frames, methods, args, tokenizer)
        table = report(shape_name, rows, args.threads)
        print(table + "\n", flush=True)
        record = dict(
            shape=shape_name,
            config=SHAPES[shape_name],
            vocab=len(tokenizer),
            machine=machine,
            settings=dict(
                SETTINGS,
                max_seconds_per_case=args.max_seconds_per_case,
                max_memory_bytes=int(args.max_memory),
            ),
            notes=__doc__.split("\n\n")[1:6],
            results=rows,
            table=table,
        )
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"engine-{shape_name}-{stamp}.json"
        path.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
