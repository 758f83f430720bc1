"""A session that would not fit its memory budget fails at construction, before any frame is decoded, in one
line naming how many frames would fit."""

from __future__ import annotations

import pytest

from videoxl2.engine import session as session_module
from videoxl2.engine.session import VideoSession
from videoxl2.errors import MemoryBudgetError
from videoxl2.video.synthetic import write_synthetic_video


def test_over_budget_fails_before_decoding(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny
    video = write_synthetic_video(tmp_path / "v.mp4", num_frames=64, fps=4.0)
    small = VideoSession.from_path(model, tokenizer, video, max_num_frames=16, sample_fps=4.0)
    large = VideoSession.from_path(model, tokenizer, video, max_num_frames=64, sample_fps=4.0)
    budget = (small.memory_estimate.total + large.memory_estimate.total) // 2

    def no_decoding(*args, **kwargs):
        raise AssertionError("a frame was decoded before the budget check")

    monkeypatch.setattr(session_module, "iter_frame_batches", no_decoding)
    with pytest.raises(MemoryBudgetError) as caught:
        VideoSession.from_path(
            model, tokenizer, video, max_num_frames=64, sample_fps=4.0, memory_budget=budget
        ).prefill()
    message = str(caught.value)
    assert "\n" not in message and "64 frames" in message and "frames fit: lower max_num_frames" in message
    assert 16 <= caught.value.frames_that_fit < 64, message
    assert f"at most {caught.value.frames_that_fit:,} frames fit" in message
    # what it names does fit
    fits = VideoSession.from_path(
        model, tokenizer, video, max_num_frames=caught.value.frames_that_fit, sample_fps=4.0,
        memory_budget=budget,
    )  # fmt: skip
    assert fits.memory_estimate.total <= budget


def test_an_int8_session_is_checked_at_its_own_size(tiny, tmp_path):
    """The check before decoding prices an int8 video memory as int8, to the byte of what it then holds."""
    from videoxl2.engine.settings import EngineSettings

    model, tokenizer = tiny
    video = write_synthetic_video(tmp_path / "v.mp4", num_frames=32, fps=4.0)
    sessions = {}
    for kv in ("auto", "int8"):
        settings = EngineSettings.from_config(model.config, mode="chunked", kv_dtype=kv)
        sessions[kv] = VideoSession.from_path(
            model, tokenizer, video, 32, 4.0, settings=settings, progress=False
        )
    small, full = sessions["int8"].memory_estimate, sessions["auto"].memory_estimate
    assert small.video_kv < 0.5 * full.video_kv
    memory = sessions["int8"].prefill()
    assert small.video_kv == memory.dense_bytes(), (small.video_kv, memory.dense_bytes())
