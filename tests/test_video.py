"""Video input: the sampling rule, streaming decoding, preprocessing, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from videoxl2 import InputError, MediaNotFoundError, VideoDecodeError
from videoxl2.video import (
    expand_to_square,
    iter_frame_batches,
    load_image,
    plan_sampling,
    preprocess_frames,
    probe_video,
    read_video,
)
from videoxl2.video.synthetic import PALETTE, write_synthetic_video


# -- sampling (spec §3) ----------------------------------------------------------------------------------
def test_one_fps_of_a_30fps_video():
    plan = plan_sampling(num_frames=300, avg_fps=30.0, max_num_frames=100, sample_fps=1)
    assert plan.indices == list(range(0, 300, 30))
    assert plan.timestamps == [float(i) for i in range(10)]


def test_max_sample_fps_raises_the_rate_for_short_videos():
    # 10 indices at 1 fps; budget 100 // 10 = 10 > max 4 -> 4 fps -> step round(30 / 4) = 8 (banker's 7.5)
    plan = plan_sampling(300, 30.0, 100, 1, max_sample_fps=4)
    assert plan.indices == list(range(0, 300, 8))
    # budget 25 // 10 = 2 fps -> step 15
    assert plan_sampling(300, 30.0, 25, 1, max_sample_fps=4).indices == list(range(0, 300, 15))
    # budget 10 // 10 = 1 fps: not above sample_fps, no change
    assert plan_sampling(300, 30.0, 10, 1, max_sample_fps=4).indices == list(range(0, 300, 30))


def test_cap_spreads_frames_uniformly():
    plan = plan_sampling(3600 * 30, 30.0, 256, 1)
    assert len(plan.indices) == 256 and plan.indices[0] == 0 and plan.indices[-1] == 3600 * 30 - 1
    expected = np.linspace(0, 3600 * 30 - 1, 256, dtype=int).tolist()
    assert plan.indices == expected
    assert plan.timestamps[-1] == round((3600 * 30 - 1) / 30, 1)


def test_clip_shorter_than_a_second_and_low_fps_videos():
    assert plan_sampling(10, 25.0, 64, 1).indices == [0]
    # 0.5 fps video: step round(0.5 / 1) = 0 -> every frame
    plan = plan_sampling(20, 0.5, 64, 1)
    assert plan.indices == list(range(20)) and plan.timestamps[:3] == [0.0, 2.0, 4.0]


def test_uniform_sampling_without_fps():
    plan = plan_sampling(1000, 25.0, 10, sample_fps=None)
    assert plan.indices == np.linspace(0, 999, 10, dtype=int).tolist()
    assert plan_sampling(5, 25.0, 10, sample_fps=None).indices == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(num_frames=0, avg_fps=30.0, max_num_frames=8), VideoDecodeError, "no frames"),
        (dict(num_frames=10, avg_fps=0.0, max_num_frames=8), VideoDecodeError, "frame rate"),
        (dict(num_frames=10, avg_fps=30.0, max_num_frames=0), InputError, "max_num_frames"),
        (dict(num_frames=10, avg_fps=30.0, max_num_frames=8, sample_fps=-1), InputError, "sample_fps"),
        (dict(num_frames=10, avg_fps=30.0, max_num_frames=8, max_sample_fps=0), InputError, "max_sample_fps"),
    ],
)
def test_bad_sampling_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        plan_sampling(**kwargs)


# -- decoding --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_synthetic_video(
        tmp_path_factory.mktemp("v") / "c.mp4", num_frames=40, fps=8.0, size=(48, 64)
    )


def colour_index(frame: np.ndarray) -> int:
    """Which palette colour the frame shows (median pixel; the moving square covers < 1/16 of it)."""
    median = np.median(frame.reshape(-1, 3), axis=0)
    return int(np.abs(PALETTE.astype(int) - median).sum(1).argmin())


def test_probe(clip):
    info = probe_video(clip)
    assert (info.num_frames, info.avg_fps, info.duration) == (40, 8.0, 5.0)
    assert (info.width, info.height) == (64, 48)


def test_decoded_frames_are_the_requested_ones(clip):
    indices = [0, 3, 3, 7, 20, 39]
    frames = np.concatenate(list(iter_frame_batches(clip, indices, batch_size=4)))
    assert frames.shape == (6, 48, 64, 3) and frames.dtype == np.uint8
    for frame, index in zip(frames, indices):
        assert colour_index(frame) == index % len(PALETTE), index


def test_batches_stream(clip):
    sizes = [len(b) for b in iter_frame_batches(clip, list(range(0, 40, 2)), batch_size=6)]
    assert sizes == [6, 6, 6, 2]


def test_read_video_plan_and_frames(clip):
    plan, batches = read_video(clip, max_num_frames=16, sample_fps=2, max_sample_fps=4)
    # 2 fps of 8 fps -> step 4 (10 frames); the budget 16 // 10 = 1 fps does not raise the rate
    assert plan.indices == list(range(0, 40, 4)) and plan.timestamps[1] == 0.5
    assert sum(len(b) for b in batches) == len(plan.indices)


def test_variable_frame_rate_probe(tmp_path):
    """Frames with irregular timestamps: the average rate is frames / duration."""
    import av

    path = tmp_path / "vfr.mkv"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=1000)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        stream.codec_context.time_base = __import__("fractions").Fraction(1, 1000)
        pts = [0, 100, 150, 600, 1000, 1100, 1900, 2000]
        for index, stamp in enumerate(pts):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), index * 30, np.uint8), format="rgb24")
            frame.pts = stamp
            frame.time_base = stream.codec_context.time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    info = probe_video(path)
    assert info.num_frames == 8
    assert 3.0 <= info.avg_fps <= 4.5  # 8 frames over ~2 s
    frames = np.concatenate(list(iter_frame_batches(path, [0, 5, 7])))
    assert frames.shape[0] == 3


def test_missing_and_non_video_files(tmp_path):
    with pytest.raises(MediaNotFoundError, match="nope.mp4: no such file"):
        probe_video(tmp_path / "nope.mp4")
    with pytest.raises(MediaNotFoundError):
        probe_video(tmp_path)
    text = tmp_path / "readme.mp4"
    text.write_text("just text")
    with pytest.raises(VideoDecodeError, match="readme.mp4: not a video file"):
        probe_video(text)


def test_audio_only_file_has_no_video_stream(tmp_path):
    import av

    path = tmp_path / "tone.wav"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with pytest.raises(VideoDecodeError, match="tone.wav: no video stream"):
        probe_video(path)


def test_truncated_file(clip, tmp_path):
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(clip.read_bytes()[: clip.stat().st_size // 2])
    with pytest.raises(VideoDecodeError, match="cut.mp4"):
        plan, batches = read_video(cut, 16)
        list(batches)


def test_header_promising_more_frames_than_decoded(clip):
    with pytest.raises(VideoDecodeError, match="ended before frame 45"):
        list(iter_frame_batches(clip, [0, 45]))


# -- images and preprocessing ----------------------------------------------------------------------------
def test_image_loading_and_square_padding(tmp_path):
    path = tmp_path / "img.png"
    Image.fromarray(np.full((10, 20, 3), 250, np.uint8)).save(path)
    image = load_image(path)
    square = expand_to_square(image)
    assert square.shape == (20, 20, 3)
    assert (square[0, 0] == 127).all() and (square[10, 10] == 250).all()
    (tmp_path / "bad.png").write_bytes(b"garbage")
    with pytest.raises(VideoDecodeError, match="bad.png: not a readable image"):
        load_image(tmp_path / "bad.png")


def test_preprocess_matches_hand_computation():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (2, 7, 5, 3), dtype=np.uint8)
    pixels = preprocess_frames(frames, image_size=9)
    assert pixels.shape == (2, 3, 9, 9) and pixels.dtype == torch.float32
    for frame, out in zip(frames, pixels):
        resized = np.asarray(Image.fromarray(frame).resize((9, 9), Image.Resampling.BICUBIC)).astype(
            np.float32
        )
        expected = torch.from_numpy((resized / 255.0 - 0.5) / 0.5).permute(2, 0, 1)
        assert torch.allclose(out, expected, atol=1e-6)
    assert pixels.min() >= -1 and pixels.max() <= 1


def test_preprocess_rejects_bad_arrays():
    with pytest.raises(InputError, match="uint8"):
        preprocess_frames(np.zeros((2, 4, 4, 3), dtype=np.float32))
    with pytest.raises(InputError):
        preprocess_frames(np.zeros((4, 4, 3), dtype=np.uint8))


def test_synthetic_writer_is_atomic_and_deterministic(tmp_path):
    a = write_synthetic_video(tmp_path / "a.mp4", 8, seed=3)
    b = write_synthetic_video(tmp_path / "b.mp4", 8, seed=3)
    assert a.read_bytes() == b.read_bytes()
    with pytest.raises(ValueError):
        write_synthetic_video(tmp_path / "odd.mp4", 4, size=(33, 32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4", "b.mp4"]
