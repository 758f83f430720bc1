"""`videoxl2 demo`: write a synthetic long video, ask it the question families the demo model knows in
bi-level mode, print each answer beside the truth with the engine's figures, and draw the relevance
timeline of each question (which parts of the video the model chose to keep dense)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.synthetic import GROUP, Needle, VideoSpec, questions, write_video
from ..eval.scoring import normalize_text
from .timeline import plot_timeline

# Three needles spread over the video, so selection has something to find.
DEMO_NEEDLES = (("red", "circle", 0.2), ("blue", "square", 0.55), ("red", "triangle", 0.8))


@dataclass
class DemoResult:
    question: str
    family: str
    truth: str
    answer: str
    correct: bool
    stats: dict
    timeline: Path


def demo_spec(num_frames: int, fps: float, seed: int) -> VideoSpec:
    groups = num_frames // GROUP
    needles = tuple(
        Needle(colour, shape, min(int(depth * groups), groups - 1) * GROUP)
        for colour, shape, depth in DEMO_NEEDLES
    )
    return VideoSpec(num_frames, fps, seed, needles)


def run_demo(
    model_path,
    out_dir,
    num_frames: int = 96,
    fps: float = 1.0,
    seed: int = 0,
    mode: str = "bilevel",
    device: str = "cpu",
    progress: bool = True,
    engine: dict | None = None,
    quantize: str | None = None,
    quantize_vision: bool = False,
) -> list[DemoResult]:
    """`engine`: EngineSettings overrides (default: the model config's own settings); `quantize`:
    weight-only "int8" / "int4" (load_model's quantize=, torchao)."""
    import torch

    from .. import load_model, load_tokenizer
    from ..engine.session import VideoSession
    from ..engine.settings import EngineSettings

    out = Path(out_dir)
    spec = demo_spec(num_frames, fps, seed)
    video = write_video(spec, out / "demo.mp4")
    model = load_model(model_path, device=device, quantize=quantize, quantize_vision=quantize_vision)
    tokenizer = load_tokenizer(model_path)
    settings = EngineSettings.from_config(model.config, mode=mode, **(engine or {}))
    truth_spans = [
        (spec.seconds(n.start_frame), spec.seconds(n.start_frame + n.num_frames)) for n in spec.needles
    ]
    results = []
    with torch.inference_mode():
        session = VideoSession.from_path(
            model, tokenizer, video, max_num_frames=num_frames, sample_fps=fps, settings=settings,
            progress=progress,
        )  # fmt: skip
        session.prefill()
        for number, q in enumerate(questions(spec, np.random.default_rng(seed))):
            answer = session.ask(q.question, generation_config={"max_new_tokens": 128})
            picture = plot_timeline(
                answer.stats["units"],
                out / f"timeline-{number}-{q.family}.png",
                title=q.question.splitlines()[0],
                truth=truth_spans,
            )
            correct = normalize_text(answer.text) == normalize_text(q.answer)
            results.append(
                DemoResult(q.question, q.family, q.answer, answer.text, correct, answer.stats, picture)
            )
    return results


def describe(result: DemoResult, memory_bytes: int | None) -> str:
    stats = result.stats
    dense = [u for u in stats["units"] if u["dense"]]
    spans = ", ".join(f"{u['start_seconds']:.0f}-{u['end_seconds']:.0f}s" for u in dense)
    mark = "right" if result.correct else "WRONG"
    kv = f"KV {stats['kv_bytes'] / 2**10:.0f} KiB"
    if memory_bytes:
        kv += f" ({100 * stats['kv_bytes'] / memory_bytes:.0f}% of dense)"
    question = result.question.splitlines()
    shown = question[0] + (f" [{'; '.join(question[1:-1])}]" if len(question) > 2 else "")
    answer, truth = (" / ".join(text.splitlines()) for text in (result.answer, result.truth))
    return (
        f"Q ({result.family}): {shown}\n"
        f"  answer: {answer!r}   truth: {truth!r}   {mark}\n"
        f"  {stats['mode']}: dense units {spans or '-'}; {kv}; {stats['answer_s']:.2f}s; "
        f"timeline {result.timeline}"
    )


def main(args) -> int:
    start = time.perf_counter()
    results = run_demo(
        args.model,
        args.out,
        args.frames,
        args.fps,
        args.seed,
        args.mode,
        args.device,
        progress=True,
        quantize=args.quantize,
        quantize_vision=args.quantize_vision,
    )
    dense_bytes = results[0].stats.get("dense_kv_bytes") if results else None
    first = results[0].stats
    print(
        f"video: {Path(args.out) / 'demo.mp4'} ({first['frames']} frames at {args.fps:g} fps, "
        f"{first['groups']} groups); needles: " + ", ".join(f"{c} {s} at {d:.0%}" for c, s, d in DEMO_NEEDLES)
    )
    for result in results:
        print(describe(result, dense_bytes))
    right = sum(r.correct for r in results)
    print(f"{right}/{len(results)} right in {time.perf_counter() - start:.1f}s")
    return 0
