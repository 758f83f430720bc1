"""Memories that reopen (issue 24, item 5): a saved memory records the model and settings that made it, and
`VideoSession.from_memory` / `videoxl2 chat MEMORY_FILE Q` answer from it exactly as the session that wrote
it, without the video; a memory of another model, or pre-fill settings it cannot honour, are refused."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from videoxl2.engine.memory import VideoMemory, memory_header, model_identity, weights_fingerprint
from videoxl2.engine.session import VideoSession
from videoxl2.engine.settings import EngineSettings
from videoxl2.errors import InputError

FRAMES = 24  # 6 groups: with unit_size 1 and topk 1, three units are sparse in a bi-level question
QUESTIONS = ("What is shown?", "What colour is it?")
GEN = {"max_new_tokens": 6}


def settings_for(mode: str, kv_dtype: str = "auto", **changes) -> EngineSettings:
    values = dict(mode=mode, block_size=2, prev_blocks=1, unit_size=1, topk=1, kv_dtype=kv_dtype)
    return EngineSettings(**{**values, **changes})


def frames_of(model, count: int = FRAMES):
    size = model.config.vision_config.image_size
    pixels = np.random.default_rng(3).integers(0, 256, (count, size, size, 3), dtype=np.uint8)
    return pixels, [i * 0.5 for i in range(count)]


def session_of(tiny, settings: EngineSettings) -> VideoSession:
    model, tokenizer = tiny
    pixels, seconds = frames_of(model)
    return VideoSession.from_frames(model, tokenizer, pixels, seconds, settings=settings, progress=False)


def answers(session: VideoSession) -> list[list[int]]:
    return [session.ask(q, generation_config=GEN).token_ids for q in QUESTIONS]


@pytest.fixture(scope="module")
def other(tiny):
    """The tiny model's architecture with other random weights (another seed)."""
    from videoxl2.tiny import build_tiny_model

    return build_tiny_model(seed=1, tokenizer=tiny[1])


# -- the identity ------------------------------------------------------------------------------------------
def test_fingerprint_tells_checkpoints_apart(tiny, other, tiny_checkpoint):
    from videoxl2 import load_model
    from videoxl2.tiny import build_tiny_model

    model = tiny[0]
    mine = weights_fingerprint(model)
    assert weights_fingerprint(build_tiny_model(seed=0, tokenizer=tiny[1])[0]) == mine  # same seed, again
    assert weights_fingerprint(other[0]) != mine
    # One checkpoint read twice: one fingerprint; in bfloat16 too (elements are hashed as bfloat16).
    first, second = load_model(tiny_checkpoint), load_model(tiny_checkpoint)
    assert weights_fingerprint(first) == weights_fingerprint(second) == mine
    assert weights_fingerprint(copy.deepcopy(first).to(torch.bfloat16)) == mine
    # A fine-tune touching one matrix a little changes it.
    with torch.no_grad():
        first.llm.layers[1].mlp.down_proj.weight.add_(1e-2)
    assert weights_fingerprint(first) != mine
    identity = model_identity(model)
    assert identity["quantize"] is None and identity["weights"] == mine
    assert {"layers": 2, "kv_heads": 2, "head_dim": 16, "hidden": 64, "tokens_per_group": 16}.items() <= (
        identity["architecture"].items()
    )
    assert identity["architecture"]["rope"]["rope_theta"] == 10000.0


def test_fingerprint_reads_offloaded_weights(tiny, tmp_path):
    """A model whose layer 1 sits on disk (accelerate hooks, parameters on the meta device) is the same model:
    its weights are read from the hook's map."""
    from videoxl2.modeling.offload import dispatch

    model = tiny[0]
    device_map = {name: "cpu" for name, _ in model.named_children() if name != "language_model"}
    device_map.update({"language_model.model": "cpu", "language_model.lm_head": "cpu"})
    device_map["language_model.model.layers.1"] = "disk"
    offloaded = dispatch(copy.deepcopy(model), device_map, tmp_path)
    assert offloaded.language_model.model.layers[1].mlp.up_proj.weight.device.type == "meta"
    assert weights_fingerprint(offloaded) == weights_fingerprint(model)


