"""Exactness of the engine against the plain dense-mask reference (tiny random models, fp32)."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import engine_case  # noqa: E402
from transformers import DynamicCache
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

from videoxl2.engine.decode import answer_from_cache, run_on_cache
from videoxl2.engine.memory import VideoMemory
from videoxl2.engine.prefill import prefill_video
from videoxl2.engine.reference import chunk_visibility, reference_forward
from videoxl2.engine.runner import attention
from videoxl2.engine.select import (
    choose_units,
    read_selection_file,
    score_units,
    unit_relevance,
    visual_key_units,
)
from videoxl2.errors import InputError
from videoxl2.generation import GenerationSettings

GROUPS = 13


def to_dynamic_cache(mixed, text_config) -> DynamicCache:
    """transformers' own cache holding an assembled cache: the independent path for cross-checks."""
    cache = DynamicCache(config=text_config)
    for layer, (keys, values) in enumerate(zip(mixed.keys, mixed.values)):
        cache.update(keys[None, :, : mixed.length], values[None, :, : mixed.length], layer)
    return cache


@torch.inference_mode()
def question_logits(model, cache, question_ids, start):
    """Logits of the last question token, by transformers' Qwen2 forward on `cache`."""
    positions = torch.arange(start, start + question_ids.numel())[None]
    out = model.llm(input_ids=question_ids[None], position_ids=positions, cache=cache, use_cache=True)
    return model.get_output_embeddings()(out.last_hidden_state[0, -1])


@pytest.fixture(scope="module")
def case(tiny):
    return engine_case(tiny, "What colour is the square?", 2.5, seed=1, groups=GROUPS)


def batches(embeds, block_size):
    """Uneven batches of whole blocks, as the session streams them."""
    cut = 2 * block_size
    return iter([embeds[:cut], embeds[cut:]])


