"""Checkpoint loading: the release's full name list, our own format, and precise errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import videoxl2
from videoxl2 import CheckpointError, VideoXL2Config, VideoXL2ForCausalLM, load_model
from videoxl2.modeling.checkpoint import rename_release_key
from videoxl2.tiny import tiny_config

FIXTURE = Path(__file__).parent / "fixtures" / "release_weights.tsv"


def release_names() -> list[tuple[str, str]]:
    rows = [
        line.split("\t") for line in FIXTURE.read_text().splitlines() if line and not line.startswith("#")
    ]
    return [(name, formula) for name, formula in rows]


def shape_of(formula: str, config: VideoXL2Config) -> tuple[int, ...]:
    text, vision = config.text_config, config.vision_config
    head_dim = text.hidden_size // text.num_attention_heads
    symbols = dict(
        V=text.vocab_size,
        H=text.hidden_size,
        I=text.intermediate_size,
        KV=text.num_key_value_heads * head_dim,
        C=vision.hidden_size,
        CI=vision.intermediate_size,
        P=(vision.image_size // vision.patch_size) ** 2,
        PS=vision.patch_size,
        F=config.frames_per_group,
        R=2 * config.dts_max_relative_position + 1,
    )
    return tuple(int(eval(part, {}, symbols)) for part in formula.split(" x "))  # formulas are fixture data


def release_deep_config() -> VideoXL2Config:
    """Tiny widths, but the release's depths (28 LLM layers, 26 SigLIP layers) so every name exists."""
    return tiny_config(text=dict(num_hidden_layers=28), vision=dict(num_hidden_layers=26))


def write_release_checkpoint(
    folder: Path, config: VideoXL2Config, drop=(), rename=None
) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    weights = {
        name: torch.randn(shape_of(formula, config), generator=generator) * 0.1
        for name, formula in release_names()
    }
    written = {k: v for k, v in weights.items() if k not in drop}
    if rename:
        written[rename[1]] = written.pop(rename[0])
    names = sorted(written)
    half = len(names) // 2
    folder.mkdir(parents=True, exist_ok=True)
    shards = {
        "model-00001-of-00002.safetensors": names[:half],
        "model-00002-of-00002.safetensors": names[half:],
    }
    for file, keys in shards.items():
        save_file({k: written[k].contiguous() for k in keys}, folder / file)
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    text = config.text_config
    release_config = {
        "architectures": ["LlavaQwenForCausalLM"],
        "model_type": "llava_qwen",
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads,
        "vocab_size": text.vocab_size,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 16384,
        "tie_word_embeddings": False,
        "mm_vision_tower": "google/siglip-so400m-patch14-384",
        "mm_projector_type": "mlp2x_gelu",
        "mm_hidden_size": config.vision_config.hidden_size,
        "mm_spatial_pool_stride": 2,
        "mm_spatial_pool_mode": "average",
        "mm_patch_merge_type": "unires",
        "rope_scaling": None,
        # Absent from the real release: describes the tiny SigLIP and grid of this test checkpoint.
        "videoxl2": {
            "vision_config": config.vision_config.to_dict(),
            "vision_grid": config.vision_grid,
            "video_token_id": config.video_token_id,
            "max_context_tokens": None,
        },
    }
    (folder / "config.json").write_text(json.dumps(release_config))
    return weights


def test_release_name_list_is_complete():
    names = [n for n, _ in release_names()]
    assert len(names) == 807 and len(set(names)) == 807
    config = VideoXL2Config.released()
    with torch.device("meta"):
        model = VideoXL2ForCausalLM(config)
    ours = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    mapped = {rename_release_key(n): shape_of(f, config) for n, f in release_names()}
    mapped.pop(None)  # text_mlp: accepted, unused
    assert mapped == ours
    total = sum(t.numel() for t in model.state_dict().values())
    assert abs(total / 1e9 - 8.14) < 0.03, total


def test_load_release_format_with_full_name_list(tmp_path):
    config = release_deep_config()
    weights = write_release_checkpoint(tmp_path / "release", config)
    loaded = load_model(tmp_path / "release")
    state = loaded.state_dict()
    for name, tensor in weights.items():
        ours = rename_release_key(name)
        if ours is not None:
            assert torch.equal(state[ours], tensor), name
    direct = VideoXL2ForCausalLM(config).eval()
    direct.load_state_dict({rename_release_key(k): v for k, v in weights.items() if rename_release_key(k)})
    ids = torch.tensor([[1, 5, 9, config.video_token_id, config.video_token_id, 7]])
    pixels = torch.randn(4, 3, 63, 63)
    with torch.no_grad():
        embeds = direct.encode_video(pixels)[:, :2]
        a = loaded(input_ids=ids, video_embeds=embeds).logits
        b = direct(input_ids=ids, video_embeds=embeds).logits
        va, vb = loaded.encode_video(pixels), direct.encode_video(pixels)
    assert (a - b).abs().max().item() == 0.0
    assert (va - vb).abs().max().item() == 0.0


def test_renamed_and_missing_keys_are_listed(tmp_path):
    config = release_deep_config()
    bad = "model.layers.3.self_attn.q_proj.weight"
    write_release_checkpoint(
        tmp_path / "bad",
        config,
        drop=("model.sae.temporal_encoding",),
        rename=(bad, "model.layers.3.self_attn.query.weight"),
    )
    with pytest.raises(CheckpointError) as info:
        load_model(tmp_path / "bad")
    message = str(info.value)
    assert "missing weights (2)" in message
    assert (
        "dts.temporal_encoding" in message
        and "language_model.model.layers.3.self_attn.q_proj.weight" in message
    )
    assert "unexpected weights (1): model.layers.3.self_attn.query.weight" in message


def test_wrong_shape_is_listed(tmp_path):
    config = release_deep_config()
    folder = tmp_path / "shape"
    write_release_checkpoint(folder, config)
    shard = folder / "model-00001-of-00002.safetensors"
    from safetensors.torch import load_file

    tensors = load_file(shard)
    name = sorted(tensors)[0]
    tensors[name] = torch.zeros(3, 3)
    save_file(tensors, shard)
    with pytest.raises(CheckpointError, match=re.escape(f"wrong shape (1): {name} (3, 3)")):
        load_model(folder)


def test_our_format_round_trip_and_automodel(tiny, tiny_checkpoint):
    model, _ = tiny
    loaded = load_model(tiny_checkpoint)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    from transformers import AutoModel, AutoModelForCausalLM

    assert type(AutoModel.from_pretrained(tiny_checkpoint)) is VideoXL2ForCausalLM
    assert type(AutoModelForCausalLM.from_pretrained(tiny_checkpoint)) is VideoXL2ForCausalLM
    assert len(videoxl2.load_tokenizer(tiny_checkpoint)) == model.config.vocab_size


@pytest.mark.parametrize(
    "setup, expected",
    [
        (lambda d: None, "no config.json"),
        (lambda d: (d / "config.json").write_text("{not json"), "not valid JSON"),
        (lambda d: (d / "config.json").write_text('{"model_type": "bert"}'), "model_type 'bert'"),
        (
            lambda d: (d / "config.json").write_text(json.dumps(tiny_config().to_dict())),
            "no model.safetensors",
        ),
    ],
)
def test_bad_folders(tmp_path, setup, expected):
    setup(tmp_path)
    with pytest.raises(CheckpointError, match=re.escape(expected)):
        load_model(tmp_path)


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        load_model(tmp_path / "nope")


def test_corrupt_safetensors(tmp_path, tiny_checkpoint):
    folder = tmp_path / "corrupt"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_checkpoint / "config.json").read_text())
    (folder / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model(folder)