def test_quantized_weights_are_another_model(tiny, tmp_path):
    """int8 weights (torchao) make other KV: a float model's memory is refused by the quantized model and
    back; two models quantized alike share one identity and answer alike."""
    pytest.importorskip("torchao", reason="torchao is not installed")
    from videoxl2.modeling.quantize import quantize_model

    model, tokenizer = tiny
    quantized, again = copy.deepcopy(model), copy.deepcopy(model)
    quantize_model(quantized, "int8")
    quantize_model(again, "int8")
    assert model_identity(quantized) == model_identity(again) != model_identity(model)
    float_memory = session_of(tiny, settings_for("chunked")).save_memory(tmp_path / "float.safetensors")
    with pytest.raises(InputError, match="weight quantization none vs this model's int8"):
        VideoSession.from_memory(quantized, tokenizer, float_memory)
    writer = session_of((quantized, tokenizer), settings_for("chunked"))
    path = writer.save_memory(tmp_path / "int8.safetensors")
    with pytest.raises(InputError, match="weight quantization int8 vs this model's none"):
        VideoSession.from_memory(model, tokenizer, path)
    assert answers(VideoSession.from_memory(again, tokenizer, path)) == answers(writer)


def test_header_records_model_settings_and_frames(tiny, tmp_path):
    session = session_of(tiny, settings_for("chunked"))
    path = session.save_memory(tmp_path / "clip.memory.safetensors", {"note": "mine"})
    header = memory_header(path)
    assert header["model"] == model_identity(tiny[0]) and header["compute_dtype"] == "float32"
    assert header["engine"] == dict(
        mode="chunked", block_size=2, prev_blocks=1, unit_size=1, compression=4, kv_dtype="auto",
        rerotate=True, topk=1,
    )  # fmt: skip
    assert header["timestamps"] == session.timestamps and header["source"] == "<frames>"
    assert VideoMemory.load(path)[1] == {"note": "mine"}  # the caller's metadata stays its own
    # Anything else is not a memory: a video, another safetensors file, junk, nothing.
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, tmp_path / "weights.safetensors", metadata={"format": "pt"})
    (tmp_path / "junk.bin").write_bytes(b"\xff" * 64)
    for path in ("weights.safetensors", "junk.bin", "missing.safetensors"):
        assert memory_header(tmp_path / path) is None


def test_settings_must_describe_the_memory(tiny, tmp_path):
    session = session_of(tiny, settings_for("dense"))
    memory = session.prefill()
    from videoxl2.errors import ConfigError

    with pytest.raises(ConfigError, match="unit_size 4 .the memory: 1."):
        memory.save(tmp_path / "m.safetensors", settings=settings_for("dense", unit_size=4))


# -- answers: identical to the session that wrote the memory ---------------------------------------------
@pytest.mark.parametrize("kv_dtype", ["auto", "int8"])
@pytest.mark.parametrize("mode", ["dense", "chunked", "bilevel"])
def test_reopened_memory_answers_as_its_writer(tiny, tmp_path, mode, kv_dtype):
    """The writer answers, saves (a bi-level one with the sparse KV its question built), answers again;
    the reopened memory gives the same token ids for both questions and holds the same KV."""
    model, tokenizer = tiny
    writer = session_of(tiny, settings_for(mode, kv_dtype))
    first = writer.ask(QUESTIONS[0], generation_config=GEN).token_ids
    path = writer.save_memory(tmp_path / "memory.safetensors")
    expected = [first, writer.ask(QUESTIONS[1], generation_config=GEN).token_ids]
    reopened = VideoSession.from_memory(model, tokenizer, path)
    assert reopened.settings == writer.settings and reopened.memory.int8 == (kv_dtype == "int8")
    assert reopened.memory.has_sparse == (mode == "bilevel")
    for a, b in zip(reopened.memory.keys + reopened.memory.values, writer.memory.keys + writer.memory.values):
        a, b = (a.data, b.data) if kv_dtype == "int8" else (a, b)
        assert torch.equal(a, b), f"KV max error {float((a.float() - b.float()).abs().max())}"
    got = answers(reopened)
    assert got == expected, f"{mode}/{kv_dtype}: reopened {got} vs writer {expected}"
    assert reopened.timestamps == writer.timestamps and reopened.group_seconds == writer.group_seconds
    stats = reopened.ask(QUESTIONS[0], generation_config=GEN).stats
    assert stats["memory_origin"] == "recorded" and stats["mode"] == mode
    assert stats["frames"] == FRAMES and stats["groups"] == writer.layout.num_groups
    assert stats["dense_kv_bytes"] == writer.stats["dense_kv_bytes"]
    if mode == "bilevel":
        assert [u["dense"] for u in stats["units"]] == [
            u["dense"] for u in writer.ask(QUESTIONS[0], generation_config=GEN).stats["units"]
        ]


