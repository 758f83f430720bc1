"""The int8 video memory (`kv_dtype="int8"`): the layout budget.py states, byte for byte; logits close to full
precision on a tiny model in every mode; chunks dequantized, never the whole cache; saved files that load
back as they were; and the knob on every entry point. Full precision ("auto") is covered, unchanged, by
tests/test_engine.py and tests/test_engine_kernels.py."""

from __future__ import annotations

import argparse
import copy

import pytest
import torch
from engine_helpers import BUDGET_FRAMES, tiny_session

from videoxl2.engine import budget, prefill
from videoxl2.engine.budget import TokenCounts, estimate, kv_bytes_per_token
from videoxl2.engine.decode import run_on_cache
from videoxl2.engine.memory import VideoMemory
from videoxl2.engine.prefill import Int8Rows, prefill_video, stored_attention
from videoxl2.engine.runner import attention
from videoxl2.engine.select import choose_units, score_units
from videoxl2.engine.settings import EngineSettings
from videoxl2.errors import InputError
from videoxl2.prompt import build_layout, build_prompt

GROUPS = 13
FRAMES = BUDGET_FRAMES


@pytest.fixture(scope="module")
def case(tiny):
    model, tokenizer = tiny
    config = model.config
    layout = build_layout(
        tokenizer,
        build_prompt("What colour is the square?"),
        [i * 2.5 for i in range(GROUPS)],
        config.tokens_per_group,
        config.video_token_id,
    )
    embeds = torch.randn(
        GROUPS, config.tokens_per_group, config.hidden_size, generator=torch.Generator().manual_seed(1)
    )
    return model, tokenizer, layout, embeds


def build(case, chunked: bool, kv_dtype: str, block_size: int = 2, prev_blocks: int = 1):
    model, _, layout, embeds = case
    cut = 2 * block_size
    with torch.inference_mode():
        run = prefill_video(
            model, layout, iter([embeds[:cut], embeds[cut:]]), chunked, block_size, prev_blocks, kv_dtype
        )
    return run, VideoMemory.from_store(run.store, layout, run.runner, 2, 4)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# -- the layout ----------------------------------------------------------------------------------------
def test_rows_round_trip_within_half_a_step():
    x = torch.randn(2, 50, 32) * torch.logspace(-3, 2, 50)[None, :, None]
    x[1, 7] = 0  # a zero row stays zero
    q = Int8Rows.quantize(x)
    assert q.data.dtype == torch.int8 and q.scale.dtype == budget.KV_INT8_SCALE_DTYPE
    assert q.scale.shape == (2, 50, 1) and int(q.data.abs().max()) <= 127
    step = q.scale.float()
    assert bool(((q.dequantize() - x).abs() <= step / 2 + 1e-6 * x.abs()).all())
    assert bool((q.dequantize()[1, 7] == 0).all())
    assert q.nbytes() == 2 * 50 * (32 * budget.KV_INT8_ELEMENT_BYTES + budget.KV_INT8_SCALE_BYTES)
    half = q.dequantize(torch.bfloat16)
    assert half.dtype == torch.bfloat16 and relative_error(half.float(), x) < 0.01


def test_stored_attention_equals_sdpa_on_the_dequantized_keys(case, monkeypatch):
    """The chunked online softmax (few queries) and the SDPA path (many) give what plain attention over the
    dequantized stored keys followed by the exact ones gives, with and without per-row visibility."""
    torch.manual_seed(0)
    keys, values = Int8Rows.quantize(torch.randn(2, 300, 16)), Int8Rows.quantize(torch.randn(2, 300, 16))
    monkeypatch.setattr(prefill, "INT8_CHUNK", 64)  # several chunks, the last one short
    for n in (1, 5, 80):
        q, k, v = torch.randn(4, n, 16), torch.randn(2, n, 16), torch.randn(2, n, 16)
        whole_k = torch.cat([keys[:, :250].dequantize(), k], 1)
        whole_v = torch.cat([values[:, :250].dequantize(), v], 1)
        expected = attention(q, whole_k, whole_v, causal=True)
        got = stored_attention(q, keys, values, 250, k, v)
        assert (got - expected).abs().max() < 1e-5, n
    # time-token rows: query i sees the exact keys 0 .. rows[i] (not the last n)
    q, k, v = torch.randn(4, 3, 16), torch.randn(2, 10, 16), torch.randn(2, 10, 16)
    rows = [2, 3, 9]
    got = stored_attention(q, keys, values, 250, k, v, rows=rows)
    for i, row in enumerate(rows):
        expected = attention(
            q[:, i : i + 1],
            torch.cat([keys[:, :250].dequantize(), k[:, : row + 1]], 1),
            torch.cat([values[:, :250].dequantize(), v[:, : row + 1]], 1),
        )
        assert (got[:, i : i + 1] - expected).abs().max() < 1e-5


