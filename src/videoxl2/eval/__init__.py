"""Benchmark evaluation: loaders for each benchmark's published annotation files, the prompts and answer
extraction of the harness that produced the published numbers, scoring, a resumable data-parallel runner
(`videoxl2 eval`), and a model plugin for lmms-eval.

from videoxl2.eval import BENCHMARKS, EvalSettings, run_eval
results = run_eval(EvalSettings("videomme", data_root="/data/videomme", model="Video-XL-2", out="runs/vmme"))
"""

from .benchmarks import BENCHMARKS, Options
from .runner import DEFAULT_MODEL, EvalSettings, run_eval

__all__ = ["BENCHMARKS", "DEFAULT_MODEL", "EvalSettings", "Options", "run_eval"]