def test_bilevel_memory_saved_before_any_question(tiny, tmp_path):
    """Saved right after pre-fill (no sparse KV yet): the reopened memory builds it and answers the same."""
    model, tokenizer = tiny
    writer = session_of(tiny, settings_for("bilevel"))
    path = writer.save_memory(tmp_path / "memory.safetensors")
    reopened = VideoSession.from_memory(model, tokenizer, path)
    assert not reopened.memory.has_sparse
    assert answers(reopened) == answers(writer)
    assert reopened.memory.has_sparse


def test_question_time_settings_may_change(tiny, tmp_path):
    """A chunked memory answers bi-level questions exactly as a bi-level session of the same frames, and
    "dense" on it means decoding over its full KV (chunked); topk and rerotate are per question."""
    model, tokenizer = tiny
    path = session_of(tiny, settings_for("chunked")).save_memory(tmp_path / "memory.safetensors")
    for changes in ({"topk": 1}, {"topk": 2, "rerotate": False}):
        reopened = VideoSession.from_memory(model, tokenizer, path, {"mode": "bilevel", **changes})
        direct = session_of(tiny, settings_for("bilevel", **changes))
        assert answers(reopened) == answers(direct), changes
    dense = VideoSession.from_memory(model, tokenizer, path, settings_for("dense"))
    assert dense.settings.mode == "chunked"
    assert answers(dense) == answers(session_of(tiny, settings_for("chunked")))


def test_memory_in_another_compute_dtype_is_converted(tiny, tmp_path):
    model, tokenizer = tiny
    path = session_of(tiny, settings_for("chunked")).save_memory(tmp_path / "memory.safetensors")
    half = copy.deepcopy(model).to(torch.bfloat16)
    reopened = VideoSession.from_memory(half, tokenizer, path)
    assert reopened.memory.dtype == torch.bfloat16 and reopened.stats["memory_compute_dtype"] == "float32"
    assert len(reopened.ask(QUESTIONS[0], generation_config={"max_new_tokens": 2}).token_ids) == 2


# -- refusals ------------------------------------------------------------------------------------------------
def test_memory_of_another_model_is_refused(tiny, other, tmp_path):
    from videoxl2.tiny import build_tiny_model

    path = session_of(tiny, settings_for("dense")).save_memory(tmp_path / "memory.safetensors")
    with pytest.raises(InputError, match=r"memory.safetensors: made by another model \(weights fingerprint"):
        VideoSession.from_memory(*other, path)
    deeper = build_tiny_model(seed=0, tokenizer=tiny[1], text={"num_hidden_layers": 3})
    with pytest.raises(InputError, match="architecture differs: layers 2 vs this model's 3") as err:
        VideoSession.from_memory(*deeper, path)
    assert "\n" not in str(err.value)


