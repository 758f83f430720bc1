"""What the engine asks of the attention kernels and of memory, beyond exactness (tests/test_engine.py):
no tensor masks, no expanded K/V, no copies of the video per question, no sparse KV unless bi-level, no
data-dependent host-device synchronisation inside a pre-fill block or a decoding step."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from engine_helpers import engine_case  # noqa: E402
from torch.nn.attention.bias import CausalBias

from videoxl2.engine import session as session_module
from videoxl2.engine.decode import answer_from_cache, run_on_cache
from videoxl2.engine.memory import VideoMemory
from videoxl2.engine.prefill import SPARE_TOKENS, prefill_video
from videoxl2.engine.select import score_units
from videoxl2.engine.session import VideoSession
from videoxl2.engine.settings import EngineSettings
from videoxl2.errors import InputError
from videoxl2.generation import GenerationSettings

GROUPS = 13
GREEDY = {"do_sample": False, "max_new_tokens": 6}


@pytest.fixture(scope="module")
def case(tiny):
    return engine_case(tiny, "Which shape moves first?", 2.0, seed=3, groups=GROUPS)


class SdpaRecorder:
    """Records the engine's `F.scaled_dot_product_attention` calls. While a call runs, the original is put
    back: a lower-right causal bias dispatches on `func is F.scaled_dot_product_attention`, and on CPU torch
    lowers it into a nested call of its own (not the engine's)."""

    def __init__(self):
        self.calls: list[dict] = []
        self.original = F.scaled_dot_product_attention

    def __call__(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        self.calls.append(
            dict(mask=attn_mask, is_causal=is_causal, gqa=enable_gqa, q=q.shape, k=k.shape, v=v.shape)
        )
        F.scaled_dot_product_attention = self.original
        try:
            return self.original(q, k, v, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
        finally:
            F.scaled_dot_product_attention = self


@pytest.fixture
def recorder(monkeypatch):
    rec = SdpaRecorder()
    monkeypatch.setattr(F, "scaled_dot_product_attention", rec)
    return rec


def assert_mask_free(calls, kv_heads):
    assert calls
    for call in calls:
        mask = call["mask"]
        assert mask is None or isinstance(mask, CausalBias), f"tensor attn_mask {type(mask)} {call}"
        assert call["gqa"] and call["k"][1] == call["v"][1] == kv_heads, f"K/V expanded: {call}"


def batches(embeds, size=4):
    return iter([embeds[:size], embeds[size:]])


@pytest.mark.parametrize("chunked", [False, True])
def test_prefill_attention_is_mask_free(case, recorder, chunked):
    model, _, layout, embeds = case
    with torch.inference_mode():
        prefill_video(model, layout, batches(embeds), chunked, 2, 1)
    kv_heads = model.config.text_config.num_key_value_heads
    assert_mask_free(recorder.calls, kv_heads)
    layers = model.config.text_config.num_hidden_layers
    if chunked:  # per block and layer: one time-token and one visual call per group
        assert len(recorder.calls) == layers * (1 + 2 * GROUPS)
        assert sum(isinstance(c["mask"], CausalBias) for c in recorder.calls) > 0
    else:  # prefix and one call per block of 2 groups
        assert len(recorder.calls) == layers * (1 + -(-GROUPS // 2))


def test_scoring_and_decoding_are_mask_free(case, recorder, monkeypatch):
    model, tokenizer, layout, embeds = case
    with torch.inference_mode():
        prefill = prefill_video(model, layout, batches(embeds), True, 2, 1)
    memory = VideoMemory.from_store(prefill.store, layout, prefill.runner, 2, 4)
    question = layout.input_ids[layout.video_end :]
    recorder.calls.clear()

    def refuse(*args, **kwargs):
        raise AssertionError("scoring expanded K/V to every head")

    with monkeypatch.context() as patch:
        patch.setattr(torch.Tensor, "repeat_interleave", refuse)
        patch.setattr(torch, "repeat_interleave", refuse)
        scores = score_units(model, memory, question)
    assert scores.shape == (memory.num_units,)
    assert recorder.calls == []  # scoring computes its weights itself: they are the result
    settings = GenerationSettings(max_new_tokens=5, stop_strings=())
    with memory.question_cache(prefill.runner, None, rerotate=False, reserve=32) as mixed:
        answer_from_cache(model, tokenizer, mixed, question, settings)
    mixed = memory.assemble(prefill.runner, [0, 2, memory.num_units - 1], rerotate=True)
    answer_from_cache(model, tokenizer, mixed, question, settings)
    kv_heads = model.config.text_config.num_key_value_heads
    assert_mask_free(recorder.calls, kv_heads)
    # The question's tokens: one lower-right causal call per layer; each generated token: unmasked.
    assert any(isinstance(c["mask"], CausalBias) for c in recorder.calls)
    assert sum(c["q"][2] == 1 and c["mask"] is None for c in recorder.calls) > 0


def test_cpu_query_slices_are_exact(case, monkeypatch):
    """On CPU a large lower-right call is split into query slices (torch materialises its mask there): the
    same K/V and logits as one call per layer, to float rounding (measured ~6e-6)."""
    from videoxl2.engine import runner as runner_module

    model, _, layout, embeds = case
    question = layout.input_ids[layout.video_end :]
    results = []
    for budget in (runner_module.CPU_MASK_ELEMENTS, 50):
        monkeypatch.setattr(runner_module, "CPU_MASK_ELEMENTS", budget)
        with torch.inference_mode():
            prefill = prefill_video(model, layout, batches(embeds), True, 2, 1)
            dense = prefill_video(model, layout, batches(embeds), False, 2, 1)
        memory = VideoMemory.from_store(prefill.store, layout, prefill.runner, 2, 4)
        with memory.question_cache(prefill.runner, reserve=question.numel()) as mixed:
            logits = run_on_cache(prefill.runner, model, mixed, question)
        results.append((prefill.store.keys + dense.store.values, logits))
    (kv_one, logits_one), (kv_sliced, logits_sliced) = results
    assert max((a - b).abs().max().item() for a, b in zip(kv_one, kv_sliced)) <= 2e-5
    assert (logits_one - logits_sliced).abs().max().item() <= 1e-4


def storages(tensors) -> list[int]:
    return [t.untyped_storage().data_ptr() for t in tensors]


@pytest.mark.parametrize("mode", ["dense", "chunked"])
def test_dense_questions_run_on_the_store(tiny, synthetic_video, monkeypatch, mode):
    """Dense and chunked sessions hold no sparse KV, and a question runs on the pre-fill store itself:
    the cache handed to decoding shares the memory's storage, and the video part is left as it was."""
    model, tokenizer = tiny
    settings = EngineSettings(mode=mode, block_size=1, prev_blocks=1, unit_size=1)
    session = VideoSession.from_path(
        model, tokenizer, synthetic_video, max_num_frames=24, sample_fps=4, settings=settings
    )
    memory = session.prefill()
    assert memory.sparse_keys is None and memory.sparse_bytes() == 0
    assert memory.spare >= GREEDY["max_new_tokens"] + 32
    before = [t.clone() for t in memory.keys + memory.values]
    seen = []
    original = session_module.answer_from_cache

    def spy(model_, tokenizer_, mixed, *args, **kwargs):
        seen.append((storages(mixed.keys + mixed.values), mixed.length))
        return original(model_, tokenizer_, mixed, *args, **kwargs)

    monkeypatch.setattr(session_module, "answer_from_cache", spy)
    first = session.ask("What colour?", generation_config=GREEDY)
    second = session.ask("What colour?", generation_config=GREEDY)
    assert first.token_ids == second.token_ids
    assert [s for s, _ in seen] == [storages(memory.keys + memory.values)] * 2
    assert seen[0][1] == session.layout.video_end
    assert all(torch.equal(a, b) for a, b in zip(before, memory.keys + memory.values))
    assert memory.sparse_keys is None
    assert first.stats["kv_bytes"] == memory.dense_bytes()


def test_bilevel_builds_sparse_kv_when_first_needed(tiny, synthetic_video):
    model, tokenizer = tiny
    settings = EngineSettings(mode="bilevel", block_size=1, prev_blocks=1, unit_size=1, topk=1)
    session = VideoSession.from_path(
        model, tokenizer, synthetic_video, max_num_frames=24, sample_fps=4, settings=settings
    )
    memory = session.prefill()
    assert memory.sparse_keys is None
    assert session.stats["sparse_kv_bytes"] == memory.sparse_size_bytes() > 0
    session.ask("What colour?", generation_config=GREEDY)
    assert memory.sparse_bytes() == memory.sparse_size_bytes()


def test_question_cache_grows_once_and_lends_once(case):
    """A question longer than the spare slots grows the store once (later questions fit); a second cache
    while the first is lent is a copy; both answer exactly as a fresh assembled cache does."""
    model, tokenizer, layout, embeds = case
    with torch.inference_mode():
        prefill = prefill_video(model, layout, batches(embeds), True, 2, 1)
    memory = VideoMemory.from_store(prefill.store, layout, prefill.runner, 2, 4)
    runner, question = prefill.runner, layout.input_ids[layout.video_end :]
    assert memory.spare == SPARE_TOKENS
    expected = run_on_cache(runner, model, memory.assemble(runner, None, rerotate=False), question)
    with memory.question_cache(runner, reserve=SPARE_TOKENS + 5) as mixed:
        assert memory.spare >= SPARE_TOKENS + 5
        assert storages(mixed.keys) == storages(memory.keys)
        assert torch.equal(run_on_cache(runner, model, mixed, question), expected)
        with memory.question_cache(runner, reserve=8) as other:
            assert storages(other.keys)[0] != storages(memory.keys)[0]
            assert torch.equal(run_on_cache(runner, model, other, question), expected)
    grown = memory.spare
    with memory.question_cache(runner, reserve=8) as mixed:
        assert storages(mixed.keys) == storages(memory.keys) and memory.spare == grown


def test_load_converts_or_refuses_dtype_and_device(case, tmp_path):
    model, _, layout, embeds = case
    with torch.inference_mode():
        prefill = prefill_video(model, layout, batches(embeds), True, 2, 1)
    memory = VideoMemory.from_store(prefill.store, layout, prefill.runner, 2, 4)
    path = memory.save(tmp_path / "memory.safetensors")
    half, _ = VideoMemory.load(path, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.keys[0].shape == memory.keys[0].shape
    with pytest.raises(InputError, match="holds bfloat16 KV but the model computes in float32") as err:
        with half.question_cache(prefill.runner):
            pass
    assert "\n" not in str(err.value)
    with pytest.raises(InputError, match="cannot convert"):
        VideoMemory.load(path, dtype=torch.int8)
    with pytest.raises(InputError, match="cannot load onto device"):
        VideoMemory.load(path, device="nowhere")
    back, _ = VideoMemory.load(path, dtype=torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(back.keys + back.values, memory.keys + memory.values))


@pytest.fixture(scope="module")
def meta_case(case):
    """The tiny model on the meta device: any data-dependent step (`.item()`, `nonzero`, a boolean test or
    a copy to the host) raises there, so code that runs on it makes no host-device synchronisation."""
    model, tokenizer, layout, embeds = case
    return copy.deepcopy(model).to("meta"), layout, embeds.to("meta")


@pytest.mark.parametrize("chunked", [False, True])
def test_prefill_and_decoding_steps_need_no_sync(meta_case, chunked):
    model, layout, embeds = meta_case
    with torch.inference_mode():
        prefill = prefill_video(model, layout, batches(embeds), chunked, 2, 1)
        memory = VideoMemory.from_store(prefill.store, layout, prefill.runner, 2, 4)
        with memory.question_cache(prefill.runner, reserve=16) as mixed:
            logits = run_on_cache(prefill.runner, model, mixed, layout.input_ids[layout.video_end :])
            logits = run_on_cache(prefill.runner, model, mixed, torch.tensor([5]))
    assert logits.device.type == "meta" and logits.shape == (model.config.text_config.vocab_size,)
