"""Which frames to read: the release's sampling rule as a pure function (spec §3).

The released model was trained and evaluated on frames picked this way, so matching it matters as much as
matching the weights: about `sample_fps` frames per second, raised up to `max_sample_fps` for short videos
while the `max_num_frames` budget allows, and spread uniformly when the budget is exceeded.

The model takes frames in groups of 4. A count that is not a multiple of 4 is either kept whole, the model
padding the last group with copies of the last frame (`remainder="pad"`: chat, serve, training, and the
release's chunked and bi-level evaluation), or cut to whole groups (`remainder="drop"`: the release's plain
evaluation, which produced its `pure` numbers, drops the trailing `count % 4` frames).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError, VideoDecodeError

FRAMES_PER_GROUP = 4  # the DTS fuses 4 frames into one group (VideoXL2Config.frames_per_group)
REMAINDERS = ("pad", "drop")


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
    remainder: str = "pad",
) -> SamplingPlan:
    """Frame indices and timestamps for a video of `num_frames` frames at `avg_fps`.

    step = round(avg_fps / sample_fps); with `max_sample_fps`, the rate rises to
    min(max_num_frames // count, max_sample_fps) when that beats `sample_fps`; over `max_num_frames`
    frames, indices are spread uniformly over the whole video. `sample_fps=None` samples uniformly.

    `remainder="pad"` keeps every sampled frame (the model pads the last group); `"drop"` keeps only whole
    groups of 4, as the release's plain evaluation did, and refuses a video that leaves none.
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
    if remainder not in REMAINDERS:
        raise InputError(f"remainder must be one of {', '.join(REMAINDERS)}, got {remainder!r}")
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
    if remainder == "drop":
        kept = len(indices) - len(indices) % FRAMES_PER_GROUP
        if kept == 0:
            raise InputError(
                f"only {len(indices)} frames sampled from {num_frames} at {avg_fps:g} fps; dropping the "
                f"frames past a multiple of {FRAMES_PER_GROUP} (the release's evaluation rule) needs at "
                f"least {FRAMES_PER_GROUP}"
            )
        indices = indices[:kept]
    timestamps = [round(i / avg_fps, 1) for i in indices]
    return SamplingPlan(indices, timestamps, float(avg_fps), int(num_frames))
