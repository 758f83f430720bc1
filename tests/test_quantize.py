"""Weight-only quantization (`load_model(..., quantize="int8" | "int4")`, `--quantize`) through torchao: a
tiny model loads and answers through the engine, the stored bytes are the layout `engine/budget.py` states,
outputs stay within stated bounds of float32, and bad values or a missing torchao are one-line errors."""

from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch

from videoxl2 import load_model, load_tokenizer
from videoxl2.cli import main
from videoxl2.defaults import DEFAULT_MODEL
from videoxl2.engine import budget
from videoxl2.engine.runner import LayerRunner, attention
from videoxl2.engine.session import VideoSession
from videoxl2.engine.settings import EngineSettings
from videoxl2.errors import InputError
from videoxl2.modeling.quantize import check_quantize, linear_targets, quantize_model, weight_bytes
from videoxl2.tiny import build_tiny_model, save_tiny_checkpoint

pytest.importorskip("torchao")  # the optional extra `.[quant]`; CI installs it

# Widths int4 takes (inputs in groups of 128, outputs in multiples of 16), vision included.
TEXT = dict(
    hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)
VISION = dict(hidden_size=128, intermediate_size=256, num_attention_heads=2)
# An MLP width int4 does not take: gate/up (200 outputs) and down (200 inputs) stay float under int4.
ODD_TEXT = dict(TEXT, intermediate_size=200, num_hidden_layers=1)
FRAMES = 24


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("quant") / "model", seed=3, text=TEXT, vision=VISION)


def frames_of(model, count: int = FRAMES):
    size = model.config.vision_config.image_size
    pixels = np.random.default_rng(0).integers(0, 256, (count, size, size, 3), dtype=np.uint8)
    return pixels, [float(i) for i in range(count)]


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantized_tiny_model_loads_and_answers(checkpoint, quantize):
    model = load_model(checkpoint, quantize=quantize, quantize_vision=True)
    tokenizer = load_tokenizer(checkpoint)
    report = model.quantization
    layer = model.llm.layers[0]
    for linear in (layer.self_attn.q_proj, layer.mlp.down_proj, model.vision_tower.encoder.layers[0].mlp.fc1):
        assert type(linear.weight).__module__.startswith("torchao"), type(linear.weight)
    assert report.quantize == quantize
    assert len(report.quantized) + len(report.kept) == len(linear_targets(model, vision=True))
    assert list(report.kept) == ([] if quantize == "int8" else ["language_model.lm_head"])  # 697 outputs
    pixels, seconds = frames_of(model)
    for mode in ("dense", "bilevel"):  # the engine calls q_proj(x), mlp(x), ... itself (engine/runner.py)
        settings = EngineSettings.from_config(model.config, mode=mode, unit_size=2, topk=1)
        with torch.inference_mode():
            session = VideoSession.from_frames(
                model, tokenizer, pixels, seconds, settings=settings, progress=False
            )
            answer = session.ask("What is shown?", generation_config={"max_new_tokens": 4})
        assert len(answer.token_ids) >= 1 and answer.stats["mode"] == mode


@pytest.mark.parametrize("quantize", ["int8", "int4"])
@pytest.mark.parametrize(
    "text",
    [TEXT, dict(TEXT, tie_word_embeddings=True), ODD_TEXT],
    ids=["tiny", "tied", "odd-widths"],
)
def test_stored_bytes_are_the_stated_layout(quantize, text):
    model, _ = build_tiny_model(seed=2, text=text)
    float_bytes = weight_bytes(model)
    report = quantize_model(model, quantize)
    predicted = budget.weight_breakdown(model.config, torch.float32, quantize)
    assert weight_bytes(model) == predicted.total < float_bytes, (weight_bytes(model), predicted)
    if quantize == "int4" and text is ODD_TEXT:  # the widths torchao's int4 cannot take stay float
        assert sorted(n.rsplit(".", 1)[-1] for n in report.quantized) == [
            "k_proj",
            "o_proj",
            "q_proj",
            "v_proj",
        ]
        assert "input width 200" in report.kept["language_model.model.layers.0.mlp.down_proj"]
        assert "output width 200" in report.kept["language_model.model.layers.0.mlp.up_proj"]


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_demo_model_bytes_and_the_planner(quantize):
    model = load_model(DEFAULT_MODEL, quantize=quantize)
    assert weight_bytes(model) == budget.weight_bytes(model.config, torch.float32, quantize)
    # int8 (29 linears): 1 byte + a 4-byte scale per row; int4: lm_head (697 outputs) stays float
    assert weight_bytes(model) == {"int8": 2_977_380, "int4": 2_877_696}[quantize]


