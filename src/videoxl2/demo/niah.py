"""Video needle-in-a-haystack (in the manner of LongVA's V-NIAH): one coloured shape hidden at a relative
depth of a haystack video; the model is asked what it was. Accuracy over haystack length x needle depth,
per engine mode, as JSON and one heat map per mode.

Each haystack is decoded once and shared by the modes; `chunked` and `bilevel` share one pre-fill too
(they differ only in how a question reads the memory).
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..data.synthetic import COLOURS, SHAPES, Needle, needle_haystack_spec, write_video
from ..errors import InputError
from ..eval.scoring import normalize_text

QUESTION = "What was the first shape shown in the video?"
MODES = ("dense", "chunked", "bilevel")


@dataclass
class NiahSettings:
    lengths: list[int] = field(default_factory=lambda: [64, 256, 1024, 4096])
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    modes: list[str] = field(default_factory=lambda: list(MODES))
    trials: int = 2  # needles per cell (different colour/shape/haystack)
    limit: int | None = None  # at most this many (length, depth) cells, spread over the grid
    fps: float = 1.0
    seed: int = 0
    engine: dict = field(default_factory=dict)  # chunked / bi-level knobs over the checkpoint's own

    def check(self) -> None:
        bad = [m for m in self.modes if m not in MODES]
        if bad:
            raise InputError(f"--modes: unknown {bad}; expected some of {', '.join(MODES)}")
        if not self.lengths or min(self.lengths) < 4:
            raise InputError("--lengths: give haystack lengths of at least 4 frames")
        if any(not 0 <= d <= 1 for d in self.depths):
            raise InputError("--depths: depths are fractions in [0, 1]")
        if self.trials < 1 or (self.limit is not None and self.limit < 1):
            raise InputError("--trials and --limit must be >= 1")

    def cells(self) -> list[tuple[int, float]]:
        grid = list(itertools.product(sorted(self.lengths), sorted(self.depths)))
        if self.limit is None or self.limit >= len(grid):
            return grid
        keep = np.unique(np.linspace(0, len(grid) - 1, self.limit).round().astype(int))
        return [grid[i] for i in keep]


def trial_needle(seed: int, index: int) -> Needle:
    rng = np.random.default_rng([seed, index])
    return Needle(str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)), 0)


def run_niah(
    model_path,
    out_dir,
    settings: NiahSettings,
    device: str = "cpu",
    progress: bool = True,
    quantize: str | None = None,
    quantize_vision: bool = False,
) -> dict:
    """`quantize`: weight-only "int8" / "int4" (load_model's quantize=, torchao)."""
    import torch
    from tqdm.auto import tqdm

    from .. import load_model, load_tokenizer
    from ..engine.session import VideoSession
    from ..engine.settings import EngineSettings
    from ..video import read_video

    settings.check()
    out = Path(out_dir)
    model = load_model(model_path, device=device, quantize=quantize, quantize_vision=quantize_vision)
    tokenizer = load_tokenizer(model_path)
    cells = settings.cells()
    records = []
    bar = tqdm(total=len(cells) * settings.trials, desc="niah", disable=not progress)
    for index, ((length, depth), trial) in enumerate(itertools.product(cells, range(settings.trials))):
        needle = trial_needle(settings.seed, index)
        spec = needle_haystack_spec(length, depth, needle, settings.fps, seed=settings.seed * 100_003 + index)
        path = write_video(spec, out / "videos" / f"haystack-{length}-{depth:.2f}-{trial}.mp4")
        plan, batches = read_video(path, max_num_frames=length, sample_fps=settings.fps)
        frames, timestamps = np.concatenate(list(batches)), plan.timestamps
        memories = {}
        for mode in settings.modes:
            engine = EngineSettings.from_config(model.config, mode=mode, **settings.engine)
            with torch.inference_mode():
                session = VideoSession.from_frames(
                    model, tokenizer, frames, timestamps, settings=engine, progress=False
                )
                prefill = "dense" if mode == "dense" else "chunked"
                if prefill in memories:
                    session.memory, session.runner = memories[prefill]
                else:
                    start = time.perf_counter()
                    session.prefill()
                    session.stats["prefill_wall_s"] = time.perf_counter() - start
                    memories[prefill] = (session.memory, session.runner)
                answer = session.ask(QUESTION, generation_config={"max_new_tokens": 8})
            needle_seconds = spec.seconds(spec.needles[0].start_frame)
            records.append(
                dict(
                    mode=mode,
                    frames=length,
                    depth=depth,
                    trial=trial,
                    needle=needle.name,
                    needle_seconds=needle_seconds,
                    needle_unit_dense=needle_unit_dense(answer.stats["units"], needle_seconds),
                    answer=answer.text,
                    correct=normalize_text(answer.text) == normalize_text(spec.needles[0].name),
                    answer_s=answer.stats["answer_s"],
                    kv_bytes=answer.stats["kv_bytes"],
                )
            )
        bar.update(1)
    bar.close()
    summary = summarize(records, settings)
    summary["model"] = str(model_path)
    if quantize not in (None, "none"):
        summary["quantize"] = dict(weights=quantize, vision=quantize_vision)
    knobs = EngineSettings.from_config(model.config, mode="bilevel", **settings.engine)
    summary["engine"] = {k: v for k, v in asdict(knobs).items() if k not in ("mode", "offload")}
    write_json(out / "niah.json", {"summary": summary, "records": records})
    summary["heatmaps"] = {
        mode: str(plot_heatmap(summary, mode, out / f"niah-{mode}.png")) for mode in settings.modes
    }
    write_json(out / "niah.json", {"summary": summary, "records": records})
    return summary


def needle_unit_dense(units: list[dict], seconds: float) -> bool | None:
    """Bi-level only: was the unit holding the needle one of those kept dense? (None in other modes.)"""
    if not any(not u["dense"] for u in units):
        return None if not units or units[0].get("score") is None else True
    holder = next((u for u in units if u["start_seconds"] <= seconds < u["end_seconds"]), units[-1])
    return bool(holder["dense"])


def summarize(records: list[dict], settings: NiahSettings) -> dict:
    modes = {}
    for mode in settings.modes:
        rows = [r for r in records if r["mode"] == mode]
        cells = {}
        for r in rows:
            cells.setdefault((r["frames"], r["depth"]), []).append(r["correct"])
        selected = [r["needle_unit_dense"] for r in rows if r.get("needle_unit_dense") is not None]
        modes[mode] = dict(
            accuracy=100 * float(np.mean([r["correct"] for r in rows])) if rows else None,
            needle_unit_selected=100 * float(np.mean(selected)) if selected else None,
            cells=[
                dict(frames=f, depth=d, accuracy=100 * float(np.mean(v)), trials=len(v))
                for (f, d), v in sorted(cells.items())
            ],
            by_length={
                str(f): 100 * float(np.mean([r["correct"] for r in rows if r["frames"] == f]))
                for f in sorted({r["frames"] for r in rows})
            },
        )
    return dict(
        question=QUESTION,
        lengths=sorted(settings.lengths),
        depths=sorted(settings.depths),
        trials=settings.trials,
        fps=settings.fps,
        modes=modes,
    )


def plot_heatmap(summary: dict, mode: str, path: Path) -> Path:
    """Accuracy per (length, depth) cell: depth down the side, haystack length along the bottom."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    lengths, depths = summary["lengths"], summary["depths"]
    grid = np.full((len(depths), len(lengths)), np.nan)
    for cell in summary["modes"][mode]["cells"]:
        grid[depths.index(cell["depth"]), lengths.index(cell["frames"])] = cell["accuracy"]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.0 + 0.5 * len(depths)), dpi=100)
    cmap = matplotlib.colormaps["RdYlGn"].with_extremes(bad="lightgrey")
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0, vmax=100, aspect="auto")
    for (row, col), value in np.ndenumerate(grid):
        if not np.isnan(value):
            ax.text(col, row, f"{value:.0f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
    ax.set_xlabel("haystack length (frames)")
    ax.set_ylabel("needle depth")
    accuracy = summary["modes"][mode]["accuracy"]
    ax.set_title(f"V-NIAH, {mode}: {accuracy:.1f}% overall" if accuracy is not None else mode, fontsize=9)
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
    return path


def write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".json")
    with os.fdopen(fd, "w") as handle:
        json.dump(value, handle, indent=1)
    os.replace(tmp, path)
