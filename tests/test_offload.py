"""A model whose weights accelerate spread over CPU RAM and disk answers exactly as the model in memory, in
every engine mode (the engine calls the layers' parts itself; accelerate's leaf hooks fetch the weights)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from videoxl2.engine.session import VideoSession
from videoxl2.engine.settings import EngineSettings
from videoxl2.errors import InputError
from videoxl2.eval.lmms_plugin import continuation_logprob
from videoxl2.modeling.offload import dispatch, parse_device_map

pytest.importorskip("accelerate")

FRAMES = 24


def mixed_map(model) -> dict:
    """Vision, DTS and projector in RAM; embeddings and layer 0 in RAM; layer 1, the final norm and the LM
    head on disk."""
    device_map = {name: "cpu" for name, _ in model.named_children() if name != "language_model"}
    device_map.update({
        "language_model.model.embed_tokens": "cpu",
        "language_model.model.rotary_emb": "cpu",
        "language_model.model.layers.0": "cpu",
        "language_model.model.layers.1": "disk",
        "language_model.model.norm": "disk",
        "language_model.lm_head": "disk",
    })  # fmt: skip
    return device_map


@pytest.fixture(scope="module")
def models(tiny, tmp_path_factory):
    model, tokenizer = tiny
    offloaded = dispatch(copy.deepcopy(model), mixed_map(model), tmp_path_factory.mktemp("offload"))
    layer = offloaded.language_model.model.layers[1]
    assert layer.self_attn.q_proj.weight.device.type == "meta"  # really on disk, not in memory
    return model, offloaded, tokenizer


@pytest.mark.parametrize("mode", ["dense", "chunked", "bilevel"])
def test_offloaded_model_answers_as_in_memory(models, mode):
    model, offloaded, tokenizer = models
    rng = np.random.default_rng(5)
    frames = rng.integers(0, 256, (FRAMES, 40, 40, 3), dtype=np.uint8)
    stamps = [i * 0.5 for i in range(FRAMES)]
    results = []
    for m in (model, offloaded):
        settings = EngineSettings.from_config(m.config, mode=mode, block_size=2, unit_size=1, topk=2)
        session = VideoSession.from_frames(m, tokenizer, frames, stamps, settings=settings, progress=False)
        with torch.inference_mode():
            memory = session.prefill()
            answer = session.ask("What is shown?", generation_config={"max_new_tokens": 6})
            logprob, _ = continuation_logprob(session, "What is shown?", " a red square")
        results.append((memory, answer, logprob))
    (mem_a, ans_a, logprob_a), (mem_b, ans_b, logprob_b) = results
    assert logprob_a == logprob_b, f"{mode}: log-probabilities differ ({logprob_a} vs {logprob_b})"
    for a, b in zip(mem_a.keys, mem_b.keys):
        assert torch.equal(a, b), f"{mode}: pre-filled keys differ (max {float((a - b).abs().max()):.3g})"
    assert ans_a.token_ids == ans_b.token_ids, mode
    assert [u["dense"] for u in ans_a.stats["units"]] == [u["dense"] for u in ans_b.stats["units"]]


def test_device_map_argument():
    assert parse_device_map("auto") == "auto"
    assert parse_device_map('{"language_model.lm_head": "disk"}') == {"language_model.lm_head": "disk"}
    with pytest.raises(InputError, match="expected auto"):
        parse_device_map("{not json")


def test_unknown_modules_are_refused(tiny):
    model, _ = tiny
    with pytest.raises(InputError, match="does not have: nope"):
        dispatch(copy.deepcopy(model), {"nope": "cpu"})


def test_layers_on_several_devices_are_refused_in_one_line(tiny):
    """Layers computing on two GPUs (as accelerate would mark them) are refused before anything runs."""
    import types

    from videoxl2.engine.runner import LayerRunner

    model = copy.deepcopy(tiny[0])
    model.language_model.model.layers[1]._hf_hook = types.SimpleNamespace(
        execution_device=torch.device("cuda", 1)
    )
    with pytest.raises(InputError, match=r"several devices \(cpu, cuda:1\)"):
        LayerRunner(model)


def test_load_model_and_chat_take_a_device_map(tiny_checkpoint, synthetic_video, tmp_path, capsys):
    """`load_model(device_map=...)` and `videoxl2 chat --device-map FILE` dispatch the checkpoint (layer 1 on
    disk under --offload-folder) and answer exactly as the model loaded in memory."""
    import json

    from videoxl2 import load_model
    from videoxl2.cli import main

    model = load_model(tiny_checkpoint)
    device_map = mixed_map(model)
    offloaded = load_model(tiny_checkpoint, device_map=device_map, offload_folder=tmp_path / "weights")
    assert offloaded.language_model.model.layers[1].self_attn.q_proj.weight.device.type == "meta"
    assert any((tmp_path / "weights").iterdir())
    map_file = tmp_path / "map.json"
    map_file.write_text(json.dumps(device_map))
    answers = []
    for extra in ([], ["--device-map", str(map_file), "--offload-folder", str(tmp_path / "cli")]):
        argv = ["chat", str(synthetic_video), "What is shown?", "--model", str(tiny_checkpoint), "--json"]
        code = main([*argv, "--max-new-tokens", "5", "--mode", "bilevel", *extra])
        assert code == 0
        answers.append(json.loads(capsys.readouterr().out)["answer"])
    assert answers[0] == answers[1]


def test_device_map_with_quantize_is_refused(tiny_checkpoint):
    from videoxl2 import load_model
    from videoxl2.errors import CheckpointError

    with pytest.raises(CheckpointError, match="quantize and device_map together"):
        load_model(tiny_checkpoint, quantize="int8", device_map="auto")


def test_serve_takes_a_device_map():
    import argparse

    from videoxl2.serve.command import add_serve_arguments, settings_from

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(["--device-map", '{"language_model.lm_head": "disk"}', "--offload-folder", "/x"])
    settings = settings_from(args)
    assert settings.device_map == {"language_model.lm_head": "disk"} and settings.offload_folder == "/x"
