"""Reading videos and images with PyAV / PIL, streaming: a 3-hour video never sits in memory whole.

Every PyAV failure is turned into a `VideoDecodeError` naming the file, so callers see one clear line.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import MediaNotFoundError, VideoDecodeError
from .sampling import SamplingPlan, plan_sampling


@dataclass(frozen=True)
class VideoInfo:
    path: str
    num_frames: int
    avg_fps: float
    duration: float
    width: int
    height: int


def _check_file(path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise MediaNotFoundError(f"{path}: no such file")
    return path


def _open(path: Path):
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as err:
        raise VideoDecodeError(f"{path}: not a video file ({err})") from err
    if not container.streams.video:
        container.close()
        raise VideoDecodeError(f"{path}: no video stream")
    return container


def probe_video(path) -> VideoInfo:
    """Frame count, average frame rate and size from the container (counting packets if the header is silent).

    The average rate is frames / duration when both are known, so variable-frame-rate files get the rate
    their timestamps imply rather than a nominal one.
    """
    path = _check_file(path)
    with _open(path) as container:
        stream = container.streams.video[0]
        duration = 0.0
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        frames = int(stream.frames or 0)
        if frames <= 0:
            try:
                frames = sum(1 for packet in container.demux(stream) if packet.size)
            except av.error.FFmpegError as err:
                raise VideoDecodeError(f"{path}: unreadable video stream ({err})") from err
        rate = float(stream.average_rate) if stream.average_rate else 0.0
        if frames > 0 and duration > 0:
            rate = frames / duration
        if frames <= 0:
            raise VideoDecodeError(f"{path}: the video has no frames")
        if not rate > 0:
            raise VideoDecodeError(f"{path}: the video has no usable frame rate")
        if duration <= 0:
            duration = frames / rate
        return VideoInfo(
            str(path), frames, rate, duration, stream.codec_context.width, stream.codec_context.height
        )


def iter_frame_batches(path, indices: Sequence[int], batch_size: int = 64) -> Iterator[np.ndarray]:
    """Decode the file once, front to back, yielding (B, H, W, 3) uint8 RGB arrays of exactly `indices`
    (ascending; repeats allowed) in order. At most one batch of frames is alive at a time."""
    path = _check_file(path)
    wanted = list(indices)
    if any(b < a for a, b in zip(wanted, wanted[1:])):
        raise ValueError("frame indices must be ascending")
    if not wanted:
        return
    batch: list[np.ndarray] = []
    cursor = 0
    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for number, frame in enumerate(container.decode(stream)):
                if number < wanted[cursor]:
                    continue
                image = frame.to_ndarray(format="rgb24")
                while cursor < len(wanted) and wanted[cursor] == number:
                    batch.append(image)
                    cursor += 1
                    if len(batch) == batch_size:
                        yield np.stack(batch)
                        batch = []
                if cursor == len(wanted):
                    break
        except av.error.FFmpegError as err:
            raise VideoDecodeError(
                f"{path}: corrupt video data after {cursor} sampled frames ({err})"
            ) from err
    if cursor < len(wanted):
        raise VideoDecodeError(
            f"{path}: the stream ended before frame {wanted[cursor]} "
            "(the file may be truncated or its header wrong)"
        )
    if batch:
        yield np.stack(batch)


def read_video(
    path,
    max_num_frames: int,
    sample_fps: float | None = 1.0,
    max_sample_fps: float | None = None,
    batch_size: int = 64,
) -> tuple[SamplingPlan, Iterator[np.ndarray]]:
    """The sampling plan of a video file and a lazy iterator over its sampled frames."""
    info = probe_video(path)
    plan = plan_sampling(info.num_frames, info.avg_fps, max_num_frames, sample_fps, max_sample_fps)
    return plan, iter_frame_batches(path, plan.indices, batch_size)


def load_image(path) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB."""
    path = _check_file(path)
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError) as err:
        raise VideoDecodeError(f"{path}: not a readable image ({err})") from err


def expand_to_square(image: np.ndarray, fill=(127, 127, 127)) -> np.ndarray:
    """Pad to a centred square with the mean colour, as the release does for still images."""
    height, width = image.shape[:2]
    if height == width:
        return image
    side = max(height, width)
    out = np.empty((side, side, 3), dtype=image.dtype)
    out[:] = np.asarray(fill, dtype=image.dtype)
    top, left = (side - height) // 2, (side - width) // 2
    out[top : top + height, left : left + width] = image
    return out
