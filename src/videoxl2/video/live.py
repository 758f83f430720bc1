"""Frames from a live source, sampled by presentation time: standard input (e.g. MPEG-TS from
`ffmpeg ... -f mpegts -`), a file still being written (followed), or a URL PyAV opens (rtsp, rtmp, http,
udp, srt).

Nothing here knows how long the video is: frames are sampled at `fps` from the stream's own presentation
times (seconds since its first frame, as the release's `Time t s:` text uses them), and the stream ends
when the source does. A source that breaks off mid-stream (a killed producer, a dropped connection, a
truncated packet) ends the stream cleanly: what was read stays read, and `LiveStats.ended` says why.
"""

from __future__ import annotations

import io
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import av
import numpy as np

from ..errors import InputError, MediaNotFoundError, VideoDecodeError
from .decode import rgb_converter

URL_SCHEMES = {"rtsp", "rtsps", "rtmp", "rtmps", "http", "https", "udp", "tcp", "srt"}


@dataclass
class LiveStats:
    """How far a live read got: frames decoded and kept, stream seconds seen, and why it ended
    ("end of stream", "source error: ...", "stopped")."""

    frames_decoded: int = 0
    frames_kept: int = 0
    seconds_seen: float = 0.0
    ended: str = ""


class FollowFile(io.RawIOBase):
    """A file another program is still writing, read as a stream: at its current end, reads wait for more
    bytes until the file has not grown for `idle_s` seconds (the writer is done) or `stop` is set."""

    def __init__(self, path, idle_s: float = 2.0, poll_s: float = 0.05, stop: threading.Event | None = None):
        self._handle = open(path, "rb")  # noqa: SIM115 (closed by close())
        self.idle_s, self.poll_s = idle_s, poll_s
        self.stop = stop

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        waited = 0.0
        while True:
            count = self._handle.readinto(buffer)
            if count:
                return count
            if waited >= self.idle_s or (self.stop is not None and self.stop.is_set()):
                return 0
            time.sleep(self.poll_s)
            waited += self.poll_s

    def close(self) -> None:
        self._handle.close()
        super().close()


def open_live(source: str, follow_idle_s: float = 2.0, stop: threading.Event | None = None, timeout_s=10.0):
    """A PyAV container for `source` ("-", a file path, or a URL); one-line typed errors when it cannot be
    opened or holds no video."""
    scheme = urlparse(source).scheme.lower()
    try:
        if source == "-":
            # the raw pipe: a buffered read waits to fill its whole buffer, seconds of a low-bitrate stream
            container = av.open(getattr(sys.stdin.buffer, "raw", sys.stdin.buffer), mode="r")
        elif scheme in URL_SCHEMES:
            micros = str(int(timeout_s * 1e6))
            container = av.open(source, mode="r", options={"rw_timeout": micros, "timeout": micros})
        elif scheme and len(scheme) > 1:
            raise InputError(
                f"{source}: unsupported URL scheme {scheme!r}; use {', '.join(sorted(URL_SCHEMES))}"
            )
        else:
            path = Path(source)
            if not path.is_file():
                raise MediaNotFoundError(f"{path}: no such file")
            container = av.open(FollowFile(path, follow_idle_s, stop=stop), mode="r")
    except av.error.FFmpegError as err:
        raise VideoDecodeError(f"{source}: cannot open a video stream ({err})") from err
    if not container.streams.video:
        container.close()
        raise VideoDecodeError(f"{source}: no video stream")
    return container


def iter_live_frames(
    source: str,
    fps: float = 1.0,
    stop: threading.Event | None = None,
    stats: LiveStats | None = None,
    follow_idle_s: float = 2.0,
    threads: int | None = None,
) -> Iterator[tuple[np.ndarray, float]]:
    """(H, W, 3) uint8 RGB frames with their time in seconds since the stream's first frame, one per 1/fps
    seconds of presentation time (the first frame at or after each tick), until the source ends, breaks
    off, or `stop` is set."""
    if not fps > 0:
        raise InputError(f"fps must be > 0, got {fps}")
    stats = stats if stats is not None else LiveStats()
    container = open_live(source, follow_idle_s, stop)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = 0 if threads is None else int(threads)
        first = None
        next_tick = 0.0
        step = 1.0 / fps
        to_rgb = rgb_converter()
        try:
            for frame in container.decode(stream):
                if stop is not None and stop.is_set():
                    stats.ended = "stopped"
                    return
                stats.frames_decoded += 1
                if frame.pts is None or frame.time_base is None:
                    continue  # no presentation time: it cannot be placed on the clock
                seconds = float(frame.pts * frame.time_base)
                first = seconds if first is None else first
                seconds -= first
                stats.seconds_seen = max(stats.seconds_seen, seconds)
                if seconds + 1e-6 < next_tick:
                    continue
                while next_tick <= seconds + 1e-6:
                    next_tick += step
                stats.frames_kept += 1
                yield to_rgb(frame), round(seconds, 1)
        except (av.error.FFmpegError, OSError) as err:
            stats.ended = f"source error: {str(err).splitlines()[0][:120]}"
            return
        stats.ended = stats.ended or "end of stream"
    finally:
        container.close()
