"""Which frames to read: the release's sampling rule as a pure function (spec §3).

The released model was trained and evaluated on frames picked this way, so matching it matters as much as
matching the weights: about `sample_fps` frames per second, raised up to `max_sample_fps` for short videos
while the `max_num_frames` budget allows, and spread uniformly when the budget is exceeded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError, VideoDecodeError


@dataclass(frozen=True)
class SamplingPlan:
    indices: list[int]
    timestamps: list[float]  # seconds, rounded to 0.1 as the model's time text uses them
    avg_fps: float
    num_frames: int


def plan_sampling(
    num_frames: int,
    avg_fps: float,
    max_num_frames: int,
    sample_fps: float | None = 1.0,
    max_sample_fps: float | None = None,
) -> SamplingPlan:
    """Frame indices and timestamps for a video of `num_frames` frames at `avg_fps`.

    step = round(avg_fps / sample_fps); with `max_sample_fps`, the rate rises to
    min(max_num_frames // count, max_sample_fps) when that beats `sample_fps`; over `max_num_frames`
    frames, indices are spread uniformly over the whole video. `sample_fps=None` samples uniformly.
    """
    if num_frames < 1:
        raise VideoDecodeError("the video has no frames")
    if not avg_fps > 0:
        raise VideoDecodeError(f"the video reports a frame rate of {avg_fps}")
    if int(max_num_frames) < 1:
        raise InputError(f"max_num_frames must be >= 1, got {max_num_frames}")
    for name, value in (("sample_fps", sample_fps), ("max_sample_fps", max_sample_fps)):
        if value is not None and not value > 0:
            raise InputError(f"{name} must be > 0, got {value}")
    max_num_frames = int(max_num_frames)
    if sample_fps is None:
        indices = list(range(num_frames))
    else:
        indices = list(range(0, num_frames, max(1, round(avg_fps / sample_fps))))
        if max_sample_fps is not None:
            higher = min(max_num_frames // len(indices), max_sample_fps)
            if higher > sample_fps:
                indices = list(range(0, num_frames, max(1, round(avg_fps / higher))))
    if len(indices) > max_num_frames:
        indices = [int(i) for i in np.linspace(0, num_frames - 1, max_num_frames, dtype=int)]
    timestamps = [round(i / avg_fps, 1) for i in indices]
    return SamplingPlan(indices, timestamps, float(avg_fps), int(num_frames))
