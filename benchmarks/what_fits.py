"""What fits a card: the most frames of the released Video-XL-2 (7B LLM, bf16 compute) per card size, weight
quantization, video-memory dtype and engine mode, as computed by `videoxl2 plan` (engine/budget.py).

Nothing is measured and nothing is loaded: the released geometry (`VideoXL2Config.released()`, or `--model`
for a checkpoint folder or hub id), frames sampled at `--fps` (the time text counted as Qwen2's tokenizer
splits it), the default engine settings, a share of each card kept free (`--headroom`, default 5%; the CUDA
context's ~0.5 GB is not counted). Quantized bytes follow the layouts in budget.py's docstring.

Prints the markdown table the README shows and writes it with every figure to
`benchmarks/results/what_fits-<model>.{md,json}`.

    python benchmarks/what_fits.py
    python benchmarks/what_fits.py --cards 24,40,80 --fps 2 --model /models/Video-XL-2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from videoxl2.config import VideoXL2Config
from videoxl2.engine import budget
from videoxl2.engine.plan import plan, read_checkpoint
from videoxl2.engine.settings import EngineSettings

RESULTS = Path(__file__).parent / "results"
PROBE_FRAMES = 2048  # the frame count whose peak the JSON records beside the fits


def what_fits(config, cards_gib, headroom, fps, tokenizer=None) -> list[dict]:
    rows = []
    for quantize in ("none", "int8", "int4"):
        for kv_dtype in ("bf16", "int8"):
            for mode in ("dense", "bilevel"):
                settings = EngineSettings.from_config(config, mode=mode)
                common = dict(
                    dtype="bf16", quantize=quantize, kv_dtype=kv_dtype, fps=fps, tokenizer=tokenizer
                )
                cards = {}
                for card in cards_gib:
                    found = plan(config, PROBE_FRAMES, settings, gpu_memory=int(card * 2**30), **common)
                    cards[f"{card:g}"] = dict(
                        frames=found["frames_that_fit"], capped_by_context=found["fit_capped_by_context"]
                    )
                # the longest video the context takes, and its peak
                longest = plan(config, 4, settings, gpu_memory=10**18, headroom=0, **common)[
                    "frames_that_fit"
                ]
                at_limit = plan(config, longest, settings, **common)
                rows.append(
                    dict(
                        weights=quantize if quantize != "none" else "bf16",
                        kv=kv_dtype,
                        mode=mode,
                        cards=cards,
                        weight_bytes=found["weights"],
                        kv_bytes_per_frame=found["video_kv"] / PROBE_FRAMES,
                        probe_frames=PROBE_FRAMES,
                        peak_at_probe=found["total"],
                        context_frames=longest,
                        peak_at_context=at_limit["total"],
                        settings=found["settings"],
                    )
                )
    return rows


def markdown(rows: list[dict], cards_gib) -> str:
    limit = f"GB at {rows[0]['context_frames']:,} frames"
    cards = " | ".join(f"{c:g} GB" for c in cards_gib)
    lines = [
        f"| weights | video KV | mode | weights GB | KV MB/frame | {limit} | {cards} |",
        "|---|---|---|---:|---:|---:|" + "---:|" * len(cards_gib),
    ]
    for row in rows:
        cells = []
        for card in cards_gib:
            fit = row["cards"][f"{card:g}"]
            cells.append(f"{fit['frames']:,}" + (" *" if fit["capped_by_context"] else ""))
        mode = "bi-level" if row["mode"] == "bilevel" else row["mode"]
        figures = [
            row["weights"],
            row["kv"],
            mode,
            f"{row['weight_bytes'] / 1e9:.1f}",
            f"{row['kv_bytes_per_frame'] / 1e6:.2f}",
            f"{row['peak_at_context'] / 1e9:.1f}",
            *cells,
        ]
        lines.append("| " + " | ".join(figures) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default=None, help="checkpoint folder or hub id (default: released geometry)"
    )
    parser.add_argument("--cards", default="24,48,80", help="card sizes in GiB, comma-separated")
    parser.add_argument("--headroom", type=float, default=budget.DEFAULT_HEADROOM)
    parser.add_argument("--fps", type=float, default=1.0)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    cards = [float(c) for c in args.cards.split(",") if c.strip()]
    if args.model is None:
        config, tokenizer, name = VideoXL2Config.released(), None, "released"
    else:
        config, tokenizer = read_checkpoint(args.model)
        name = Path(str(args.model).split("@")[0]).name
    rows = what_fits(config, cards, args.headroom, args.fps, tokenizer)
    table = markdown(rows, cards)
    command = "python benchmarks/what_fits.py " + " ".join(argv if argv is not None else sys.argv[1:])
    note = (
        f"Most frames (at {args.fps:g} fps) that fit a card of N GiB with {args.headroom:.0%} kept free, "
        "computed by the planner (`videoxl2 plan`), not measured; * = the model's context is the limit "
        "(GB at N frames: the peak of the longest video it takes)."
    )
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"what_fits-{name}.md").write_text(f"{note}\n\n{table}\n\n`{command.strip()}`\n")
    record = dict(
        model=args.model or "VideoXL2Config.released()",
        command=command.strip(),
        computed_by="videoxl2 plan (engine/budget.py), not measured",
        dtype="bfloat16",
        fps=args.fps,
        headroom=args.headroom,
        cards_gib=cards,
        layouts=dict(
            kv_int8_scale_bytes=budget.KV_INT8_SCALE_BYTES,
            weight_int8_scale_bytes=budget.WEIGHT_INT8_SCALE_BYTES,
            weight_int4_group_size=budget.WEIGHT_INT4_GROUP_SIZE,
            weight_int4_scale_bytes=budget.WEIGHT_INT4_SCALE_BYTES,
        ),
        rows=rows,
    )
    (out / f"what_fits-{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