# -- close to full precision -----------------------------------------------------------------------------
@pytest.mark.parametrize("chunked", [False, True])
def test_logits_close_to_full_precision(case, chunked):
    """Question logits from an int8 memory against the same run in full precision (tiny random model, fp32):
    the store itself (dense units), a bi-level cache rerotated or not, a generated token after the
    question, and the unit scores. Measured: 1-3% relative error (L2), 6% for the bi-level cache at
    original positions, as much as quantizing the full-precision memory afterwards gives (the tiny random
    model is that sensitive there); a wrong row, scale or rotation gives O(1)."""
    model, _, layout, _ = case
    question = layout.input_ids[layout.video_end :]
    results = {}
    for kv_dtype in ("auto", "int8"):
        run, memory = build(case, chunked, kv_dtype)
        out = {}
        with torch.inference_mode():
            with memory.question_cache(run.runner, None, reserve=question.numel() + 1) as cache:
                out["store"] = run_on_cache(run.runner, model, cache, question)
                out["next token"] = run_on_cache(run.runner, model, cache, torch.tensor([7]))
            for rerotate in (True, False):
                mixed = memory.assemble(run.runner, [0, 3, memory.num_units - 1], rerotate=rerotate)
                out[f"bi-level rerotate={rerotate}"] = run_on_cache(run.runner, model, mixed, question)
            out["scores"] = score_units(model, memory, question)
        results[kv_dtype] = out
    for name, exact in results["auto"].items():
        error = relative_error(results["int8"][name], exact)
        assert error < 0.15, f"{name}: relative logit error {error:.3f}"
    scores = results["auto"]["scores"], results["int8"]["scores"]
    assert choose_units(scores[0], 2) == choose_units(scores[1], 2)


def test_int8_store_holds_int8_everywhere(case):
    run, memory = build(case, True, "int8")
    store = run.store
    for t in (*store.key_buffers, *store.value_buffers, *store.global_keys, *store.global_values):
        assert isinstance(t, Int8Rows) and t.data.dtype == torch.int8
    assert memory.int8 and memory.dtype == torch.int8
    memory.build_sparse(run.runner)
    assert all(isinstance(t, Int8Rows) for t in (*memory.sparse_keys, *memory.sparse_values))
    mixed = memory.assemble(run.runner, [0, 2])
    assert mixed.int8 and all(isinstance(t, Int8Rows) for t in (*mixed.keys, *mixed.values))


def test_attention_dequantizes_chunks_not_the_cache(case, monkeypatch):
    """Pre-fill reads back at most a chunked block's gathered set (prefix, time tokens, the window), and a
    question and its answer at most `INT8_CHUNK` keys at a time: never the whole store in full precision."""
    model, _, layout, _ = case
    sizes = []
    original = Int8Rows.dequantize

    def recording(self, dtype=torch.float32, out=None):
        sizes.append(self.shape[1])
        return original(self, dtype, out)

    monkeypatch.setattr(Int8Rows, "dequantize", recording)
    monkeypatch.setattr(prefill, "INT8_CHUNK", 32)
    run, memory = build(case, True, "int8", block_size=1, prev_blocks=1)
    time_tokens = sum(g.visual_start - g.time_start for g in layout.groups)
    window = 2 * (layout.groups[0].end - layout.groups[0].time_start)
    assert 0 < max(sizes) <= layout.video_start + time_tokens + window < layout.video_end // 2
    sizes.clear()
    question = layout.input_ids[layout.video_end :]
    with (
        torch.inference_mode(),
        memory.question_cache(run.runner, None, reserve=question.numel() + 1) as cache,
    ):
        run_on_cache(run.runner, model, cache, question)
        run_on_cache(run.runner, model, cache, torch.tensor([7]))
    assert sizes and max(sizes) <= 32


