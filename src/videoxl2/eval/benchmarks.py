"""The benchmarks `videoxl2 eval` knows: how each loads, prompts, judges and summarises, and the settings
the release evaluated it with (answer length, frame budget)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from . import charades, longvideobench, lvbench, mlvu, synthetic, videomme
from .data import Sample

# "release": the lmms-eval copy shipped with Video-XL-2, which produced the published numbers;
# "lmms-eval": lmms-eval 0.7.3's task files; "exact": our synthetic suite's exact match.
PROTOCOLS = ("release", "lmms-eval", "exact")


def input_rules(protocol: str) -> dict:
    """How a protocol takes its input. The release's harness (its plain path, which gave the published
    `pure` numbers) cut the sampled frames to a multiple of 4 and rewrote only two-digit `dd:dd` times in
    the question; every other protocol keeps all frames (the model pads the last group) and rewrites times
    by our rule (`videoxl2.prompt.rewrite_times`), as chat and serve do."""
    release = protocol == "release"
    return {"remainder": "drop" if release else "pad", "time_rule": "release" if release else "ours"}


@dataclass(frozen=True)
class Options:
    """Choices that change which questions are asked or how: protocol, Video-MME duration subset and
    subtitles, an explicit annotation file."""

    protocol: str | None = None
    subset: str | None = None
    subtitles: bool = False
    annotations: Path | None = None


@dataclass(frozen=True)
class Benchmark:
    name: str
    description: str
    load: Callable[[Path, Options], list[Sample]]
    judge: Callable[[Sample, str, Options], dict]  # -> {"extracted", "correct", ...}
    summarize: Callable[[list[dict], Options], dict]  # -> {"score", "score_name", ...}
    max_new_tokens: int  # the harness's generation length
    max_frames: int  # the release's frame budget for it (fps 1, max fps 4)
    protocols: tuple[str, ...] = ("release", "lmms-eval")  # the first is the default
    prompt: Callable[[Sample, Options], str] | None = None  # final text when it needs the video
    running: str = "acc"  # the number the progress bar shows

    def resolve(self, options: Options) -> Options:
        """Options with the default protocol filled in, checked against what this benchmark supports."""
        protocol = options.protocol or self.protocols[0]
        if protocol not in self.protocols:
            known = ", ".join(self.protocols)
            raise InputError(f"--protocol {protocol} does not apply to {self.name} (it has {known})")
        if (options.subset or options.subtitles) and self.name != "videomme":
            raise InputError("--subset and --subtitles apply to videomme only")
        if options.subset and options.subset not in videomme.DURATIONS:
            raise InputError(
                f"--subset must be one of {', '.join(videomme.DURATIONS)}, got {options.subset!r}"
            )
        return Options(protocol, options.subset, options.subtitles, options.annotations)

    def question(self, sample: Sample, options: Options) -> str:
        return self.prompt(sample, options) if self.prompt else sample.question


BENCHMARKS = {
    b.name: b
    for b in (
        Benchmark(
            "videomme", "Video-MME (short/medium/long, optional subtitles)",
            videomme.load, videomme.judge, videomme.summarize, 16, 400, prompt=videomme.prompt,
        ),
        Benchmark("mlvu", "MLVU dev, multiple choice", mlvu.load, mlvu.judge, mlvu.summarize, 16, 256),
        Benchmark(
            "longvideobench", "LongVideoBench validation, video only",
            longvideobench.load, longvideobench.judge, longvideobench.summarize, 32, 400,
        ),
        Benchmark("lvbench", "LVBench", lvbench.load, lvbench.judge, lvbench.summarize, 16, 600),
        Benchmark(
            "charades_sta", "Charades-STA temporal grounding (mIoU, R@0.3/0.5/0.7)",
            charades.load, charades.judge, charades.summarize, 50, 256, ("lmms-eval",), running="mIoU",
        ),
        Benchmark(
            "synthetic", "LLaVA-style JSON, exact match per family (the demo model's synthetic suite)",
            # 128 new tokens: a multiple-choice answer judges every option in words (~68 tokens).
            synthetic.load, synthetic.judge, synthetic.summarize, 128, 256, ("exact",),
        ),
    )
}  # fmt: skip
