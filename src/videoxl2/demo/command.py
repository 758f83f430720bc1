"""`videoxl2 demo` and `videoxl2 niah`, both on the bundled demo model unless --model says otherwise."""

from __future__ import annotations

import argparse


def _model_args(parser: argparse.ArgumentParser) -> None:
    from ..defaults import DEFAULT_MODEL

    parser.add_argument(
        "--model", default=str(DEFAULT_MODEL), help="checkpoint folder (default: the demo model)"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    from ..cli import _add_quantize_args

    _add_quantize_args(parser)


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    _model_args(parser)
    parser.add_argument("--out", default="videoxl2-demo", help="folder for the video and timeline PNGs")
    parser.add_argument(
        "--frames",
        type=int,
        default=96,
        help="video length in frames (default 96: the demo model's training length)",
    )
    parser.add_argument("--fps", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mode", choices=["dense", "chunked", "bilevel"], default="bilevel")


def run_demo(args) -> int:
    from .run import main

    return main(args)


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from err


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err


def add_niah_arguments(parser: argparse.ArgumentParser) -> None:
    _model_args(parser)
    parser.add_argument("--out", default="videoxl2-niah", help="folder for niah.json and the heat maps")
    parser.add_argument("--lengths", type=_ints, default=[64, 256, 1024, 4096], help="haystack frames")
    parser.add_argument("--depths", type=_floats, default=[0.0, 0.25, 0.5, 0.75, 1.0], help="needle depths")
    parser.add_argument("--modes", default="dense,chunked,bilevel", help="engine modes to compare")
    parser.add_argument("--trials", type=int, default=2, help="needles per cell")
    parser.add_argument("--limit", type=int, default=None, help="at most this many cells (a quick run)")
    parser.add_argument("--fps", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    from ..cli import _add_memory_args

    _add_memory_args(parser)


def run_niah(args) -> int:
    from ..cli import _memory_overrides
    from .niah import NiahSettings
    from .niah import run_niah as run

    settings = NiahSettings(
        lengths=args.lengths,
        depths=args.depths,
        modes=[m.strip() for m in args.modes.split(",") if m.strip()],
        trials=args.trials,
        limit=args.limit,
        fps=args.fps,
        seed=args.seed,
        engine={k: v for k, v in _memory_overrides(args).items() if v is not None},
    )
    summary = run(
        args.model,
        args.out,
        settings,
        device=args.device,
        quantize=args.quantize,
        quantize_vision=args.quantize_vision,
    )
    header = "mode      " + "".join(f"{n:>8}" for n in summary["lengths"]) + "     all"
    print(header)
    for mode, result in summary["modes"].items():
        row = "".join(
            f"{result['by_length'][str(n)]:8.1f}" if str(n) in result["by_length"] else f"{'-':>8}"
            for n in summary["lengths"]
        )
        selected = result.get("needle_unit_selected")
        note = f"   needle's unit kept dense: {selected:.1f}%" if selected is not None else ""
        print(f"{mode:<10}{row}{result['accuracy']:8.1f}{note}")
    print(f"wrote {args.out}/niah.json and heat maps {', '.join(summary['heatmaps'].values())}")
    return 0


COMMANDS = {
    "demo": (
        "ask a synthetic long video a few questions with the demo model (bi-level)",
        add_demo_arguments,
        run_demo,
    ),
    "niah": (
        "needle-in-a-haystack accuracy over length x depth per engine mode",
        add_niah_arguments,
        run_niah,
    ),
}
