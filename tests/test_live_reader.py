"""Live sources: a file still being written, standard input, sampling by presentation time, and sources
that break off mid-stream (what was read is kept, the read ends cleanly)."""

from __future__ import annotations

import io
import subprocess
import sys
import threading
import time
from fractions import Fraction

import av
import numpy as np
import pytest

from videoxl2.errors import InputError, MediaNotFoundError, VideoDecodeError
from videoxl2.video.live import LiveStats, iter_live_frames

FPS = 10


def ts_bytes(seconds: float, fps: int = FPS, vfr_ms: list[int] | None = None) -> bytes:
    """An MPEG-TS stream (what `ffmpeg ... -f mpegts -` sends) whose frame i shows grey level 8 * i."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mpegts") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        stamps = vfr_ms or [round(i * 1000 / fps) for i in range(int(seconds * fps))]
        for index, stamp in enumerate(stamps):
            frame = av.VideoFrame.from_ndarray(
                np.full((32, 32, 3), (index * 8) % 256, np.uint8), format="rgb24"
            )
            frame.pts, frame.time_base = stamp, Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def grey(frame: np.ndarray) -> int:
    return int(round(float(np.median(frame)) / 8))


def test_a_file_still_being_written_is_followed_to_its_end(tmp_path):
    data = ts_bytes(4.0)
    path = tmp_path / "growing.ts"
    path.write_bytes(b"")

    def writer():
        for start in range(0, len(data), len(data) // 8 + 1):
            with open(path, "ab") as handle:
                handle.write(data[start : start + len(data) // 8 + 1])
            time.sleep(0.1)

    thread = threading.Thread(target=writer)
    thread.start()
    stats = LiveStats()
    frames = list(iter_live_frames(str(path), fps=2.0, stats=stats, follow_idle_s=1.0))
    thread.join()
    # 4 s at 2 fps: ticks 0, 0.5, ..., 3.5 -> frames 0, 5, 10, ..., 35 of the 10 fps stream
    assert [t for _, t in frames] == [i * 0.5 for i in range(8)]
    assert [grey(f) for f, _ in frames] == [i * 5 % 32 for i in range(8)]  # grey level 8 * index, mod 256
    assert stats.frames_decoded == 40 and stats.frames_kept == 8 and stats.ended == "end of stream"


def test_sampling_follows_presentation_times_not_frame_counts(tmp_path):
    stamps = [0, 100, 150, 1100, 1150, 1900, 2600, 2700, 4000]  # gaps and bursts
    path = tmp_path / "vfr.ts"
    path.write_bytes(ts_bytes(0, vfr_ms=stamps))
    frames = list(iter_live_frames(str(path), fps=1.0, follow_idle_s=0.1))
    # first frame at or after each whole second: 0 -> 0 ms, 1 -> 1100, 2 -> 2600, 3 -> 4000 (skips 3 and 4)
    assert [t for _, t in frames] == [0.0, 1.1, 2.6, 4.0]
    assert [grey(f) for f, _ in frames] == [0, 3, 6, 8]


READ_STDIN = (
    "import json, sys; from videoxl2.video.live import LiveStats, iter_live_frames; s = LiveStats(); "
    "n = sum(1 for _ in iter_live_frames('-', fps=2.0, stats=s)); print(json.dumps([n, s.ended]))"
)


def test_standard_input(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", READ_STDIN], input=ts_bytes(3.0), capture_output=True, timeout=120, check=True
    )
    assert out.stdout.decode().strip() == '[6, "end of stream"]'


def test_a_producer_killed_mid_stream_ends_the_read_cleanly():
    data = ts_bytes(6.0)
    reader = subprocess.Popen(
        [sys.executable, "-c", READ_STDIN],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    # cut inside a packet, then the producer is gone
    out, err = reader.communicate(input=data[: len(data) // 2 + 77], timeout=120)
    assert reader.returncode == 0, err.decode()[-500:]
    count, ended = __import__("json").loads(out)
    assert 4 <= count <= 7, count  # about half of the 12 frames sampled from 6 s at 2 fps
    assert ended == "end of stream" or ended.startswith("source error"), ended


def test_stop_ends_the_read(tmp_path):
    path = tmp_path / "s.ts"
    path.write_bytes(ts_bytes(4.0))
    stop, stats = threading.Event(), LiveStats()
    frames = []
    for frame in iter_live_frames(str(path), fps=FPS, stop=stop, stats=stats, follow_idle_s=0.1):
        frames.append(frame)
        if len(frames) == 5:
            stop.set()
    assert len(frames) == 5 and stats.ended == "stopped"


def test_bad_sources_are_one_line_errors(tmp_path):
    with pytest.raises(MediaNotFoundError, match="nope.ts: no such file"):
        next(iter_live_frames(str(tmp_path / "nope.ts")))
    with pytest.raises(InputError, match="unsupported URL scheme 'ftp'"):
        next(iter_live_frames("ftp://example.com/live"))
    text = tmp_path / "notes.ts"
    text.write_text("not a video at all\n" * 50)
    with pytest.raises(VideoDecodeError, match="notes.ts: cannot open a video stream"):
        next(iter_live_frames(str(text), follow_idle_s=0.1))
    with pytest.raises(InputError, match="fps must be > 0"):
        next(iter_live_frames(str(text), fps=0))