def max_error(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("block_size, prev_blocks", [(1, 0), (2, 1), (4, 1), (3, 2), (4, 3)])
def test_chunked_prefill_equals_reference(case, block_size, prev_blocks):
    model, _, layout, embeds = case
    ref_logits, ref_cache = reference_forward(
        model, layout, embeds, chunk_visibility(layout, block_size, prev_blocks)
    )
    with torch.inference_mode():
        prefill = prefill_video(model, layout, batches(embeds, block_size), True, block_size, prev_blocks)
    end = layout.video_end
    for layer in range(len(prefill.store.keys)):
        err_k = max_error(prefill.store.keys[layer], ref_cache.layers[layer].keys[0, :, :end])
        err_v = max_error(prefill.store.values[layer], ref_cache.layers[layer].values[0, :, :end])
        assert err_k <= 1e-4 and err_v <= 1e-4, f"layer {layer}: K err {err_k:.2e}, V err {err_v:.2e}"
    memory = VideoMemory.from_store(prefill.store, layout, prefill.runner, 4, 4)
    mixed = memory.assemble(prefill.runner, None, rerotate=False)
    with torch.inference_mode():
        logits = question_logits(
            model, to_dynamic_cache(mixed, model.config.text_config), layout.input_ids[end:], end
        )
    err = max_error(logits, ref_logits[-1])
    assert err <= 1e-4, f"question logits differ from the reference by {err:.2e}"
    if -(-GROUPS // block_size) > prev_blocks + 1:  # some block cannot see all earlier ones
        plain_logits, _ = reference_forward(model, layout, embeds)
        assert max_error(plain_logits[-1], ref_logits[-1]) > 1e-3, "the chunk mask should change the result"


def test_chunked_with_all_previous_blocks_equals_plain_dense(case):
    model, _, layout, embeds = case
    plain_logits, plain_cache = reference_forward(model, layout, embeds)
    masked_logits, _ = reference_forward(model, layout, embeds, chunk_visibility(layout, 2, GROUPS))
    assert max_error(plain_logits, masked_logits) <= 1e-5
    for chunked in (True, False):
        with torch.inference_mode():
            prefill = prefill_video(model, layout, batches(embeds, 2), chunked, 2, GROUPS)
        err = max(
            max_error(prefill.store.keys[i], plain_cache.layers[i].keys[0, :, : layout.video_end])
            for i in range(len(prefill.store.keys))
        )
        assert err <= 1e-4, f"chunked={chunked}: KV differs from plain dense by {err:.2e}"


def test_attention_work_is_cut(case):
    model, _, layout, embeds = case
    with torch.inference_mode():
        dense = prefill_video(model, layout, batches(embeds, 1), False, 1, 0)
        chunked = prefill_video(model, layout, batches(embeds, 1), True, 1, 0)
    assert dense.stats.attention_pairs == dense.stats.dense_pairs
    assert chunked.stats.dense_pairs == dense.stats.dense_pairs
    assert chunked.stats.attention_pairs < 0.8 * dense.stats.dense_pairs


def build_memory(case, block_size=2, prev_blocks=1, unit_size=2):
    model, _, layout, embeds = case
    with torch.inference_mode():
        prefill = prefill_video(model, layout, batches(embeds, block_size), True, block_size, prev_blocks)
    return prefill, VideoMemory.from_store(prefill.store, layout, prefill.runner, unit_size, 4)


def test_bilevel_with_every_unit_selected_equals_chunked(case):
    model, tokenizer, layout, _ = case
    prefill, memory = build_memory(case)
    question = layout.input_ids[layout.video_end :]
    settings = GenerationSettings(max_new_tokens=12)
    chunked = answer_from_cache(
        model, tokenizer, memory.assemble(prefill.runner, None, rerotate=False), question, settings
    )
    every = list(range(memory.num_units))
    bilevel = answer_from_cache(
        model, tokenizer, memory.assemble(prefill.runner, every, rerotate=True), question, settings
    )
    assert len(chunked) == 12 and bilevel == chunked


def hand_built_cache(case, selected, unit_size, compression=4):
    """Spec §5 by hand from pre-RoPE K/V captured with hooks on the reference's projections."""
    model, _, layout, embeds = case
    captured = {}
    hooks = []
    for i, layer in enumerate(model.llm.layers):
        hooks.append(
            layer.self_attn.k_proj.register_forward_hook(
                lambda m, a, out, i=i: captured.__setitem__(("k", i), out)
            )
        )
        hooks.append(
            layer.self_attn.v_proj.register_forward_hook(
                lambda m, a, out, i=i: captured.__setitem__(("v", i), out)
            )
        )
    try:
        reference_forward(model, layout, embeds, chunk_visibility(layout, 2, 1))
    finally:
        for hook in hooks:
            hook.remove()
    config = model.config.text_config
    head_dim = config.hidden_size // config.num_attention_heads
    keys, values = [], []
    for i in range(config.num_hidden_layers):
        k = captured[("k", i)][0].view(-1, config.num_key_value_heads, head_dim).transpose(0, 1)
        v = captured[("v", i)][0].view(-1, config.num_key_value_heads, head_dim).transpose(0, 1)
        pieces_k, pieces_v = [k[:, : layout.video_start]], [v[:, : layout.video_start]]
        for unit in range(-(-GROUPS // unit_size)):
            groups = layout.groups[unit * unit_size : (unit + 1) * unit_size]
            if unit in selected:
                pieces_k.append(k[:, groups[0].time_start : groups[-1].end])
                pieces_v.append(v[:, groups[0].time_start : groups[-1].end])
                continue
            for g in groups:
                for source, pieces in ((k, pieces_k), (v, pieces_v)):
                    pieces.append(source[:, g.time_start : g.visual_start])
                    visual = source[:, g.visual_start : g.end]
                    pieces.append(
                        torch.nn.functional.avg_pool1d(visual.transpose(1, 2), compression).transpose(1, 2)
                    )
        keys.append(torch.cat(pieces_k, 1))
        values.append(torch.cat(pieces_v, 1))
    length = keys[0].shape[1]
    cos, sin = model.llm.rotary_emb(keys[0][None], torch.arange(length)[None])
    keys = [apply_rotary_pos_emb(k[None], k[None], cos, sin)[1][0] for k in keys]
    return keys, values


def test_external_selection_cache_equals_hand_built(case):
    prefill, memory = build_memory(case)
    selected = [0, 2, memory.num_units - 1]
    mixed = memory.assemble(prefill.runner, selected, rerotate=True)
    keys, values = hand_built_cache(case, set(selected), unit_size=2)
    assert mixed.length == keys[0].shape[1] == mixed.next_position
    for layer in range(len(keys)):
        err_k, err_v = (
            max_error(mixed.keys[layer], keys[layer]),
            max_error(mixed.values[layer], values[layer]),
        )
        assert err_k <= 1e-4 and err_v <= 1e-4, f"layer {layer}: K err {err_k:.2e}, V err {err_v:.2e}"
    assert mixed.dense_units == selected
    dense = memory.assemble(prefill.runner, None)
    assert mixed.nbytes() < 0.75 * dense.nbytes()  # 3 of 7 units dense


def sparse_visual_owner(layout, unit_size, compression, length):
    """By hand from the layout: the unit of each pooled visual key of the all-sparse cache, -1 elsewhere."""
    owner = [-1] * layout.video_start
    for index, group in enumerate(layout.groups):
        owner += [-1] * (group.visual_start - group.time_start)
        owner += [index // unit_size] * ((group.end - group.visual_start) // compression)
    assert len(owner) == length
    return torch.tensor(owner)


def test_scores_equal_attention_mass_from_reference_attention(case):
    """Per-unit scores = the relevance recomputed from transformers' eager attention weights: per layer, the
    largest mass a head's question token puts on the unit's pooled visual keys, averaged over layers; keys at
    their pre-fill positions."""
    model, _, layout, _ = case
    prefill, memory = build_memory(case)
    question = layout.input_ids[layout.video_end :]
    scores = score_units(model, memory, question)
    mixed = memory.assemble(prefill.runner, (), rerotate=False)
    assert mixed.next_position == layout.video_end
    cache = to_dynamic_cache(mixed, model.config.text_config)
    model.language_model.config._attn_implementation = "eager"
    model.llm.config._attn_implementation = "eager"
    try:
        with torch.inference_mode():
            out = model.llm(
                input_ids=question[None],
                position_ids=torch.arange(layout.video_end, layout.video_end + question.numel())[None],
                cache=cache,
                output_attentions=True,
            )
    finally:
        model.language_model.config._attn_implementation = "sdpa"
        model.llm.config._attn_implementation = "sdpa"
    owner = sparse_visual_owner(layout, memory.unit_size, memory.compression, mixed.length)
    per_layer = []
    for weights in out.attentions:  # (1, heads, question, keys)
        on_units = torch.stack(
            [weights[0][:, :, : mixed.length][:, :, owner == u].sum(-1) for u in range(memory.num_units)], -1
        )
        per_layer.append(on_units.amax((0, 1)))
    expected = torch.stack(per_layer).mean(0)
    err = max_error(scores, expected)
    assert err <= 1e-5, f"scores differ from the hand-computed relevance by {err:.2e}"
    assert scores.numel() == memory.num_units and ((scores > 0) & (scores < 1)).all()
    assert torch.equal(visual_key_units(memory, mixed), owner)


@pytest.mark.parametrize("rerotate", [True, False])
def test_engine_decode_equals_transformers_decode(case, rerotate):
    """Our preallocated-cache decode = transformers' forward on a DynamicCache, on a mixed cache."""
    model, _, layout, _ = case
    prefill, memory = build_memory(case)
    question = layout.input_ids[layout.video_end :]
    mixed = memory.assemble(prefill.runner, [0, 3, memory.num_units - 1], rerotate=rerotate, reserve=2)
    expected = question_logits(
        model, to_dynamic_cache(mixed, model.config.text_config), question, mixed.next_position
    )
    start = mixed.next_position
    logits = run_on_cache(prefill.runner, model, mixed, question)
    assert max_error(logits, expected) <= 1e-4, f"decode logits differ by {max_error(logits, expected):.2e}"
    assert mixed.next_position == start + question.numel()
    following = run_on_cache(prefill.runner, model, mixed, torch.tensor([7]))  # grows past the reserve
    fresh = memory.assemble(prefill.runner, [0, 3, memory.num_units - 1], rerotate=rerotate)
    expected = question_logits(
        model,
        to_dynamic_cache(fresh, model.config.text_config),
        torch.cat([question, torch.tensor([7])]),
        start,
    )
    assert max_error(following, expected) <= 1e-4, (
        f"next-token logits differ by {max_error(following, expected):.2e}"
    )


def test_choose_units_keeps_first_and_last():
    scores = torch.tensor([0.0, 0.5, 0.1, 0.9, 0.2, 0.3])
    assert choose_units(scores, 2) == [0, 1, 3, 5]
    assert choose_units(scores, 0) == [0, 5]
    assert choose_units(scores, 10) == [0, 1, 2, 3, 4, 5]


def test_relevance_is_the_mass_on_a_units_keys(case):
    """One question token, one unit's keys counted: the relevance is that unit's softmax mass, at most 1."""
    model, _, layout, _ = case
    prefill, memory = build_memory(case)
    mixed = memory.assemble(prefill.runner, (), rerotate=False)
    owner = visual_key_units(memory, mixed)
    everything = torch.where(torch.arange(mixed.length) >= layout.video_start, 0, -1)
    embeds = model.get_input_embeddings()(torch.tensor([5]))
    with torch.inference_mode():
        whole = unit_relevance(prefill.runner, mixed, embeds, everything)
        split = unit_relevance(prefill.runner, mixed, embeds, owner)
    # All video keys as one unit: below 1 (the prefix and the token itself take the rest), above any part.
    assert whole.shape == (1,) and 0 < float(whole) < 1
    assert split.shape == (memory.num_units,) and float(split.max()) < float(whole)


def test_memory_save_load_round_trip(case, tmp_path):
    prefill, memory = build_memory(case)
    path = memory.save(tmp_path / "sub" / "memory.safetensors", {"video": "clip.mp4"})
    assert [p.name for p in path.parent.iterdir()] == ["memory.safetensors"]
    loaded, extra = VideoMemory.load(path)
    assert extra == {"video": "clip.mp4"}
    a = memory.assemble(prefill.runner, [0, 3])
    b = loaded.assemble(prefill.runner, [0, 3])
    assert a.unit_slices == b.unit_slices
    assert max(max_error(x, y) for x, y in zip(a.keys + a.values, b.keys + b.values)) == 0.0
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(InputError, match="not a videoxl2 memory file"):
        VideoMemory.load(tmp_path / "junk.safetensors")


def test_selected_units_out_of_range(case):
    prefill, memory = build_memory(case)
    with pytest.raises(InputError, match="out of range"):
        memory.assemble(prefill.runner, [memory.num_units])


def test_release_selection_file(tmp_path):
    path = tmp_path / "selected.json"
    path.write_text(
        '{"needle": {"config": {"selected_chunk_size": 4, "compression": 4},'
        ' "selected_unit_indices": {"clip.mp4_What is the needle?": [7, 2, 3]}}, "topic": null}'
    )
    assert read_selection_file(path, "/data/clip.mp4", "What is the needle?\n(A) red", unit_size=4) == [1, 3]
    assert read_selection_file(path, "/data/other.mp4", "What is the needle?", unit_size=4) is None
    path.write_text("{")
    with pytest.raises(InputError, match="unreadable selection file"):
        read_selection_file(path, "clip.mp4", "q", 4)


@pytest.fixture(scope="module")
def yarn_case():
    """A tiny model whose RoPE scales attention (YaRN's mscale, 1.14 here): every stored key carries it."""
    from videoxl2.tiny import build_tiny_model

    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}
    tiny = build_tiny_model(seed=0, text=dict(rope_parameters=rope, max_position_embeddings=256))
    return engine_case(tiny, "What colour is the square?", 2.5, seed=1, groups=GROUPS)


def test_rope_attention_scaling_is_applied_once(yarn_case):
    """Pre-fill scales fresh keys as transformers does; undoing RoPE for the sparse KV and turning stored
    keys to new positions are pure rotations, so the scale is neither lost nor applied twice."""
    model, _, layout, embeds = yarn_case
    prefill, _ = build_memory(yarn_case)
    runner = prefill.runner
    assert runner.llm.rotary_emb.attention_scaling > 1.1
    _, ref_cache = reference_forward(model, layout, embeds, chunk_visibility(layout, 2, 1))
    end = layout.video_end
    err = max(max_error(k, ref_cache.layers[i].keys[0, :, :end]) for i, k in enumerate(prefill.store.keys))
    assert err <= 1e-4, f"pre-filled keys differ from transformers' by {err:.2e}"

    # Compression 1: each group's sparse keys (RoPE undone, then turned back to their positions) are its
    # dense keys.
    memory = VideoMemory.from_store(prefill.store, layout, runner, 2, 1)
    dense = memory.assemble(runner, None, rerotate=False)
    sparse = memory.assemble(runner, (), rerotate=False)
    assert sparse.length == dense.length
    err = max(max_error(a[:, : dense.length], b[:, : dense.length]) for a, b in zip(sparse.keys, dense.keys))
    assert err <= 1e-5, f"sparse keys at compression 1 differ from the dense ones by {err:.2e}"

    # A stored key turned by d equals the key computed d positions later.
    hidden = model.get_input_embeddings()(layout.input_ids[:6])
    captured = {}

    def keep(layer, q, k, v):
        captured.setdefault(layer, []).append(k.clone())
        return attention(q, k, v, causal=True)

    with torch.inference_mode():
        runner.forward(hidden, torch.arange(6), keep)
        runner.forward(hidden, torch.arange(6) + 37, keep)
    turned = [captured[layer][0].clone() for layer in range(runner.num_layers)]
    runner.rotate_(turned, torch.full((6,), 37.0, dtype=torch.float64))
    err = max(max_error(turned[layer], captured[layer][1]) for layer in range(runner.num_layers))
    assert err <= 1e-5, f"turned keys differ from keys computed at the new positions by {err:.2e}"
