"""`videoxl2 eval BENCH --data-root DIR --model PATH --out DIR`: one summary line at the end (progress on
stderr while it runs). Under `torchrun` / `accelerate launch` every process answers its share and the
first one merges and prints."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..cli import _add_engine_args, _add_placement_args, _add_quantize_args
    from .benchmarks import BENCHMARKS, PROTOCOLS
    from .runner import DEFAULT_MODEL
    from .videomme import DURATIONS

    names = ", ".join(f"{b.name} ({b.max_frames})" for b in BENCHMARKS.values())
    parser.add_argument("benchmark", choices=sorted(BENCHMARKS), help="which benchmark")
    parser.add_argument(
        "--data-root", required=True, help="the benchmark's files as published (see docs/evaluation.md)"
    )
    parser.add_argument(
        "--out", required=True, help="folder for samples.jsonl, results.json and resume state"
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint folder (default: the demo model)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (each process takes its LOCAL_RANK GPU)")
    parser.add_argument(
        "--dtype", default=None, help="float32 (CPU default), bfloat16 (GPU default), float16"
    )
    _add_quantize_args(parser)
    _add_placement_args(parser)
    _add_engine_args(parser)
    parser.add_argument(
        "--max-frames", type=int, default=None, help=f"frame budget; default the release's: {names}"
    )
    parser.add_argument("--fps", type=float, default=1.0, help="sampling rate, frames per second (default 1)")
    parser.add_argument(
        "--max-fps",
        type=float,
        default=4.0,
        help="raise the rate up to this for short videos (default 4; 0: off)",
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=None, help="answer length (default: the harness's)"
    )
    parser.add_argument(
        "--protocol",
        choices=[p for p in PROTOCOLS if p != "exact"],
        default=None,
        help="prompts, answer extraction and input rules: release (default; the published numbers: frames "
        "cut to a multiple of 4, the release's mm:ss rewrite) or lmms-eval (0.7.3)",
    )
    parser.add_argument("--subset", choices=DURATIONS, default=None, help="videomme: one duration only")
    parser.add_argument("--subtitles", action="store_true", help="videomme: put the subtitles in the prompt")
    parser.add_argument(
        "--annotations", default=None, help="annotation file, when not found under --data-root"
    )
    parser.add_argument("--limit", type=int, default=None, help="only the first N questions")
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in --out, skipping answered ones"
    )
    parser.add_argument("--overwrite", action="store_true", help="discard an earlier run in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from ..cli import _engine_overrides, _weight_kwargs
    from .benchmarks import Options
    from .runner import EvalSettings, run_eval

    settings = EvalSettings(
        benchmark=args.benchmark,
        data_root=Path(args.data_root),
        out=Path(args.out),
        model=args.model,
        options=Options(args.protocol, args.subset, args.subtitles, args.annotations),
        max_frames=args.max_frames,
        fps=args.fps,
        max_fps=args.max_fps if args.max_fps and args.max_fps > 0 else None,
        max_new_tokens=args.max_new_tokens,
        engine={k: v for k, v in _engine_overrides(args).items() if v is not None},
        device=args.device,
        dtype=args.dtype,
        **_weight_kwargs(args),
        limit=args.limit,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        decode_threads=args.decode_threads,
        decode_workers=args.decode_workers,
    )
    results = run_eval(settings)
    if results is not None:
        metrics, config = results["metrics"], results["settings"]
        where = Path(args.out) / "results.json"
        print(
            f"{results['benchmark']} ({config['protocol']}): {metrics['score_name']} {metrics['score']:.2f} "
            f"on {results['answered']} questions ({results['errors']} errors) -> {where}"
        )
    return 0


COMMANDS = {"eval": ("evaluate a model on a benchmark (Video-MME, MLVU, ...)", add_arguments, run)}