def half_step(weight: torch.Tensor, quantize: str) -> torch.Tensor:
    """Largest rounding error of each weight element: half the quantization step of its row or group."""
    if quantize == "int8":  # symmetric per row: step = max|w| / 127
        return (weight.abs().amax(1, keepdim=True) / 127 / 2).expand_as(weight)
    groups = weight.view(
        weight.shape[0], -1, budget.WEIGHT_INT4_GROUP_SIZE
    )  # asymmetric over [min, max] with 0
    step = (groups.amax(-1).clamp_min(0) - groups.amin(-1).clamp_max(0)) / 15
    return (step / 2).repeat_interleave(budget.WEIGHT_INT4_GROUP_SIZE, 1)


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_each_linear_within_its_rounding_bound(quantize):
    """|W_q x - W x| <= |x| . half_step(W) for every output: the bound of rounding each weight to its grid."""
    model, _ = build_tiny_model(seed=3, text=TEXT)
    floats = dict(linear_targets(copy.deepcopy(model)))
    report = quantize_model(model, quantize)
    torch.manual_seed(0)
    for name, module in linear_targets(model):
        if name not in report.quantized:
            continue
        reference = floats[name]
        x = torch.randn(7, reference.in_features)
        with torch.no_grad():
            error = (module(x) - reference(x)).abs()
            bound = x.abs() @ half_step(reference.weight, quantize).T
        assert bool((error <= bound + 1e-5).all()), (name, (error / bound).max())


def engine_logits(model, embeddings, positions):
    runner = LayerRunner(model)
    with torch.inference_mode():
        hidden = runner.forward(embeddings, positions, lambda i, q, k, v: attention(q, k, v, causal=True))
        return model.language_model.lm_head(model.llm.norm(hidden))


def test_demo_model_logits_close_to_float():
    """The trained demo model through the engine's layer runner, 300 tokens: int8 moves no logit by more
    than 1% of the largest and changes no greedy token; int4 stays within 20% and keeps 95% of them."""
    base = load_model(DEFAULT_MODEL)
    ids = torch.randint(
        0, base.config.text_config.vocab_size, (300,), generator=torch.Generator().manual_seed(0)
    )
    embeddings = base.get_input_embeddings().weight[ids].detach().clone()
    positions = torch.arange(300)
    reference = engine_logits(base, embeddings, positions)
    for quantize, (bound, agree) in {"int8": (0.01, 1.0), "int4": (0.2, 0.95)}.items():
        model = copy.deepcopy(base)
        quantize_model(model, quantize)
        logits = engine_logits(model, embeddings, positions)
        error = (logits - reference).abs().max() / reference.abs().max()
        same = (logits.argmax(-1) == reference.argmax(-1)).float().mean()
        assert error <= bound and same >= agree, (quantize, float(error), float(same))


def test_bad_quantize_value_is_a_one_line_error(checkpoint, synthetic_video, capsys):
    with pytest.raises(InputError, match="--quantize must be one of none, int8, int4, got 'int3'"):
        load_model(checkpoint, quantize="int3")
    assert (
        check_quantize("none") is None and check_quantize(None) is None and check_quantize("INT8") == "int8"
    )
    code = main(["chat", str(synthetic_video), "What?", "--model", str(checkpoint), "--quantize", "fp4"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0, err
    assert err.startswith("videoxl2: error: --quantize must be one of none, int8, int4, got 'fp4'")


def test_int4_on_cuda_needs_bf16_before_reading_weights(checkpoint):
    with pytest.raises(InputError, match="int4 on CUDA needs --dtype bfloat16"):
        load_model(checkpoint, device="cuda", dtype=torch.float32, quantize="int4")


def test_missing_torchao_is_a_one_line_error(checkpoint, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao -> ImportError
    with pytest.raises(
        InputError, match=r"needs torchao, which is not installed: pip install torchao --no-deps"
    ):
        load_model(checkpoint, quantize="int8")


def test_importing_videoxl2_prints_nothing():
    """transformers imports torchao when it is installed; torchao's import-time log lines (CUDA-only kernels
    a CPU torch cannot load, a torch deprecation notice) would break the CLI's one-line errors."""
    done = subprocess.run(
        [sys.executable, "-c", "import videoxl2, videoxl2.modeling.videoxl2, torchao.quantization"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr[-2000:]
