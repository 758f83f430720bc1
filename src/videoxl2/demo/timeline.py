"""The relevance timeline: how much each selection unit mattered to a question, over video time.

Bi-level decoding scores every unit (a span of groups) against the question and keeps the top ones dense;
this picture shows those scores as bars along the video's time axis, selected units highlighted, and the
true needle times when they are known. Shared by `videoxl2 demo` and the web UI.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path


def plot_timeline(
    units: Sequence[dict],
    path,
    title: str = "",
    truth: Sequence[tuple[float, float]] = (),
) -> Path:
    """Write a PNG of per-unit relevance (`units`: the `stats["units"]` dicts of an answer) to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(9, 2.6), dpi=100)
    scores = [u["score"] if u.get("score") is not None else 0.0 for u in units]
    for unit, score in zip(units, scores):
        start, end = unit["start_seconds"], unit["end_seconds"]
        ax.bar(
            start,
            score,
            width=max(end - start, 1e-3),
            align="edge",
            color="tab:orange" if unit.get("dense") else "tab:blue",
            edgecolor="white",
            linewidth=0.5,
        )
    for start, end in truth:
        ax.axvspan(start, end, color="tab:green", alpha=0.25, lw=0)
    handles = [
        plt.Rectangle((0, 0), 1, 1, color="tab:orange"),
        plt.Rectangle((0, 0), 1, 1, color="tab:blue"),
    ]
    labels = ["dense (selected)", "sparse"]
    if truth:
        handles.append(plt.Rectangle((0, 0), 1, 1, color="tab:green", alpha=0.25))
        labels.append("needle (truth)")
    # Above the axes, so it never hides a peak.
    ax.legend(
        handles,
        labels,
        loc="lower right",
        bbox_to_anchor=(1, 1),
        fontsize=8,
        ncols=len(labels),
        frameon=False,
    )
    ax.set_xlabel("video time (s)")
    ax.set_ylabel("relevance")
    short = title if len(title) <= 60 else title[:59] + "…"  # the legend shares its line
    ax.set_title(short, fontsize=9, loc="left")
    if units:
        ax.set_xlim(units[0]["start_seconds"], units[-1]["end_seconds"])
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