@pytest.mark.parametrize("chunked", [False, True])
def test_int8_steps_need_no_sync(case, chunked):
    """On the meta device any data-dependent step raises: quantizing, reading back, building the sparse KV,
    assembling and re-rotating an int8 cache and decoding on it make no host-device synchronisation."""
    model, _, layout, embeds = case
    meta, embeds = copy.deepcopy(model).to("meta"), embeds.to("meta")
    with torch.inference_mode():
        run = prefill_video(meta, layout, iter([embeds[:4], embeds[4:]]), chunked, 2, 1, "int8")
        memory = VideoMemory.from_store(run.store, layout, run.runner, 2, 4)
        question = layout.input_ids[layout.video_end :]
        with memory.question_cache(run.runner, reserve=16) as mixed:
            run_on_cache(run.runner, meta, mixed, question)
            run_on_cache(run.runner, meta, mixed, torch.tensor([5]))
        for rerotate in (True, False):
            mixed = memory.assemble(run.runner, [0, 3], rerotate=rerotate, reserve=4)
            logits = run_on_cache(run.runner, meta, mixed, question)
    assert logits.device.type == "meta" and logits.shape == (meta.config.text_config.vocab_size,)


# -- bytes: what budget.py predicts ------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["dense", "chunked", "bilevel"])
def test_kv_bytes_equal_the_budget_exactly(tiny, mode):
    settings = EngineSettings(mode=mode, unit_size=4, topk=1, compression=4, kv_dtype="int8")
    session = tiny_session(tiny, settings)
    config = session.model.config
    found = estimate(
        config, TokenCounts.from_layout(session.layout), settings, torch.float32, kv_dtype="int8"
    )
    memory = session.prefill()
    answer = session.ask("What is shown?", generation_config={"max_new_tokens": 2})
    assert memory.dense_bytes() == found.video_kv == session.stats["dense_kv_bytes"]
    assert memory.sparse_bytes() == found.sparse_kv
    assert answer.stats["kv_bytes"] == found.assembled_kv
    assert session.stats["sparse_kv_bytes"] == memory.sparse_size_bytes()
    if mode == "bilevel":
        assert memory.sparse_bytes() == memory.sparse_size_bytes() > 0
    shape = budget.Shape.of(config)  # layers x (K, V) x KV heads x (head_dim int8 bytes + one scale)
    per_token = kv_bytes_per_token(config, "int8")
    assert per_token == shape.layers * 2 * shape.kv_heads * (shape.head_dim + budget.KV_INT8_SCALE_BYTES)
    assert memory.dense_bytes() == session.layout.video_end * per_token


def test_released_7b_int8_kv_is_about_half_of_bf16():
    from videoxl2.config import VideoXL2Config

    config = VideoXL2Config.released()
    int8 = kv_bytes_per_token(config, "int8")
    assert int8 == 28 * 2 * 4 * (128 + budget.KV_INT8_SCALE_BYTES)
    assert int8 <= 0.52 * kv_bytes_per_token(config, "bf16") and int8 <= 0.27 * kv_bytes_per_token(
        config, "fp32"
    )


# -- files ---------------------------------------------------------------------------------------------
def test_save_and_load_keep_the_int8_rows(case, tmp_path):
    from safetensors import safe_open

    model, _, layout, _ = case
    run, memory = build(case, True, "int8")
    memory.build_sparse(run.runner)
    path = memory.save(tmp_path / "memory.safetensors", {"video": "clip.mp4"})
    with safe_open(path, framework="pt") as handle:
        names = set(handle.keys())
        assert handle.get_tensor("keys.0").dtype == torch.int8
        assert handle.get_tensor("scales.keys.0").shape == memory.keys[0].shape[:2]
        assert {"scales.values.0", "scales.sparse_keys.0", "scales.sparse_values.0"} <= names
    full_run, full = build(case, True, "auto")
    full.build_sparse(full_run.runner)
    ratio = path.stat().st_size / full.save(tmp_path / "full.safetensors").stat().st_size
    assert ratio < 1.1 * (memory.dense_bytes() + memory.sparse_bytes()) / (
        full.dense_bytes() + full.sparse_bytes()
    )
    loaded, extra = VideoMemory.load(path, dtype=torch.bfloat16)  # an int8 memory stays int8
    assert extra == {"video": "clip.mp4"} and loaded.int8 and loaded.has_sparse
    for a, b in zip(
        loaded.keys + loaded.values + loaded.sparse_keys + loaded.sparse_values,
        memory.keys + memory.values + memory.sparse_keys + memory.sparse_values,
    ):
        assert torch.equal(a.data, b.data) and torch.equal(a.scale, b.scale)
    assert loaded.dense_bytes() == memory.dense_bytes() and loaded.spare == prefill.SPARE_TOKENS
    question = layout.input_ids[layout.video_end :]
    with torch.inference_mode():
        logits = [
            run_on_cache(run.runner, model, m.assemble(run.runner, [0, 3]), question)
            for m in (memory, loaded)
        ]
    assert torch.equal(*logits)


