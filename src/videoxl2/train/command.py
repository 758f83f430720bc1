"""`videoxl2 train --config FILE.yaml`: the Trainer's own progress, then one summary line."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="training config YAML (see docs/training.md)")
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="CHECKPOINT",
        help="resume from the latest checkpoint in output_dir, or from the given checkpoint folder",
    )
    parser.add_argument("--max-steps", type=int, default=None, help="override training.max_steps")
    parser.add_argument("--output-dir", default=None, help="override training.output_dir")


def run(args) -> int:
    from .config import load_config
    from .trainer import train

    overrides = dict(
        max_steps=args.max_steps,
        output_dir=str(Path(args.output_dir).resolve()) if args.output_dir else None,
    )
    result = train(load_config(args.config, overrides), resume=args.resume)
    if result.main_process:
        print(result.summary())
    return 0


COMMANDS = {"train": ("fine-tune a model from a training config YAML", add_arguments, run)}
