"""Input rules where the release's own code differs from ours (issue 23, item 5): `videoxl2 eval --protocol
release` takes its input exactly as the release's evaluation did, everything else keeps our rules, and
release config.json values the code does not implement are refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from videoxl2 import ConfigError, InputError, load_model
from videoxl2.defaults import DEFAULT_MODEL
from videoxl2.modeling.checkpoint import read_config
from videoxl2.prompt import build_prompt, prepare_question, rewrite_times
from videoxl2.video import plan_sampling


# -- frames past a multiple of 4 -------------------------------------------------------------------------
def test_drop_cuts_to_whole_groups_and_pad_keeps_every_frame():
    # 22 frames at 4 fps: 1 fps gives 6, raised to 4 fps -> all 22; 22 % 4 = 2 frames past the last group.
    pad = plan_sampling(22, 4.0, 100, 1.0, 4.0)
    drop = plan_sampling(22, 4.0, 100, 1.0, 4.0, remainder="drop")
    assert pad == plan_sampling(22, 4.0, 100, 1.0, 4.0, remainder="pad")
    assert pad.indices == list(range(22))
    assert drop.indices == list(range(20)) and drop.timestamps == pad.timestamps[:20]
    # Already whole groups: nothing to drop.
    whole = plan_sampling(300, 30.0, 8, 1.0)
    assert plan_sampling(300, 30.0, 8, 1.0, remainder="drop") == whole and len(whole.indices) == 8


def test_drop_refuses_a_clip_with_no_whole_group():
    # Half a second at 4 fps: 2 frames; padded they make one group, dropped they make none.
    assert len(plan_sampling(2, 4.0, 8, 1.0, 4.0).indices) == 2
    with pytest.raises(InputError, match=r"only 2 frames sampled .* needs at least 4") as info:
        plan_sampling(2, 4.0, 8, 1.0, 4.0, remainder="drop")
    assert "\n" not in str(info.value)
    with pytest.raises(InputError, match="remainder must be one of pad, drop"):
        plan_sampling(22, 4.0, 100, remainder="trim")


def test_an_image_is_never_cut(tiny, tmp_path):
    from videoxl2.engine.session import VideoSession

    model, tokenizer = tiny
    path = tmp_path / "still.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(path)
    session = VideoSession.from_path(model, tokenizer, path, remainder="drop")
    assert session.timestamps == [0.0] and session.stats["frames"] == 1


# -- mm:ss in the question -------------------------------------------------------------------------------
TIMES = "What happens at 1:05, at 01:02:03 and at 123:45?"
RELEASE_TIMES = "What happens at 1:05, at 62 seconds:03 and at 11425 seconds?"
OUR_TIMES = "What happens at 65 seconds, at 3723 seconds and at 7425 seconds?"


def test_the_two_time_rules():
    assert rewrite_times(TIMES) == OUR_TIMES
    assert rewrite_times(TIMES, "release") == RELEASE_TIMES
    # The release lists dd:dd strings, then replaces each one everywhere, in order.
    assert rewrite_times("24:49-26:00, 24:49", "release") == "1489 seconds-1560 seconds, 1489 seconds"
    assert rewrite_times("12:34:56 or 34:56", "release") == "754 seconds:56 or 2096 seconds"
    with pytest.raises(InputError, match="time rule"):
        rewrite_times(TIMES, "nearest")


def test_a_prepared_question_is_not_rewritten_again():
    assert f"<image>\n{RELEASE_TIMES}<|im_end|>" in build_prompt(prepare_question(TIMES, "release"))
    assert f"<image>\n{OUR_TIMES}<|im_end|>" in build_prompt(TIMES)
    assert build_prompt(prepare_question(TIMES)) == build_prompt(TIMES)


# -- `videoxl2 eval`: both rules follow the protocol -----------------------------------------------------
@pytest.fixture(scope="module")
def lvbench_root(tmp_path_factory):
    """One LVBench question with clock times about a clip whose 5 sampled frames are not whole groups."""
    from videoxl2.video.synthetic import write_synthetic_video

    root = tmp_path_factory.mktemp("lvbench")
    (root / "videos").mkdir()
    # 10 frames at 2 fps, 1 fps raised while the budget of 8 allows: 8 // 5 = 1 -> 5 frames.
    write_synthetic_video(root / "videos" / "clip.mp4", num_frames=10, fps=2.0, size=(32, 32), seed=3)
    qa = {
        "uid": "q1",
        "question": f"{TIMES}\n(A) a circle\n(B) a square\n(C) nothing\n(D) a line",
        "answer": "A",
        "question_type": ["key information retrieval"],
    }
    line = {"key": "clip", "type": "cartoon", "qa": [qa]}
    (root / "video_info.meta.jsonl").write_text(json.dumps(line) + "\n")
    return root


@pytest.mark.parametrize(
    "protocol, frames, times, rules",
    [
        ("release", 4, RELEASE_TIMES, {"remainder": "drop", "time_rule": "release"}),
        ("lmms-eval", 5, OUR_TIMES, {"remainder": "pad", "time_rule": "ours"}),
    ],
    ids=["release", "lmms-eval"],
)
def test_eval_takes_input_as_its_protocol_says(
    protocol, frames, times, rules, lvbench_root, tiny_checkpoint, tmp_path, monkeypatch
):
    from videoxl2.engine import session as session_module
    from videoxl2.eval.benchmarks import Options
    from videoxl2.eval.runner import EvalSettings, run_eval

    prompts = []

    def spy(question, history=None, **kwargs):
        prompts.append(build_prompt(question, history, **kwargs))
        return prompts[-1]

    monkeypatch.setattr(session_module, "build_prompt", spy)
    settings = EvalSettings(
        benchmark="lvbench", data_root=lvbench_root, out=tmp_path / "out", model=str(tiny_checkpoint),
        options=Options(protocol), max_frames=8, max_new_tokens=2, progress=False,
    )  # fmt: skip
    results = run_eval(settings)
    assert results["errors"] == 0 and {k: results["settings"][k] for k in rules} == rules
    record = json.loads((tmp_path / "out" / "samples.jsonl").read_text().splitlines()[0])
    assert record["frames"] == frames
    asked = [p for p in prompts if "What happens" in p]
    assert asked and all(f"<image>\n{times}\n" in p for p in asked), asked


# -- release config.json values the code does not implement ----------------------------------------------
def release_config(**changes) -> dict:
    config = {
        "architectures": ["LlavaQwenForCausalLM"],
        "model_type": "llava_qwen",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 700,
        "mm_projector_type": "mlp2x_gelu",
        "mm_spatial_pool_stride": 2,
        "mm_spatial_pool_mode": "average",
        "mm_vision_select_layer": -1,
    }
    config.update(changes)
    return {k: v for k, v in config.items() if v is not None}


def write_config(folder: Path, config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    "changes, named",
    [
        ({"mm_projector_type": "linear"}, "mm_projector_type = 'linear'"),
        ({"mm_projector_type": "mlp3x_gelu"}, "mm_projector_type = 'mlp3x_gelu'"),
        ({"mm_projector_type": None}, "mm_projector_type is missing, which the release reads as 'linear'"),
        ({"mm_spatial_pool_mode": "max"}, "mm_spatial_pool_mode = 'max'"),
        ({"mm_spatial_pool_mode": "bilinear"}, "mm_spatial_pool_mode = 'bilinear'"),
        ({"mm_vision_select_layer": -3}, "mm_vision_select_layer = -3"),
        ({"mm_vision_select_layer": 0}, "mm_vision_select_layer = 0"),
    ],
)
def test_unimplemented_release_values_are_config_errors(changes, named, tmp_path):
    folder = write_config(tmp_path / "release", release_config(**changes))
    with pytest.raises(ConfigError, match=named) as info:
        load_model(folder)
    assert str(folder / "config.json") in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "changes",
    [{}, {"mm_vision_select_layer": -2}, {"mm_vision_select_layer": None, "mm_spatial_pool_mode": None}],
)
def test_implemented_release_values_are_accepted(changes, tmp_path):
    config, release = read_config(write_config(tmp_path / "release", release_config(**changes)))
    assert release and config.pool_stride == 2


def test_the_demo_model_and_tiny_checkpoints_still_load(tiny_checkpoint):
    assert load_model(DEFAULT_MODEL).config.model_type == "videoxl2"
    assert load_model(tiny_checkpoint).config.model_type == "videoxl2"