# -- the knob everywhere -------------------------------------------------------------------------------------
def test_settings_default_and_refusal():
    assert EngineSettings().kv_dtype == "auto"
    assert EngineSettings().with_overrides(kv_dtype="int8").kv_dtype == "int8"
    with pytest.raises(InputError, match="kv_dtype must be one of auto, int8"):
        EngineSettings(kv_dtype="int4")
    with pytest.raises(InputError, match="kv_dtype"):
        prefill.check_kv_dtype("fp8")


def test_cli_flag_and_plan_keeps_its_own():
    from videoxl2.cli import _add_memory_args, _engine_overrides, _memory_overrides, build_parser, main
    from videoxl2.engine import plan

    parser = build_parser()
    args = parser.parse_args(["chat", "v.mp4", "what?", "--kv-dtype", "int8"])
    assert _engine_overrides(args)["kv_dtype"] == "int8"
    assert _memory_overrides(parser.parse_args(["chat", "v.mp4", "what?"]))["kv_dtype"] is None
    with pytest.raises(SystemExit):
        parser.parse_args(["chat", "v.mp4", "what?", "--kv-dtype", "int4"])
    plan_parser = argparse.ArgumentParser()
    plan.add_arguments(plan_parser)  # adds _add_memory_args, then its own --kv-dtype with float dtypes
    plan_args = plan_parser.parse_args(["--kv-dtype", "fp16"])
    assert plan_args.kv_dtype == "fp16" and _memory_overrides(plan_args)["kv_dtype"] is None
    assert _memory_overrides(plan_parser.parse_args(["--kv-dtype", "int8"]))["kv_dtype"] == "int8"
    niah = argparse.ArgumentParser()
    _add_memory_args(niah)
    assert niah.parse_args(["--kv-dtype", "int8"]).kv_dtype == "int8"
    assert main(["plan", "--frames", "64", "--kv-dtype", "int8", "--json"]) == 0


def test_serve_request_field():
    from pydantic import ValidationError

    from videoxl2.serve.schemas import ChatRequest

    message = [{"role": "user", "content": "hi"}]
    assert ChatRequest(messages=message, kv_dtype="int8").engine() == {"kv_dtype": "int8"}
    assert "kv_dtype" not in ChatRequest(messages=message).engine()
    with pytest.raises(ValidationError):
        ChatRequest(messages=message, kv_dtype="int4")


def test_lmms_eval_model_arg(tiny_checkpoint):
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed")
    from videoxl2.eval.lmms_plugin import VideoXL2

    assert VideoXL2(pretrained=str(tiny_checkpoint), kv_dtype="int8").settings.kv_dtype == "int8"
    assert VideoXL2(pretrained=str(tiny_checkpoint)).settings.kv_dtype == "auto"


@pytest.mark.parametrize("mode", ["dense", "chunked", "bilevel"])
def test_session_answers_from_an_int8_memory(tiny, mode):
    """A whole session (vision included) in int8: two questions from one memory, the second after the
    first answer's tokens went through the store's spare slots."""
    settings = EngineSettings(mode=mode, unit_size=2, topk=1, kv_dtype="int8")
    session = tiny_session(tiny, settings, frames=32)
    first = session.ask("What is shown?", generation_config={"max_new_tokens": 3})
    second = session.ask("What colour?", generation_config={"max_new_tokens": 3})
    assert len(first.token_ids) == 3 and len(second.token_ids) == 3
    assert session.memory.int8 and first.stats["kv_bytes"] > 0
