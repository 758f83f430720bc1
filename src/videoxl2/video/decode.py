"""Reading videos and images with PyAV / PIL, streaming: a 3-hour video never sits in memory whole.

The reader decodes only what the sampling plan needs. A demux pass (no decoding) lists every packet's
presentation timestamp and keyframe flag; frame k is the k-th timestamp in presentation order, exactly the
k-th frame a front-to-back decode would give. For each wanted frame the reader seeks to the keyframe at or
before it when that keyframe lies ahead of where decoding stands, else decodes through; it asks the decoder
to skip non-reference frames nobody wants, and converts only wanted frames to RGB. Every decoded frame is
checked against the index; any disagreement (missing or repeated timestamps, a seek that lands elsewhere, a
frame the index did not predict) falls back to plain front-to-back decoding, so frames are always those of
front-to-back decoding, bit for bit. `ReadStats` says which path ran and how many frames were decoded.

Every PyAV failure is turned into a `VideoDecodeError` naming the file, so callers see one clear line.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import VideoReformatter
from PIL import Image, UnidentifiedImageError

from ..errors import MediaNotFoundError, VideoDecodeError
from .sampling import SamplingPlan, plan_sampling

# Containers whose demuxers seek to a keyframe from an index; elsewhere (MPEG-TS, raw streams, FLV...)
# the reader still skips unwanted stretches, but by demuxing through them instead of seeking.
SEEKABLE_FORMATS = {"mov", "mp4", "matroska", "webm"}
# Jump over at least this many packets by seeking; shorter gaps are cheaper to demux through.
MIN_SEEK_PACKETS = 8


@dataclass(frozen=True)
class VideoInfo:
    path: str
    num_frames: int
    avg_fps: float
    duration: float
    width: int
    height: int


@dataclass
class ReadStats:
    """What a read did: `path` is "seek" (plan-aware, seeking), "skip" (plan-aware, demuxing through the
    stretches it does not decode: a container that seeks badly) or "front-to-back" (no usable index, or
    the index disagreed with the decoder; `reason` says why)."""

    path: str = ""
    reason: str = ""
    frames_wanted: int = 0
    frames_in_file: int = 0
    frames_decoded: int = 0
    seeks: int = 0
    workers: int = 1
    index_s: float = 0.0
    decode_s: float = 0.0

    def as_dict(self) -> dict:
        return dict(vars(self))


@dataclass(frozen=True)
class FrameIndex:
    """Every packet of the video stream in file (decode) order, from a demux pass that decodes nothing."""

    packet_pts: np.ndarray  # int64, one per non-empty packet
    keyframe: np.ndarray  # bool, per packet
    numbered: np.ndarray  # bool, per packet: gives a frame (not marked discard by an edit list)
    frame_pts: np.ndarray  # int64, pts of frame k in presentation order
    seekable: bool
    problem: str  # why the index cannot number frames ("" when it can)

    @property
    def usable(self) -> bool:
        return not self.problem

    def start_packet(self, pts: int) -> int:
        """Decode position of the keyframe at or before presentation time `pts`."""
        keys = np.flatnonzero(self.keyframe)
        at = int(np.searchsorted(self.packet_pts[keys], pts, side="right")) - 1
        return int(keys[max(at, 0)])


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


def index_frames(path) -> FrameIndex:
    """Demux the video stream once (no decoding) and say whether its timestamps can number its frames."""
    path = _check_file(path)
    pts, keyframe, numbered = [], [], []
    with _open(path) as container:
        stream = container.streams.video[0]
        header_frames = int(stream.frames or 0)
        formats = set(container.format.name.split(","))
        try:
            for packet in container.demux(stream):
                if not packet.size:
                    continue
                pts.append(-(2**62) if packet.pts is None else packet.pts)
                keyframe.append(packet.is_keyframe)
                numbered.append(not packet.is_discard)
        except av.error.FFmpegError:
            pts = []  # a damaged file: front to back says where it breaks
    packet_pts = np.asarray(pts, dtype=np.int64)
    keyframe = np.asarray(keyframe, dtype=bool)
    numbered = np.asarray(numbered, dtype=bool)
    frame_pts = np.sort(packet_pts[numbered])
    keys = packet_pts[keyframe]
    problem = ""
    if not len(frame_pts):
        problem = "the demux pass found no frames"
    elif (packet_pts == -(2**62)).any():
        problem = "packets without timestamps"
    elif (np.diff(frame_pts) <= 0).any():
        problem = "repeated timestamps"
    elif not len(keys) or (np.diff(keys) <= 0).any():
        problem = "no keyframes, or keyframes out of order"
    elif frame_pts[0] < keys[0]:
        problem = "frames before the first keyframe"
    elif header_frames and header_frames not in (len(frame_pts), len(packet_pts)):
        problem = f"the header says {header_frames} frames, the packets {len(frame_pts)}"
    return FrameIndex(packet_pts, keyframe, numbered, frame_pts, bool(formats & SEEKABLE_FORMATS), problem)


class _IndexMismatch(Exception):
    """The decoder disagreed with the index: read front to back instead."""


def _configure(stream, threads: int | None) -> None:
    stream.thread_type = "AUTO"
    stream.codec_context.thread_count = 0 if threads is None else int(threads)


def rgb_converter():
    """A frame -> RGB24 array function for one stream's frames. `VideoFrame.to_ndarray(format="rgb24")` gives
    every frame its own swscale context, whose set-up is most of the cost on small frames (5x the time on the
    demo's 64x64 videos, 2-3x at 480p: `benchmarks/ingest.py`); one reused `VideoReformatter` gives the same
    pixels without it."""
    reformatter = VideoReformatter()
    return lambda frame: reformatter.reformat(frame, format="rgb24").to_ndarray()


def _decode_with_index(
    path: Path, index: FrameIndex, targets: Sequence[int], threads: int | None, stats: ReadStats
) -> Iterator[np.ndarray]:
    """One RGB frame per entry of `targets` (ascending frame numbers), decoding only what they need."""
    want_pts = index.frame_pts[np.asarray(targets, dtype=np.int64)]
    wanted = set(want_pts.tolist())
    where = {int(p): i for i, p in enumerate(index.packet_pts)}
    count = len(targets)
    cursor = 0
    to_rgb = rgb_converter()
    with _open(path) as container:
        stream = container.streams.video[0]
        _configure(stream, threads)
        codec = stream.codec_context
        packets = container.demux(stream)
        position: int | None = -1  # decode position of the last packet read; None just after a seek
        run_start = None  # pts of the keyframe the decoder's current run started from

        def read_packet():
            nonlocal position
            for packet in packets:
                if not packet.size:
                    continue
                position = where.get(packet.pts, -2) if position is None else position + 1
                if (
                    position < 0
                    or position >= len(index.packet_pts)
                    or index.packet_pts[position] != packet.pts
                ):
                    raise _IndexMismatch("the demuxer gave packets the index does not list there")
                return packet
            return None

        def frames_out(packet):
            nonlocal cursor
            for frame in codec.decode(packet):
                stats.frames_decoded += 1
                if frame.pts is None:
                    raise _IndexMismatch("a decoded frame has no timestamp")
                if frame.pts < run_start:
                    continue  # a leading picture of an open GOP, from before this run's keyframe
                if frame.pts > want_pts[cursor]:
                    raise _IndexMismatch(f"frame {targets[cursor]} never came out of the decoder")
                if frame.pts == want_pts[cursor]:
                    image = to_rgb(frame)
                    while cursor < count and want_pts[cursor] == frame.pts:
                        yield image
                        cursor += 1
                    if cursor == count:
                        return

        while cursor < count:
            start = index.start_packet(int(want_pts[cursor]))
            if run_start is None or start > position + 1:  # jump to that keyframe
                if index.seekable and start - (position + 1) >= MIN_SEEK_PACKETS:
                    container.seek(int(index.packet_pts[start]), stream=stream, backward=True)
                    packets = container.demux(stream)
                    position = None
                    stats.seeks += 1
                codec.flush_buffers()
                run_start = int(index.packet_pts[start])
                packet = read_packet()
                while packet is not None and position < start:  # demuxed, never decoded
                    packet = read_packet()
                if packet is None or position != start:
                    raise _IndexMismatch("a seek did not land at or before the keyframe it asked for")
            else:
                packet = read_packet()
                if packet is None:  # end of file: drain the decoder's delayed frames
                    yield from frames_out(None)
                    if cursor < count:
                        raise _IndexMismatch(f"frame {targets[cursor]} never came out of the decoder")
                    return
            codec.skip_frame = "DEFAULT" if packet.pts in wanted else "NONREF"
            yield from frames_out(packet)


def decode_front_to_back(
    path, targets: Sequence[int], threads: int | None = None, stats: ReadStats | None = None
) -> Iterator[np.ndarray]:
    """One RGB frame per entry of `targets`, numbering frames by counting them as they come out of a
    front-to-back decode: the reference every faster path is checked against, and the fallback."""
    path = _check_file(path)
    stats = stats if stats is not None else ReadStats()
    cursor, count = 0, len(targets)
    to_rgb = rgb_converter()
    with _open(path) as container:
        stream = container.streams.video[0]
        _configure(stream, threads)
        for number, frame in enumerate(container.decode(stream)):
            stats.frames_decoded += 1
            if number < targets[cursor]:
                continue
            image = to_rgb(frame)
            while cursor < count and targets[cursor] == number:
                yield image
                cursor += 1
            if cursor == count:
                return
    raise VideoDecodeError(
        f"{path}: the stream ended before frame {targets[cursor]} "
        "(the file may be truncated or its header wrong)"
    )


def _chunks(index: FrameIndex, targets: Sequence[int], pieces: int) -> list[list[int]]:
    """Split `targets` into about `pieces` runs, cutting only where the next target starts its own decode
    run (its keyframe differs from the previous target's), so each run decodes independently."""
    starts = [index.start_packet(int(index.frame_pts[t])) for t in targets]
    cuts = [i for i in range(1, len(targets)) if starts[i] != starts[i - 1]]
    if not cuts:
        return [list(targets)]
    step = max(1, len(cuts) // max(1, pieces - 1))
    bounds = [0, *cuts[step - 1 :: step][: pieces - 1], len(targets)]
    return [list(targets[a:b]) for a, b in zip(bounds, bounds[1:]) if b > a]


def _read_chunk(path: str, index: FrameIndex, chunk: list[int], threads: int | None):
    """A worker process's share: the chunk's frames, decoded plan-aware (or the reason it could not)."""
    stats = ReadStats()
    try:
        frames = list(_decode_with_index(Path(path), index, chunk, threads, stats))
    except _IndexMismatch as err:
        return None, str(err), stats
    except av.error.FFmpegError as err:
        return None, f"ffmpeg: {err}", stats
    return np.stack(frames), "", stats


def _decode_in_workers(
    path: Path, index: FrameIndex, targets: Sequence[int], threads: int | None, workers: int, stats: ReadStats
) -> Iterator[np.ndarray]:
    """Keyframe-delimited runs of `targets` decoded in `workers` processes, yielded in order. At most two
    runs per worker are in flight; the pool is terminated when the caller stops early."""
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    chunks = iter(_chunks(index, targets, workers * 4))
    pool = context.Pool(workers)
    try:
        pending = []
        for chunk in chunks:
            pending.append(pool.apply_async(_read_chunk, (str(path), index, chunk, threads)))
            if len(pending) == 2 * workers:
                break
        while pending:
            frames, problem, chunk_stats = pending.pop(0).get()
            stats.frames_decoded += chunk_stats.frames_decoded
            stats.seeks += chunk_stats.seeks
            if frames is None:
                raise _IndexMismatch(problem)
            chunk = next(chunks, None)
            if chunk is not None:
                pending.append(pool.apply_async(_read_chunk, (str(path), index, chunk, threads)))
            yield from frames
    finally:
        pool.terminate()
        pool.join()


def default_decode_workers() -> int:
    """Decoder processes worth starting: one per four cores (each decodes with threads of its own)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cores // 4))


def iter_frames(
    path, indices: Sequence[int], threads: int | None = None, workers: int = 1, stats: ReadStats | None = None
) -> Iterator[np.ndarray]:
    """(H, W, 3) uint8 RGB frames `indices` (ascending frame numbers; repeats allowed), in order, exactly
    as front-to-back decoding gives them. `threads`: decoder threads (None: FFmpeg's choice); `workers`:
    processes decoding keyframe-delimited runs in parallel; `stats` is filled in as frames come out."""
    path = _check_file(path)
    targets = [int(i) for i in indices]
    if any(b < a for a, b in zip(targets, targets[1:])):
        raise ValueError("frame indices must be ascending")
    if targets and targets[0] < 0:
        raise ValueError("frame indices must be >= 0")
    stats = stats if stats is not None else ReadStats()
    stats.frames_wanted = len(targets)
    if not targets:
        return
    start = time.perf_counter()
    index = index_frames(path)
    stats.index_s = time.perf_counter() - start
    stats.frames_in_file = len(index.frame_pts)
    done = 0
    if index.usable and targets[-1] >= len(index.frame_pts):
        index = dataclasses.replace(index, problem="frames asked for beyond the indexed ones")
    try:
        if index.usable:
            stats.path = "seek" if index.seekable else "skip"
            if workers > 1:
                stats.workers = workers
                frames = _decode_in_workers(path, index, targets, threads, workers, stats)
            else:
                frames = _decode_with_index(path, index, targets, threads, stats)
            try:
                for image in frames:
                    done += 1
                    yield image
                return
            except _IndexMismatch as err:
                stats.reason = str(err)
            finally:
                frames.close()
        else:
            stats.reason = index.problem
        stats.path = "front-to-back"
        yield from decode_front_to_back(path, targets[done:], threads, stats)
    except av.error.FFmpegError as err:
        raise VideoDecodeError(f"{path}: corrupt video data after {done} sampled frames ({err})") from err
    finally:
        stats.decode_s = time.perf_counter() - start


def iter_frame_batches(
    path,
    indices: Sequence[int],
    batch_size: int = 64,
    threads: int | None = None,
    workers: int = 1,
    stats: ReadStats | None = None,
) -> Iterator[np.ndarray]:
    """(B, H, W, 3) uint8 RGB batches of exactly `indices` (see `iter_frames`), in order; at most one
    batch of frames is alive at a time (plus, with `workers`, the runs in flight)."""
    batch: list[np.ndarray] = []
    for image in iter_frames(path, indices, threads, workers, stats):
        batch.append(image)
        if len(batch) == batch_size:
            yield np.stack(batch)
            batch = []
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
