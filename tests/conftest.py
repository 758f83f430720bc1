"""Shared fixtures: a tiny random model and tokenizer, and a small synthetic video (made on the fly)."""

from __future__ import annotations

import pytest
import torch

# Tiny models gain nothing from a second thread, and on a busy 2-core machine it costs several times over.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny():
    from videoxl2.tiny import build_tiny_model

    return build_tiny_model(seed=0)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    from videoxl2.tiny import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def synthetic_video(tmp_path_factory):
    """22 frames at 4 fps (5.5 s): not a multiple of 4, so padding is exercised."""
    from videoxl2.video.synthetic import write_synthetic_video

    return write_synthetic_video(
        tmp_path_factory.mktemp("video") / "clip.mp4", num_frames=22, fps=4.0, seed=0
    )
