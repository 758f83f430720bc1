"""The plan-aware reader gives exactly the frames of front-to-back decoding, decoding fewer; the reading
pipeline overlaps the model, passes errors on, and leaves no thread or process behind."""

from __future__ import annotations

import multiprocessing
import threading
from fractions import Fraction

import av
import numpy as np
import pytest

from videoxl2 import VideoDecodeError
from videoxl2.video import decode as reader
from videoxl2.video.decode import (
    ReadStats,
    decode_front_to_back,
    index_frames,
    iter_frame_batches,
    iter_frames,
)
from videoxl2.video.pipeline import Prefetcher

FRAMES = 96


def _write(path, codec="libx264", fmt=None, vfr=False, gop=12, frames=FRAMES):
    """Textured frames (so B-frames and references matter), 64x48, deterministic."""
    rng = np.random.default_rng(7)
    base = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        if codec == "libx264":
            params = f"b-adapt=0:b-pyramid=normal:keyint-min={gop}:scenecut=0"
            stream.options = {"g": str(gop), "bf": "3", "crf": "20", "x264-params": params}
        elif codec == "libvpx-vp9":
            stream.options = {"g": str(gop), "deadline": "realtime", "cpu-used": "8"}
        if vfr:
            stream.codec_context.time_base = Fraction(1, 1000)
        stamp = 0
        for index in range(frames):
            image = np.roll(base, (index * 2, index * 3), axis=(0, 1))
            image[:8, :8] = index * 2
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            if vfr:
                stamp += int(rng.integers(15, 95))
                frame.pts, frame.time_base = stamp, Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _remux(source, target, fmt=None, shift=0):
    """Copy packets into another container; `shift` moves timestamps back so an edit list hides frames."""
    with av.open(str(source)) as src, av.open(str(target), "w", format=fmt) as dst:
        stream = dst.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(src.streams.video[0]):
            if packet.dts is None:
                continue
            if shift:
                packet.pts -= shift
                packet.dts -= shift
            packet.stream = stream
            dst.mux(packet)
    return target


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reader")
    mp4 = _write(folder / "bframes.mp4")
    return {
        "mp4": mp4,
        "mkv": _write(folder / "bframes.mkv"),
        "webm": _write(folder / "vp9.webm", codec="libvpx-vp9"),
        "vfr": _write(folder / "vfr.mkv", vfr=True),
        "vfr-mp4": _write(folder / "vfr.mp4", vfr=True),
        "edit-list": _remux(mp4, folder / "edit.mp4", shift=5 * 512),
        "mpegts": _write(folder / "stream.ts", fmt="mpegts"),
        "raw-h264": _remux(mp4, folder / "raw.h264", fmt="h264"),
    }


PLANS = {
    "sparse": [3, 40, 41, 90],
    "every 7th": list(range(0, 95, 7)),
    "repeats": [0, 0, 13, 13, 13, 50, 94, 94],
    "one": [55],
    "all": list(range(95)),
}


def _same(a, b) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and np.array_equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("kind", ["mp4", "mkv", "webm", "vfr", "vfr-mp4", "edit-list", "mpegts", "raw-h264"])
def test_frames_are_those_of_front_to_back_decoding(videos, kind):
    path = videos[kind]
    frames_in_file = 91 if kind == "edit-list" else FRAMES  # the edit list hides the first 5 frames
    for name, plan in PLANS.items():
        plan = [i for i in plan if i < frames_in_file]
        stats = ReadStats()
        ours = list(iter_frames(path, plan, stats=stats))
        reference = list(decode_front_to_back(path, plan))
        assert _same(ours, reference), f"{kind}, plan {name}: frames differ ({stats})"
        assert stats.frames_wanted == len(plan)
        expected_path = {"mpegts": "skip", "raw-h264": "front-to-back"}.get(kind, "seek")
        assert stats.path == expected_path, (kind, stats)


@pytest.mark.parametrize("kind", ["mp4", "webm", "mpegts"])
def test_rgb_conversion_is_pyavs_own(videos, kind):
    """The reused swscale context gives the pixels `frame.to_ndarray(format="rgb24")` gives, frame by frame
    (the front-to-back reference converts through it too, so this pins both to PyAV's own conversion)."""
    to_rgb = reader.rgb_converter()
    with av.open(str(videos[kind])) as container:
        for number, frame in enumerate(container.decode(video=0)):
            ours, theirs = to_rgb(frame), frame.to_ndarray(format="rgb24")
            assert ours.shape == theirs.shape and np.array_equal(ours, theirs), (
                f"{kind}, frame {number}: max difference {np.abs(ours.astype(int) - theirs).max()}"
            )


