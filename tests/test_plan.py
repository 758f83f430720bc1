"""`videoxl2 plan`: its byte predictions against real sessions on CPU (the demo model and two tiny random
configs of other widths, depths and heads), the quantized layouts against tensors stored that way, the
released 7B's figures, and the command (JSON fields, one-line errors)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from videoxl2 import load_model, load_tokenizer
from videoxl2.cli import main
from videoxl2.config import VideoXL2Config
from videoxl2.defaults import DEFAULT_MODEL
from videoxl2.engine import budget
from videoxl2.engine.plan import parse_bytes, plan
from videoxl2.engine.session import VideoSession
from videoxl2.engine.settings import EngineSettings
from videoxl2.errors import InputError
from videoxl2.tiny import build_tiny_model

FRAMES = 40  # 10 groups: with units of 2 groups and topk 1, the bi-level cache mixes dense and pooled units
FPS = 1.0
TINY_CONFIGS = {
    "wide-3-layers": dict(
        text=dict(
            hidden_size=96,
            intermediate_size=200,  # not a multiple of int4's group of 128
            num_hidden_layers=3,
            num_attention_heads=6,
            num_key_value_heads=3,
        ),
        vision=dict(hidden_size=96, intermediate_size=160, num_attention_heads=3),
    ),
    "one-layer-8-heads": dict(
        text=dict(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=1,
            num_attention_heads=8,
            num_key_value_heads=1,
        )
    ),
}


def close(predicted: int, measured: int, tolerance: float = 0.02) -> bool:
    return abs(predicted - measured) <= tolerance * measured


@pytest.fixture(scope="module", params=["demo", *TINY_CONFIGS])
def model_and_tokenizer(request):
    if request.param == "demo":
        return load_model(DEFAULT_MODEL), load_tokenizer(DEFAULT_MODEL)
    return build_tiny_model(seed=1, **TINY_CONFIGS[request.param])


def int8_kv_bytes(tensors) -> int:
    """Store (kv_heads, tokens, head_dim) tensors as int8 with one fp16 scale per token and head."""
    total = 0
    for t in tensors:
        scale = t.abs().amax(dim=-1, keepdim=True).clamp_min(1e-8) / 127
        q = torch.round(t / scale).clamp(-127, 127).to(torch.int8)
        assert (q.float() * scale - t).abs().max() <= scale.max()  # a usable layout, not just a size
        total += q.numel() * q.element_size() + scale.numel() * scale.half().element_size()
    return total


def test_plan_bytes_equal_a_measured_session(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    config = model.config
    settings = EngineSettings.from_config(config, mode="bilevel", unit_size=2, topk=1, compression=4)
    predicted = plan(config, FRAMES, settings, dtype="fp32", fps=FPS, tokenizer=tokenizer)
    measured_weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert close(predicted["weights"], measured_weights), (predicted["weights"], measured_weights)

    size = config.vision_config.image_size
    pixels = np.random.default_rng(0).integers(0, 256, (FRAMES, size, size, 3), dtype=np.uint8)
    seconds = [i / FPS for i in range(FRAMES)]
    session = VideoSession.from_frames(model, tokenizer, pixels, seconds, settings=settings, progress=False)
    assert predicted["tokens"] == session.layout.video_end  # the time text counted by the tokenizer
    memory = session.prefill()
    answer = session.ask("What is shown?", generation_config={"max_new_tokens": 2})
    measured = dict(
        video_kv=memory.dense_bytes(), sparse_kv=memory.sparse_bytes(), assembled_kv=answer.stats["kv_bytes"]
    )
    for name, value in measured.items():
        assert close(predicted[name], value), (name, predicted[name], value)
    assert predicted["video_kv"] > predicted["assembled_kv"] > predicted["sparse_kv"] > 0

    # the int8 video memory: the same tensors stored in the layout budget.py states
    int8 = plan(config, FRAMES, settings, dtype="fp32", kv_dtype="int8", fps=FPS, tokenizer=tokenizer)
    stored = int8_kv_bytes([*memory.keys, *memory.values])
    assert close(int8["video_kv"], stored), (int8["video_kv"], stored)
    stored = int8_kv_bytes([*memory.sparse_keys, *memory.sparse_values])
    assert close(int8["sparse_kv"], stored), (int8["sparse_kv"], stored)


def test_dense_question_reads_the_store_itself(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    settings = EngineSettings.from_config(model.config, mode="chunked")
    predicted = plan(model.config, 24, settings, dtype="fp32", fps=FPS, tokenizer=tokenizer)
    size = model.config.vision_config.image_size
    pixels = np.zeros((24, size, size, 3), dtype=np.uint8)
    session = VideoSession.from_frames(
        model, tokenizer, pixels, [float(i) for i in range(24)], settings=settings, progress=False
    )
    answer = session.ask("What is shown?", generation_config={"max_new_tokens": 1})
    assert predicted["sparse_kv"] == 0 and predicted["assembled_kv"] == predicted["video_kv"]
    assert close(predicted["assembled_kv"], answer.stats["kv_bytes"])
    assert close(predicted["video_kv"], session.memory.dense_bytes())


def quantized_weight_bytes(model, quantize: str) -> int:
    """Quantize the language model's linear weights for real (int8: symmetric per output channel; int4: in
    groups of 128, asymmetric, a scale and a zero point per group in the model's dtype, packed two to a
    byte, only the widths int4 takes) and count the stored tensors plus every other parameter."""
    lm = model.language_model
    embedding = lm.get_input_embeddings().weight
    converted, total = set(), 0
    for module in lm.modules():
        if not isinstance(module, torch.nn.Linear) or module.weight is embedding:
            continue
        w = module.weight.detach()
        out, inp = w.shape
        if quantize == "int8":
            scale = w.float().abs().amax(dim=1, keepdim=True).clamp_min(1e-8) / 127
            q = torch.round(w / scale).clamp(-127, 127).to(torch.int8)
            assert (q * scale - w).abs().max() <= scale.max()
            converted.add(id(module.weight))
            total += q.nbytes + scale.nbytes
            continue
        if not budget.int4_takes(out, inp):
            continue  # stays in the model's dtype, counted below
        groups = w.view(out, inp // budget.WEIGHT_INT4_GROUP_SIZE, budget.WEIGHT_INT4_GROUP_SIZE)
        low = groups.amin(-1, keepdim=True).clamp_max(0)
        scale = ((groups.amax(-1, keepdim=True).clamp_min(0) - low) / 15).clamp_min(1e-8)  # (out, groups, 1)
        q = torch.round((groups - low) / scale).clamp(0, 15)
        assert (q * scale + low - groups).abs().max() <= scale.max()
        nibbles = q.to(torch.uint8).view(out, inp)
        packed = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
        zero = low.to(w.dtype)  # the zero point, stored as the group's offset
        converted.add(id(module.weight))
        total += packed.nbytes + scale.to(w.dtype).nbytes + zero.nbytes
    for param in model.parameters():
        if id(param) not in converted:
            total += param.nbytes
    return total


@pytest.mark.parametrize("quantize", ["int8", "int4"])
@pytest.mark.parametrize("tied", [False, True])
def test_quantized_weights_equal_the_stated_layout(quantize, tied):
    overrides = dict(TINY_CONFIGS["wide-3-layers"])
    text = overrides["text"]
    if quantize == "int4":  # widths int4 takes (hidden 128) and one it does not (the MLP's 200)
        text = dict(text, hidden_size=128, num_attention_heads=4, num_key_value_heads=2)
    overrides["text"] = dict(text, tie_word_embeddings=tied)
    model, _ = build_tiny_model(seed=2, **overrides)
    predicted = budget.weight_breakdown(model.config, torch.float32, quantize)
    measured = quantized_weight_bytes(model, quantize)
    assert predicted.total == measured, (predicted, measured)
    assert predicted.total < budget.weight_bytes(model.config, torch.float32)


def test_released_7b_quantized_figures():
    config = VideoXL2Config.released()
    bf16, fp32 = budget.kv_bytes_per_token(config, "bf16"), budget.kv_bytes_per_token(config, "fp32")
    int8 = budget.kv_bytes_per_token(config, "int8")
    assert int8 == 28 * 2 * 4 * (128 + 2) == 29_120
    assert int8 <= 0.52 * bf16 and int8 <= 0.27 * fp32
    weights = {q: budget.weight_bytes(config, "bf16", q) for q in budget.WEIGHT_QUANTIZATIONS}
    assert 15.5e9 < weights["none"] < 17e9  # 8.1B parameters
    assert 8.5e9 < weights["int8"] < 9.5e9  # 7.07B in LLM linears at 1 byte, 1.05B others at 2
    assert 5.5e9 < weights["int4"] < 6.5e9
    # bf16 weights and KV reproduce docs/gpu.md's 24 GiB row; smaller bytes let more frames fit
    settings = EngineSettings(mode="chunked")
    base = plan(config, 2048, settings, gpu_memory=24 * 2**30)
    assert base["frames_that_fit"] == 3_304 and base["tokens"] == 78_584
    small = plan(config, 2048, settings, quantize="int4", kv_dtype="int8", gpu_memory=24 * 2**30)
    assert small["frames_that_fit"] > 2 * base["frames_that_fit"] and small["total"] < base["total"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [("24GB", 24 * 10**9), ("24GiB", 24 * 2**30), ("25769803776", 25_769_803_776), ("1.5 tb", 1_500 * 10**9)],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "-1GB", "24XB", "0", "lots"])
def test_parse_bytes_refuses(text):
    with pytest.raises(InputError, match="--gpu-memory"):
        parse_bytes(text)


def test_cli_plan_json(capsys):
    args = [
        "plan",
        "--json",
        "--frames",
        "64",
        "--mode",
        "bilevel",
        "--quantize",
        "int4",
        "--kv-dtype",
        "int8",
    ]
    assert main([*args, "--gpu-memory", "24GB", "--dtype", "fp32"]) == 0
    record = json.loads(capsys.readouterr().out)
    for name in (
        "weights",
        "vision_batch",
        "prefill_block",
        "video_kv",
        "sparse_kv",
        "assembled_kv",
        "total",
        "peak_phase",
        "phases",
        "frames_that_fit",
    ):
        assert name in record, name
    assert record["frames"] == 64 and record["mode"] == "bilevel" and record["quantize"] == "int4"
    assert (
        record["kv_dtype"] == "int8" and record["gpu_memory"] == 24 * 10**9 and record["frames_that_fit"] > 64
    )
    assert record["time_tokens"] == "tokenizer"  # the demo model's own tokenizer counted the time text
    assert main(["plan", "--frames", "64"]) == 0  # the text form
    assert "dense video KV" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--gpu-memory", "lots"], "--gpu-memory 'lots'"),
        (["--frames", "0"], "--frames must be >= 1"),
        (["--model", "/nonexistent/model"], "not a checkpoint folder"),
    ],
)
def test_cli_plan_errors_are_one_line(capsys, argv, expected):
    assert main(["plan", *argv]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("videoxl2: error:") and expected in err
