"""Small synthetic videos for tests and demos, written with PyAV, deterministic from a seed.

Each frame is a flat colour picked by its index from a table of well-separated colours (so a test can tell
which frame it got back) with a moving white square on top; `frame_fn` replaces the content entirely.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

PALETTE = np.array(
    [
        [220, 30, 30], [30, 200, 30], [30, 30, 220], [220, 220, 30], [30, 220, 220], [220, 30, 220],
        [240, 140, 20], [120, 40, 160], [20, 100, 60], [160, 160, 160], [90, 50, 20], [250, 180, 200],
    ],
    dtype=np.uint8,
)  # fmt: skip


# A fixed quantiser of 2 (ffmpeg's `-qscale:v 2`, in lambda units). A bare "qscale" option is not an encoder
# option and is dropped: the default rate control then lets the quality sink over the first dozen frames, so
# a shape's pixels in a long video decoded about 4x worse than in a 4-frame clip.
MPEG4_QSCALE_2 = {"flags": "+qscale", "global_quality": str(2 * 118)}


def frame_colour(index: int) -> np.ndarray:
    return PALETTE[index % len(PALETTE)]


def default_frame(index: int, size: tuple[int, int], rng: np.random.Generator, square: int) -> np.ndarray:
    height, width = size
    frame = np.empty((height, width, 3), dtype=np.uint8)
    frame[:] = frame_colour(index)
    side = max(2, min(height, width) // 4)
    y = (index * 3 + square) % max(1, height - side)
    x = (index * 5 + square) % max(1, width - side)
    frame[y : y + side, x : x + side] = 255
    return frame


def write_synthetic_video(
    path,
    num_frames: int,
    fps: float = 4.0,
    size: tuple[int, int] = (64, 64),
    seed: int = 0,
    frame_fn: Callable[[int], np.ndarray] | None = None,
    codec: str = "mpeg4",
) -> Path:
    """Write `num_frames` frames at `fps` to an mp4 (atomically: temp file, then rename)."""
    path = Path(path)
    height, width = size
    if height % 2 or width % 2:
        raise ValueError("synthetic video sizes must be even (yuv420p)")
    rng = np.random.default_rng(seed)
    square = int(rng.integers(0, 1000))
    make = frame_fn or (lambda i: default_frame(i, size, rng, square))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=path.suffix or ".mp4")
    os.close(fd)
    try:
        with av.open(tmp, mode="w", format="mp4") as container:
            stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.options = MPEG4_QSCALE_2 if codec == "mpeg4" else {"crf": "10"}
            for index in range(num_frames):
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(make(index)), format="rgb24")
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