def test_a_sparse_plan_decodes_less_and_seeks(videos):
    stats = ReadStats()
    frames = list(iter_frames(videos["mp4"], [5, 60, 90], stats=stats))
    assert len(frames) == 3 and stats.path == "seek" and stats.seeks >= 1
    assert stats.frames_decoded <= 40, stats  # three keyframe runs at most, of 12 frames each
    dense = ReadStats()
    list(iter_frames(videos["mp4"], list(range(0, 96, 2)), stats=dense))
    assert dense.frames_decoded < FRAMES, f"unwanted non-reference frames were decoded: {dense}"


def test_no_usable_index_falls_back_and_says_why(videos):
    index = index_frames(videos["raw-h264"])
    assert not index.usable and "timestamps" in index.problem
    stats = ReadStats()
    list(iter_frames(videos["raw-h264"], [1, 50], stats=stats))
    assert stats.path == "front-to-back" and stats.reason == index.problem


def test_a_decoder_that_disagrees_with_the_index_falls_back_mid_read(videos, monkeypatch):
    """An index whose later timestamps are wrong: frames already read stay, the rest come front to back."""
    true_index = index_frames(videos["mp4"])
    pts = true_index.frame_pts.copy()
    pts[60:] += 1  # frames 60.. never come out of the decoder with these timestamps
    broken = reader.dataclasses.replace(true_index, frame_pts=pts)
    monkeypatch.setattr(reader, "index_frames", lambda path: broken)
    plan = [2, 30, 61, 80]
    stats = ReadStats()
    ours = list(iter_frames(videos["mp4"], plan, stats=stats))
    assert _same(ours, list(decode_front_to_back(videos["mp4"], plan)))
    assert stats.path == "front-to-back" and "never came out" in stats.reason


def test_worker_processes_give_the_same_frames_in_order(videos):
    plan = list(range(0, 95, 5))
    stats = ReadStats()
    batches = list(iter_frame_batches(videos["mp4"], plan, batch_size=4, workers=2, stats=stats))
    assert [len(b) for b in batches] == [4, 4, 4, 4, 3]
    assert _same(list(np.concatenate(batches)), list(decode_front_to_back(videos["mp4"], plan)))
    assert stats.workers == 2 and stats.path == "seek"
    assert not multiprocessing.active_children()


def test_worker_processes_stop_when_the_reader_is_closed(videos):
    frames = iter_frames(videos["mp4"], list(range(0, 95, 3)), workers=2)
    next(frames)
    assert multiprocessing.active_children()
    frames.close()
    assert not multiprocessing.active_children()


def test_errors_keep_their_one_line_form(videos, tmp_path):
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(videos["mp4"].read_bytes()[: videos["mp4"].stat().st_size // 2])
    with pytest.raises(VideoDecodeError, match="cut.mp4"):
        list(iter_frames(cut, [0, 90]))
    with pytest.raises(VideoDecodeError, match="ended before frame 400"):
        list(iter_frames(videos["mp4"], [0, 400]))


# -- the pipeline ----------------------------------------------------------------------------------------
def _reader_threads():
    return [t for t in threading.enumerate() if t.name.startswith("videoxl2-reader")]


def test_prefetcher_runs_ahead_by_at_most_its_depth():
    made = []

    def items():
        for i in range(10):
            made.append(i)
            yield i

    with Prefetcher(items, depth=2) as ahead:
        assert next(ahead) == 0
        for _ in range(100):
            if len(made) >= 4:
                break
            threading.Event().wait(0.01)
        assert len(made) <= 4  # one handed out, two queued, one waiting to be queued
        assert list(ahead) == list(range(1, 10))
    assert not _reader_threads()


def test_prefetcher_passes_errors_on_and_closes_its_producer():
    closed = threading.Event()

    def items():
        try:
            yield 1
            raise VideoDecodeError("clip.mp4: corrupt video data after 1 sampled frames")
        finally:
            closed.set()

    ahead = Prefetcher(items)
    assert next(ahead) == 1
    with pytest.raises(VideoDecodeError, match="clip.mp4: corrupt"):
        next(ahead)
    assert closed.is_set() and not _reader_threads()


def test_prefetcher_close_stops_an_endless_producer():
    def items():
        i = 0
        while True:
            i += 1
            yield i

    ahead = Prefetcher(items, depth=3)
    next(ahead)
    ahead.close()
    assert not _reader_threads()
