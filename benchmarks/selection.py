"""Does bi-level selection keep the needle's unit dense? The scorer against the first version's.

For V-NIAH haystacks (one needle at a relative depth, 1 fps) the model pre-fills once (chunked) and scores
every unit for the question "What was the first shape shown in the video?". Two scorers on the same memory:

- `ours`: `videoxl2.engine.select.score_units` (visual keys, per-layer max over heads and question tokens,
  keys at their pre-fill positions);
- `first`: the project's first scorer (mass on every key of the unit, averaged over heads, question tokens
  and layers, over the re-rotated all-sparse cache).

Both choose with `choose_units(scores, topk)` (first and last unit always dense). Prints a table and JSON and
writes the JSON to benchmarks/results/selection-<model>-<time>.json.

    python benchmarks/selection.py                                   # demo model, 1,024 and 4,096 frames
    python benchmarks/selection.py --lengths 256,1024 --depths 0.1,0.5,0.9
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from videoxl2 import load_model, load_tokenizer
from videoxl2.data.synthetic import needle_haystack_spec, write_video
from videoxl2.defaults import DEFAULT_MODEL
from videoxl2.demo.niah import QUESTION, trial_needle
from videoxl2.engine.prefill import LayerRunner
from videoxl2.engine.select import choose_units, score_units
from videoxl2.engine.session import VideoSession
from videoxl2.engine.settings import EngineSettings
from videoxl2.video import read_video


@torch.inference_mode()
def first_version_scores(model, memory, question_ids) -> torch.Tensor:
    """The first scorer: mean attention mass over heads, tokens and layers on all keys of each unit."""
    runner = LayerRunner(model)
    cache = memory.assemble(runner, dense_units=(), rerotate=True)
    embeds = model.get_input_embeddings()(question_ids)
    n, m = embeds.shape[0], cache.length
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    group = runner.heads // runner.kv_heads
    total = torch.zeros(m)

    def attend(layer, q, k, v):
        nonlocal total
        keys = torch.cat([cache.keys[layer], k], 1).repeat_interleave(group, 0)
        values = torch.cat([cache.values[layer], v], 1).repeat_interleave(group, 0)
        logits = (q.float() @ keys.float().transpose(1, 2)) * runner.head_dim**-0.5
        logits[:, :, m:].masked_fill_(~causal, float("-inf"))
        weights = logits.softmax(-1)
        total += weights[:, :, :m].mean((0, 1))
        return (weights.to(values.dtype) @ values).to(q.dtype)

    runner.forward(embeds, torch.arange(cache.next_position, cache.next_position + n), attend)
    return torch.stack([total[a:b].sum() for a, b in cache.unit_slices])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--lengths", default="1024,4096", help="haystack frames")
    parser.add_argument("--depths", default="0.05,0.15,0.25,0.35,0.45,0.55,0.65,0.75,0.85,0.95")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lengths = [int(x) for x in args.lengths.split(",")]
    depths = [float(x) for x in args.depths.split(",")]
    model, tokenizer = load_model(args.model), load_tokenizer(args.model)
    settings = EngineSettings.from_config(model.config, mode="bilevel")
    rows = []
    cases = [(length, depth) for length in lengths for depth in depths]
    with tempfile.TemporaryDirectory() as tmp:
        for index, (length, depth) in enumerate(tqdm(cases, desc="haystacks")):
            needle = trial_needle(args.seed, index)
            spec = needle_haystack_spec(length, depth, needle, 1.0, seed=args.seed * 100_003 + index)
            path = write_video(spec, Path(tmp) / f"haystack-{index}.mp4")
            plan, batches = read_video(path, max_num_frames=length, sample_fps=1.0)
            session = VideoSession.from_frames(
                model,
                tokenizer,
                np.concatenate(list(batches)),
                plan.timestamps,
                settings=settings,
                progress=False,
            )
            with torch.inference_mode():
                memory = session.prefill()
            question_ids = session.question_ids(QUESTION)
            seconds = spec.seconds(spec.needles[0].start_frame)
            target = next(u.index for u in memory.units() if u.start_seconds <= seconds < u.end_seconds)
            row = dict(
                frames=length, depth=depth, needle=needle.name, needle_unit=target, units=memory.num_units
            )
            for name, scorer in (("ours", score_units), ("first", first_version_scores)):
                start = time.perf_counter()
                scores = scorer(model, memory, question_ids)
                row[f"{name}_s"] = round(time.perf_counter() - start, 4)
                row[f"{name}_rank"] = int((scores > scores[target]).sum())
                row[f"{name}_kept"] = target in choose_units(scores, settings.topk)
            rows.append(row)
    summary = {}
    for length in lengths:
        mine = [r for r in rows if r["frames"] == length]
        summary[str(length)] = {
            name: dict(
                kept_pct=round(100 * float(np.mean([r[f"{name}_kept"] for r in mine])), 1),
                median_rank=float(np.median([r[f"{name}_rank"] for r in mine])),
                score_s=round(float(np.mean([r[f"{name}_s"] for r in mine])), 4),
            )
            for name in ("ours", "first")
        }
    result = dict(
        model=Path(args.model).name,
        topk=settings.topk,
        unit_size=settings.unit_size,
        question=QUESTION,
        summary=summary,
        overall={
            name: round(100 * float(np.mean([r[f"{name}_kept"] for r in rows])), 1)
            for name in ("ours", "first")
        },
        rows=rows,
    )
    print(
        f"{'frames':>7} {'units':>6} {'ours kept':>10} {'first kept':>11} "
        f"{'ours rank':>10} {'first rank':>11}"
    )
    for length in lengths:
        s, units = summary[str(length)], next(r["units"] for r in rows if r["frames"] == length)
        print(
            f"{length:>7} {units:>6} {s['ours']['kept_pct']:>9.1f}% {s['first']['kept_pct']:>10.1f}% "
            f"{s['ours']['median_rank']:>10.1f} {s['first']['median_rank']:>11.1f}"
        )
    print(
        f"overall: needle's unit kept dense {result['overall']['ours']}% (ours) "
        f"vs {result['overall']['first']}% (first)"
    )
    print(json.dumps(result["summary"], indent=1))
    out = Path(__file__).parent / "results" / f"selection-{result['model']}-{datetime.now():%Y%m%d-%H%M}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