def test_prefill_settings_it_cannot_honour_are_refused(tiny, tmp_path):
    model, tokenizer = tiny
    chunked = session_of(tiny, settings_for("chunked")).save_memory(tmp_path / "chunked.safetensors")
    dense = session_of(tiny, settings_for("dense")).save_memory(tmp_path / "dense.safetensors")
    refused = [
        (chunked, {"block_size": 4}, "cannot answer with block_size 4: the memory was pre-filled chunked"),
        (chunked, {"prev_blocks": 0}, "prev_blocks 0"),
        (chunked, {"unit_size": 2}, "unit_size 2"),
        (chunked, {"kv_dtype": "int8"}, "kv_dtype 'int8'"),
        (dense, {"mode": "bilevel"}, "mode 'bilevel': the memory was pre-filled dense"),
        (dense, {"compression": 2}, "compression 2"),
    ]
    for path, changes, message in refused:
        with pytest.raises(InputError, match=message):
            VideoSession.from_memory(model, tokenizer, path, changes)
    # block sizes mean nothing to a dense pre-fill: not compared
    assert VideoSession.from_memory(model, tokenizer, dense, {"block_size": 8}).settings.block_size == 8
    with pytest.raises(InputError, match="no such memory file"):
        VideoSession.from_memory(model, tokenizer, tmp_path / "none.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk" * 8)
    with pytest.raises(InputError, match="junk.safetensors: not a videoxl2 memory file"):
        VideoSession.from_memory(model, tokenizer, tmp_path / "junk.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, tmp_path / "bare.safetensors", metadata={"videoxl2": '{"format": 1}'})
    with pytest.raises(InputError, match="bare.safetensors: unreadable memory header .KeyError..unit_size"):
        VideoSession.from_memory(model, tokenizer, tmp_path / "bare.safetensors")


def test_in_memory_form(tiny):
    """`from_video_memory` answers from a memory held in this process (what a live session hands over)."""
    model, tokenizer = tiny
    writer = session_of(tiny, settings_for("bilevel"))
    expected = answers(writer)
    session = VideoSession.from_video_memory(
        model, tokenizer, writer.memory, writer.settings, source="live", stats={"frames": FRAMES}
    )
    assert answers(session) == expected and session.timestamps is None and session.source == "live"
    assert session.stats["frames"] == FRAMES and session.group_seconds == writer.group_seconds
    with pytest.raises(
        InputError, match=r"live: settings the memory cannot honour: unit_size 2 \(the memory: 1\)"
    ):
        VideoSession.from_video_memory(
            model, tokenizer, writer.memory, settings_for("bilevel", unit_size=2), "live"
        )


# -- files written before memories recorded their origin ----------------------------------------------------
def test_memory_without_a_recorded_origin(tiny, tmp_path):
    """Taken to come from this model, pre-filled as the given settings say (default: the checkpoint's, with
    the file's unit_size, compression and kv_dtype); an architecture its KV cannot fit is still refused."""
    model, tokenizer = tiny
    writer = session_of(tiny, settings_for("chunked", "int8"))
    path = writer.prefill().save(tmp_path / "old.safetensors")  # the low-level save: no origin
    header = memory_header(path)
    assert "model" not in header and "engine" not in header and header["kv_dtype"] == "int8"
    reopened = VideoSession.from_memory(model, tokenizer, path, settings_for("chunked", "int8"))
    assert answers(reopened) == answers(writer)
    assert reopened.stats["memory_origin"] == "unrecorded" and reopened.timestamps is None
    assert reopened.source == str(path) and reopened.stats["frames"] is None
    default = VideoSession.from_memory(model, tokenizer, path)
    assert (default.settings.unit_size, default.settings.kv_dtype) == (1, "int8")
    from videoxl2.tiny import build_tiny_model

    wider = build_tiny_model(seed=0, tokenizer=tokenizer, text={"num_key_value_heads": 4})
    with pytest.raises(InputError, match="a memory of another model .kv_heads 2 vs this model's 4"):
        VideoSession.from_memory(*wider, path)


# -- the command line ----------------------------------------------------------------------------------------
def test_chat_answers_from_a_saved_memory(tiny_checkpoint, synthetic_video, tmp_path, capsys):
    from videoxl2.cli import main
    from videoxl2.tiny import save_tiny_checkpoint

    memory = tmp_path / "clip.memory.safetensors"
    common = ["--model", str(tiny_checkpoint), "--max-new-tokens", "5", "--json"]
    bilevel = ["--mode", "bilevel", "--unit-size", "1", "--topk", "1", "--block-size", "1"]
    assert (
        main(["chat", str(synthetic_video), QUESTIONS[0], *common, *bilevel, "--save-memory", str(memory)])
        == 0
    )
    from_video = json.loads(capsys.readouterr().out)
    assert from_video["saved_memory"] == str(memory) and memory_header(memory)["engine"]["mode"] == "bilevel"
    assert main(["chat", str(memory), QUESTIONS[0], *common]) == 0
    from_memory = json.loads(capsys.readouterr().out)
    assert from_memory["answer"] == from_video["answer"]
    assert from_memory["stats"]["units"] == from_video["stats"]["units"]
    assert from_memory["timestamps"] == from_video["timestamps"] and from_memory["source"] == str(
        synthetic_video
    )
    assert from_memory["stats"]["memory_origin"] == "recorded"
    # per-question knobs apply; the plain-text answer
    assert main(["chat", str(memory), QUESTIONS[1], "--model", str(tiny_checkpoint), "--topk", "2"]) == 0
    assert capsys.readouterr().out.strip()
    # another model, or another pre-fill: one line on stderr, exit 2
    stranger = save_tiny_checkpoint(tmp_path / "other", seed=1)
    assert main(["chat", str(memory), QUESTIONS[0], "--model", str(stranger)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # (no load bars)
    assert len(errors) == 1 and errors[0].startswith(f"videoxl2: error: {memory}: made by another model")
    assert (
        main(["chat", str(memory), QUESTIONS[0], "--model", str(tiny_checkpoint), "--block-size", "2"]) == 2
    )
    assert "cannot answer with block_size 2" in capsys.readouterr().err
    # a file that is not a memory is still read as a video
    (tmp_path / "fake.safetensors").write_bytes(b"not a video")
    assert (
        main(["chat", str(tmp_path / "fake.safetensors"), QUESTIONS[0], "--model", str(tiny_checkpoint)]) == 2
    )
    assert "fake.safetensors: not a video file" in capsys.readouterr().err
