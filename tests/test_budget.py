"""Memory known before it runs: the estimate's KV bytes against a real session, the released 7B against the
design's figures, and the one-line refusal naming the frames that fit."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import BUDGET_FRAMES, tiny_session

from videoxl2.config import VideoXL2Config
from videoxl2.engine.budget import (
    TokenCounts,
    available_bytes,
    check_fits,
    estimate,
    frames_that_fit,
    kv_bytes_per_token,
    qwen_time_tokens,
    weight_bytes,
)
from videoxl2.engine.settings import EngineSettings
from videoxl2.errors import InputError, MemoryBudgetError

FRAMES = BUDGET_FRAMES


def close(predicted: int, measured: int, tolerance: float = 0.02) -> bool:
    return abs(predicted - measured) <= tolerance * measured


def test_kv_bytes_equal_a_tiny_sessions(tiny):
    settings = EngineSettings(mode="bilevel", unit_size=4, topk=1, compression=4)
    session = tiny_session(tiny, settings)
    found = estimate(
        session.model.config,
        TokenCounts.from_layout(session.layout),
        settings,
        torch.float32,
        session.frames_per_batch(),
        include_weights=False,
    )
    memory = session.prefill()
    assert close(found.video_kv, memory.dense_bytes()), (found.video_kv, memory.dense_bytes())
    answer = session.ask("What is shown?", generation_config={"max_new_tokens": 2})
    # the sparse KV exists once a bi-level question needed it
    assert close(found.sparse_kv, memory.sparse_bytes()), (found.sparse_kv, memory.sparse_bytes())
    # the bi-level cache of the first, the last and the best unit dense, the other two pooled
    assert close(found.assembled_kv, answer.stats["kv_bytes"]), (found.assembled_kv, answer.stats)
    assert found.video_kv > found.assembled_kv > found.sparse_kv > 0


@pytest.mark.parametrize("mode", ["dense", "chunked"])
def test_dense_modes_hold_no_sparse_kv(tiny, mode):
    settings = EngineSettings(mode=mode)
    session = tiny_session(tiny, settings, frames=32)
    counts = TokenCounts.from_layout(session.layout)
    found = estimate(session.model.config, counts, settings, torch.float32, 16, include_weights=False)
    assert found.sparse_kv == 0 and found.sparse_build == 0
    assert (
        found.assembled_kv
        == found.video_kv
        == counts.video_end * kv_bytes_per_token(session.model.config, "fp32")
    )
    assert close(found.video_kv, session.prefill().dense_bytes())
    assert found.total >= found.video_kv + found.prefill_globals


def test_released_7b_matches_the_design_numbers():
    config = VideoXL2Config.released()
    assert kv_bytes_per_token(config, torch.bfloat16) == 28 * 2 * 4 * 128 * 2 == 57_344  # "57 KB"
    assert 15.5e9 < weight_bytes(config, "bf16") < 17e9  # "~16 GB bf16" (vision + DTS + LLM, 8.1B)
    assert qwen_time_tokens(9996.0) == 10  # Time, ' ', 9, 9, 9, 6, '.', 0, s, ':'
    counts = TokenCounts.for_frames(10_000, config.tokens_per_group)
    assert 375_000 <= counts.video_end <= 390_000  # "10,000 frames ≈ 375k-383k tokens"
    found = estimate(config, counts, EngineSettings(mode="bilevel"), torch.bfloat16)
    assert 21e9 < found.video_kv < 22.5e9  # "≈ 21 GB", "dense video KV 21.9 GB"
    assert 2.1e6 < found.video_kv / 10_000 < 2.3e6  # "about 2.2 MB per frame"
    assert 6.3e9 < found.sparse_kv < 6.9e9  # "sparse 6.6 GB"
    assert found.total > found.weights + found.video_kv + found.sparse_kv
    chunked = estimate(config, counts, EngineSettings(mode="chunked"), torch.bfloat16)
    assert chunked.sparse_kv == 0 and chunked.total < found.total
    # a 24 GB card: bf16 weights leave room for a few thousand frames, fewer in bi-level
    budget = 24 * 2**30
    most = frames_that_fit(config, EngineSettings(mode="chunked"), "bf16", budget, include_weights=True)
    fewer = frames_that_fit(config, EngineSettings(mode="bilevel"), "bf16", budget, include_weights=True)
    assert 2_000 < most < 5_000 and 0 < fewer < most


def test_frames_that_fit_is_the_largest_multiple_of_four(tiny):
    config = tiny[0].config
    settings = EngineSettings(mode="chunked")
    counts = TokenCounts.for_frames(400, config.tokens_per_group)
    budget = estimate(config, counts, settings, "fp32", 16, include_weights=False).total
    fit = frames_that_fit(config, settings, "fp32", budget, 16, counts=counts)
    assert fit % 4 == 0 and fit >= 400
    over = estimate(config, counts.scaled(fit + 4), settings, "fp32", 16, include_weights=False)
    assert over.total > budget
    assert estimate(config, counts.scaled(fit), settings, "fp32", 16, include_weights=False).total <= budget


def test_check_fits_names_the_frames_that_fit(tiny):
    settings = EngineSettings(mode="bilevel")
    session = tiny_session(tiny, settings, frames=FRAMES)
    config, layout = session.model.config, session.layout
    args = (config, layout, settings, torch.float32, session.frames_per_batch(), "cpu")
    assert check_fits(*args).total > 0  # a tiny session fits this machine
    half = estimate(
        config,
        TokenCounts.from_layout(layout).scaled(FRAMES // 2),
        settings,
        torch.float32,
        session.frames_per_batch(),
        include_weights=False,
    )
    with pytest.raises(MemoryBudgetError) as caught:
        check_fits(*args, budget_bytes=half.total)
    err = caught.value
    assert isinstance(err, InputError)  # the CLI prints one line, the server answers 400
    assert FRAMES // 2 <= err.frames_that_fit < FRAMES and err.frames_that_fit % 4 == 0
    message = str(err)
    assert "\n" not in message and f"at most {err.frames_that_fit:,} frames fit" in message
    assert message.startswith(f"{FRAMES:,} frames")
    with pytest.raises(MemoryBudgetError, match="not even 4 frames fit") as caught:
        check_fits(*args, budget_bytes=1_000)
    assert caught.value.frames_that_fit == 0 and caught.value.needed > caught.value.available == 1_000
    assert session.memory is None  # nothing was decoded


def test_available_bytes_on_cpu():
    free = available_bytes("cpu")
    assert free is not None and free > 0
    assert available_bytes("meta") is None
