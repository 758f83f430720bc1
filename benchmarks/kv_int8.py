"""Memory and speed of the int8 video memory (`kv_dtype="int8"`) against full precision, on CPU, fp32.

Each case runs in a fresh process (so peaks are its own): pre-fill, then one question, then forced decoding.

* `demo`: the bundled demo model, vision included, on a V-NIAH haystack (grey, one needle at half depth,
  1 fps) of `--frames` frames written by `videoxl2.data.synthetic`, per engine mode. Reports the stage
  seconds of `VideoSession.prefill` (`prefill_s`: the LLM part), the answer to the V-NIAH question and its
  seconds, and decode ms per token over 32 forced tokens on the question's cache.
* `small`: random weights at the engine benchmark's small shape (hidden 512, 8 layers, 8/2 heads, head_dim
  64), random visual embeddings of the released layout (144 tokens + time text per 4 frames), chunked
  pre-fill, then decode on the store (dense units) and on a bi-level cache (first, last and top-8 units).

Bytes: the dense video KV (`VideoMemory.dense_bytes`), the sparse KV once built, a question's cache
(`MixedCache.nbytes`, the `kv_bytes` stat). RSS: VmHWM during pre-fill, reset (with malloc_trim) after the
model and inputs were made, less the RSS then (`prefill_rise`).

    python benchmarks/kv_int8.py --case demo --frames 1024 4096
    python benchmarks/kv_int8.py --case small --frames 1024
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import torch
from engine import SHAPES, proc_status, settle_memory  # benchmarks/engine.py

QUESTION = "What was the first shape shown in the video?"  # V-NIAH's
SMALL = SHAPES["small"]
FORCED_TOKENS = 32


def forced_decode(runner, model, cache) -> float:
    """ms per token over `FORCED_TOKENS` fed one at a time (after one warm-up token)."""
    from videoxl2.engine.decode import run_on_cache

    cache.reserve(FORCED_TOKENS + 1)
    run_on_cache(runner, model, cache, torch.tensor([7]))
    begin = time.perf_counter()
    for _ in range(FORCED_TOKENS):
        run_on_cache(runner, model, cache, torch.tensor([7]))
    return (time.perf_counter() - begin) / FORCED_TOKENS * 1e3


@torch.inference_mode()
def run_demo(case: dict) -> dict:
    from videoxl2 import load_model, load_tokenizer
    from videoxl2.defaults import DEFAULT_MODEL
    from videoxl2.engine.decode import run_on_cache
    from videoxl2.engine.session import VideoSession
    from videoxl2.engine.settings import EngineSettings

    model, tokenizer = load_model(DEFAULT_MODEL), load_tokenizer(DEFAULT_MODEL)
    settings = EngineSettings.from_config(model.config, mode=case["mode"], kv_dtype=case["kv_dtype"])
    session = VideoSession.from_path(
        model, tokenizer, case["video"], max_num_frames=case["frames"], settings=settings, progress=False
    )
    out = dict(case, rss_before=settle_memory())
    begin = time.perf_counter()
    memory = session.prefill()
    out.update(prefill_wall_s=time.perf_counter() - begin, peak_rss_prefill=proc_status("VmHWM"))
    out["prefill_rise"] = out["peak_rss_prefill"] - out["rss_before"]
    stats = session.stats
    out.update({k: stats[k] for k in ("video_tokens", "vision_s", "prefill_s", "decode_s") if k in stats})
    answer = session.ask(QUESTION, generation_config={"max_new_tokens": 8})
    out.update(
        answer=answer.text,
        answer_s=answer.stats["answer_s"],
        kv_bytes=answer.stats["kv_bytes"],
        dense_kv_bytes=memory.dense_bytes(),
        sparse_kv_bytes=memory.sparse_bytes(),
    )
    units = [u["index"] for u in answer.stats["units"] if u["dense"]]
    question = session.question_ids(QUESTION)
    dense = None if case["mode"] != "bilevel" else units
    rerotate = settings.rerotate and dense is not None
    reserve = question.numel() + FORCED_TOKENS + 1
    with memory.question_cache(session.runner, dense, rerotate=rerotate, reserve=reserve) as cache:
        run_on_cache(session.runner, model, cache, question)
        out["decode_ms_per_token"] = forced_decode(session.runner, model, cache)
    return out


@torch.inference_mode()
def run_small(case: dict) -> dict:
    from videoxl2.engine.decode import run_on_cache
    from videoxl2.engine.memory import VideoMemory
    from videoxl2.engine.prefill import prefill_video
    from videoxl2.engine.select import choose_units, score_units
    from videoxl2.prompt import IMAGE_MARKER, build_layout, build_prompt
    from videoxl2.tiny import build_tiny_model
    from videoxl2.tokenizer import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    text = dict(SMALL, max_position_embeddings=1 << 18, rope_theta=1e6)
    model, _ = build_tiny_model(0, tokenizer, text=text, vision_grid=24, pool_stride=2)
    prefix = build_prompt(QUESTION).split(IMAGE_MARKER)[0] + IMAGE_MARKER
    seconds = [4.0 * g for g in range(case["frames"] // 4)]
    layout = build_layout(tokenizer, prefix, seconds, 144, tokenizer.convert_tokens_to_ids("<|vision_pad|>"))
    generator = torch.Generator().manual_seed(1)
    groups = case["frames"] // 4

    def batches():
        for start in range(0, groups, 16):
            yield torch.randn(min(16, groups - start), 144, SMALL["hidden_size"], generator=generator)

    out = dict(case, video_tokens=layout.video_end, rss_before=settle_memory())
    begin = time.perf_counter()
    run = prefill_video(model, layout, batches(), True, 4, 3, kv_dtype=case["kv_dtype"])
    out.update(prefill_s=time.perf_counter() - begin, peak_rss_prefill=proc_status("VmHWM"))
    out["prefill_rise"] = out["peak_rss_prefill"] - out["rss_before"]
    memory = VideoMemory.from_store(run.store, layout, run.runner, 4, 4)
    out["dense_kv_bytes"] = memory.dense_bytes()
    suffix = build_prompt(QUESTION).split(IMAGE_MARKER, 1)[1]
    question = torch.tensor(tokenizer(suffix, add_special_tokens=False)["input_ids"])
    reserve = question.numel() + FORCED_TOKENS + 1
    with memory.question_cache(run.runner, None, reserve=reserve) as cache:
        begin = time.perf_counter()
        run_on_cache(run.runner, model, cache, question)
        out["dense_first_token_s"] = time.perf_counter() - begin
        out["dense_decode_ms_per_token"] = forced_decode(run.runner, model, cache)
    begin = time.perf_counter()
    units = choose_units(score_units(model, memory, question), 8)
    mixed = memory.assemble(run.runner, units, rerotate=True, reserve=reserve)
    out["bilevel_kv_bytes"] = mixed.nbytes()  # the video's share, before the question
    run_on_cache(run.runner, model, mixed, question)
    out["bilevel_first_token_s"] = time.perf_counter() - begin
    out["sparse_kv_bytes"] = memory.sparse_bytes()
    out["bilevel_decode_ms_per_token"] = forced_decode(run.runner, model, mixed)
    return out


def worker(case: dict) -> dict:
    torch.set_num_threads(case["threads"])
    return run_demo(case) if case["case"] == "demo" else run_small(case)


def haystack(frames: int, folder: Path) -> str:
    from videoxl2.data.synthetic import Needle, needle_haystack_spec, write_video

    spec = needle_haystack_spec(frames, 0.5, Needle("red", "circle", 0), 1.0, seed=frames)
    return str(write_video(spec, folder / f"haystack-{frames}.mp4"))


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            return next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=["demo", "small"], default="demo")
    parser.add_argument("--frames", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--modes", default="dense,chunked,bilevel")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "kv-int8")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for frames in args.frames:
            video = haystack(frames, Path(scratch)) if args.case == "demo" else None
            modes = args.modes.split(",") if args.case == "demo" else ["chunked"]
            for mode in modes:
                for kv_dtype in ("auto", "int8"):
                    case = dict(case=args.case, frames=frames, mode=mode, kv_dtype=kv_dtype,
                                threads=args.threads, video=video)  # fmt: skip
                    done = subprocess.run(
                        [sys.executable, __file__, "--worker", json.dumps(case)],
                        capture_output=True, text=True, env=dict(os.environ, TQDM_DISABLE="1"),
                    )  # fmt: skip
                    if done.returncode:
                        raise SystemExit(done.stderr[-3000:])
                    row = json.loads(done.stdout.strip().splitlines()[-1])
                    row.pop("video", None)
                    rows.append(row)
                    print(json.dumps(row))
    stamp = datetime.now().strftime("%Y%m%d-%H%M")
    machine = dict(cpu=cpu_name(), threads=args.threads, torch=torch.__version__)
    path = args.out / f"kv-int8-{args.case}-{stamp}.json"
    path.write_text(json.dumps(dict(machine=machine, rows=rows), indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
