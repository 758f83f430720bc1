"""End to end: model.chat and VideoSession on synthetic videos with a tiny random model (fp32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from videoxl2 import InputError, MediaNotFoundError, VideoDecodeError
from videoxl2.engine.decode import run_on_cache
from videoxl2.engine.reference import reference_forward
from videoxl2.engine.session import VideoSession
from videoxl2.engine.settings import EngineSettings
from videoxl2.prompt import build_layout, build_prompt, time_text
from videoxl2.video import iter_frame_batches, plan_sampling, preprocess_frames, probe_video

GREEDY = {"do_sample": False, "max_new_tokens": 8}


def test_chat_seed_signature_and_history(tiny, synthetic_video):
    model, tokenizer = tiny
    answer = model.chat(
        synthetic_video,
        tokenizer,
        "What colour?",
        max_num_frames=16,
        sample_fps=1,
        max_sample_fps=4,
        generation_config=GREEDY,
    )
    assert isinstance(answer, str)
    again, history = model.chat(
        synthetic_video,
        tokenizer,
        "What colour?",
        return_history=True,
        max_num_frames=16,
        sample_fps=1,
        max_sample_fps=4,
        generation_config=GREEDY,
    )
    assert again == answer and history == [("What colour?", answer)]
    follow, history = model.chat(
        synthetic_video,
        tokenizer,
        "And then?",
        chat_history=history,
        return_history=True,
        max_num_frames=16,
        sample_fps=1,
        max_sample_fps=4,
        generation_config=GREEDY,
    )
    assert len(history) == 2 and history[1] == ("And then?", follow)


def test_session_layout_matches_sampling_and_tokens(tiny, synthetic_video):
    """Times and placeholder counts of the prompt are exactly those of the sampling plan."""
    model, tokenizer = tiny
    info = probe_video(synthetic_video)
    plan = plan_sampling(info.num_frames, info.avg_fps, 16, 1.0, 4.0)
    session = VideoSession.from_path(
        model, tokenizer, synthetic_video, max_num_frames=16, sample_fps=1, max_sample_fps=4
    )
    assert session.timestamps == plan.timestamps
    groups = -(-len(plan.indices) // 4)
    layout = session.layout
    assert layout.num_groups == groups
    per_group = model.config.tokens_per_group
    assert per_group == 16
    assert int(layout.visual_mask().sum()) == groups * per_group
    ids = layout.input_ids
    for group, first_frame in zip(layout.groups, range(0, len(plan.timestamps), 4)):
        assert tokenizer.decode(ids[group.time_start : group.visual_start]) == time_text(
            plan.timestamps[first_frame]
        )
        assert group.end - group.visual_start == per_group
    prefix = build_prompt("q").split("<image>")[0]
    assert tokenizer.decode(ids[: layout.video_start]) == prefix
    answer = session.ask("What colour?", generation_config=GREEDY)
    assert answer.stats["frames"] == len(plan.indices) and answer.stats["groups"] == groups
    assert answer.stats["kv_tokens"] == layout.video_end
    assert tokenizer.decode(answer.token_ids).strip() == answer.text or answer.text in tokenizer.decode(
        answer.token_ids
    )


def test_session_answers_equal_full_prompt_forward(tiny, synthetic_video):
    """Dense session (pre-fill once, question on top) = one plain forward over the whole prompt."""
    model, tokenizer = tiny
    session = VideoSession.from_path(model, tokenizer, synthetic_video, max_num_frames=12, sample_fps=2)
    memory = session.prefill()
    question = "Which shape moves?"
    info = probe_video(synthetic_video)
    plan = plan_sampling(info.num_frames, info.avg_fps, 12, 2.0)
    frames = np.concatenate(list(iter_frame_batches(synthetic_video, plan.indices, batch_size=64)))
    with torch.inference_mode():
        embeds = model.encode_video(preprocess_frames(frames, image_size=63))
    config = model.config
    layout = build_layout(tokenizer, build_prompt(question), plan.timestamps[::4], 16, config.video_token_id)
    ref_logits, _ = reference_forward(model, layout, embeds)
    mixed = memory.assemble(session.runner, None, rerotate=False)
    logits = run_on_cache(session.runner, model, mixed, session.question_ids(question))
    err = (logits - ref_logits[-1]).abs().max().item()
    assert err <= 1e-4, f"session logits differ from the full forward by {err:.2e}"


@pytest.mark.parametrize("mode", ["dense", "chunked", "bilevel"])
def test_modes_answer_and_report_stats(tiny, synthetic_video, mode):
    model, tokenizer = tiny
    settings = EngineSettings(mode=mode, block_size=1, prev_blocks=1, unit_size=1, topk=1)
    session = VideoSession.from_path(
        model, tokenizer, synthetic_video, max_num_frames=24, sample_fps=4, settings=settings
    )
    first = session.ask("What colour?", generation_config=GREEDY)
    second = session.ask("What colour?", generation_config=GREEDY)
    assert first.token_ids == second.token_ids  # the memory is not changed by a question
    stats = first.stats
    assert stats["mode"] == mode and stats["frames"] == 22 and stats["groups"] == 6
    for key in ("decode_s", "vision_s", "prefill_s", "answer_s", "dense_kv_bytes", "kv_bytes"):
        assert stats[key] > 0, key
    units = stats["units"]
    assert len(units) == 6 and units[0]["start_seconds"] == 0.0
    if mode == "bilevel":
        assert [u["index"] for u in units if u["dense"]] == sorted(
            {0, 5, *[u["index"] for u in units if u["dense"]]}
        )
        assert sum(u["dense"] for u in units) == 3 and all(u["score"] is not None for u in units)
        assert stats["kv_bytes"] < stats["dense_kv_bytes"]
    else:
        assert all(u["dense"] for u in units) and stats["kv_bytes"] == stats["dense_kv_bytes"]
    if mode == "chunked":
        assert stats["prefill_attention_flops"] < stats["dense_attention_flops"]


def test_seed_switches_select_chunked_mode(tiny):
    model, _ = tiny
    config = model.config
    try:
        config.enable_sparse = True
        config.sparse_mode = "streaming"
        config.sparse_config = {"block_size_chosed": 2, "prev_blocks_num": 5}
        settings = EngineSettings.from_config(config)
        assert (settings.mode, settings.block_size, settings.prev_blocks) == ("chunked", 2, 5)
    finally:
        del config.enable_sparse, config.sparse_mode, config.sparse_config
    assert EngineSettings.from_config(config).mode == "dense"


def test_rerotate_setting_from_config_and_cli(tiny, synthetic_video):
    """`rerotate` comes from the checkpoint config (overridable) and decides where bi-level keys sit."""
    from videoxl2.cli import _engine_overrides, build_parser
    from videoxl2.engine.decode import answer_from_cache
    from videoxl2.generation import GenerationSettings

    model, tokenizer = tiny
    config = model.config
    assert EngineSettings.from_config(config).rerotate is True
    config.rerotate = False
    try:
        settings = EngineSettings.from_config(config, mode="bilevel", unit_size=1, topk=1)
        assert settings.rerotate is False
        assert EngineSettings.from_config(config, rerotate=True).rerotate is True
    finally:
        config.rerotate = True
    args = build_parser().parse_args(["chat", "v.mp4", "q", "--no-rerotate"])
    assert _engine_overrides(args)["rerotate"] is False
    assert _engine_overrides(build_parser().parse_args(["chat", "v.mp4", "q"]))["rerotate"] is None

    question = "Which shape moves?"
    last_logits = {}
    for rerotate in (True, False):
        session = VideoSession.from_path(
            model,
            tokenizer,
            synthetic_video,
            max_num_frames=24,
            sample_fps=4,
            settings=settings.with_overrides(rerotate=rerotate),
        )
        answer = session.ask(question, generation_config=GREEDY)
        dense = [u["index"] for u in answer.stats["units"] if u["dense"]]
        assert len(dense) < len(answer.stats["units"])
        mixed = session.prefill().assemble(session.runner, dense, rerotate=rerotate, reserve=8)
        ids = answer_from_cache(
            model, tokenizer, mixed, session.question_ids(question), GenerationSettings.from_dict(GREEDY)
        )
        assert answer.token_ids == ids
        cache = session.prefill().assemble(session.runner, dense, rerotate=rerotate)
        last_logits[rerotate] = run_on_cache(session.runner, model, cache, session.question_ids(question))
    gap = (last_logits[True] - last_logits[False]).abs().max().item()
    assert gap > 1e-4, f"positions should change the logits, max abs difference {gap:.2e}"


def test_image_input(tiny, tmp_path):
    from PIL import Image

    model, tokenizer = tiny
    path = tmp_path / "still.png"
    Image.fromarray(np.full((40, 30, 3), 200, dtype=np.uint8)).save(path)
    session = VideoSession.from_path(model, tokenizer, path)
    assert session.timestamps == [0.0] and session.layout.num_groups == 1
    assert isinstance(session.ask("What is it?", generation_config=GREEDY).text, str)


def test_bad_inputs(tiny, synthetic_video, tmp_path):
    model, tokenizer = tiny
    with pytest.raises(MediaNotFoundError, match="missing.mp4"):
        model.chat(tmp_path / "missing.mp4", tokenizer, "q")
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    with pytest.raises(VideoDecodeError, match="notes.mp4"):
        model.chat(text, tokenizer, "q")
    with pytest.raises(InputError, match="question is empty"):
        model.chat(synthetic_video, tokenizer, "  ")
    with pytest.raises(InputError, match="num_beams"):
        model.chat(synthetic_video, tokenizer, "q", generation_config={"num_beams": 3})
    with pytest.raises(InputError, match="over the model's context"):
        model.chat(synthetic_video, tokenizer, "q" * 10, generation_config={"max_new_tokens": 20000})


def test_over_context_video_is_refused_before_decoding(tiny, synthetic_video):
    model, tokenizer = tiny
    old = model.config.max_context_tokens
    model.config.max_context_tokens = 50
    try:
        with pytest.raises(InputError, match="lower max_num_frames"):
            VideoSession.from_path(model, tokenizer, synthetic_video, max_num_frames=16)
    finally:
        model.config.max_context_tokens = old


def test_truncated_video_is_an_error(tiny, synthetic_video, tmp_path):
    model, tokenizer = tiny
    data = synthetic_video.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoDecodeError, match="cut.mp4"):
        model.chat(cut, tokenizer, "q", max_num_frames=16, generation_config=GREEDY)


def test_from_frames_streams(tiny):
    model, tokenizer = tiny
    frames = np.random.default_rng(0).integers(0, 255, (9, 20, 20, 3), dtype=np.uint8)
    session = VideoSession.from_frames(model, tokenizer, frames, [i * 0.5 for i in range(9)])
    assert session.layout.num_groups == 3
    answer = session.ask("q", generation_config=GREEDY)
    assert answer.stats["frames"] == 9
    with pytest.raises(InputError):
        VideoSession.from_frames(model, tokenizer, frames, [0.0])
    assert torch.is_tensor(session.memory.keys[0])


def test_streamed_answer_text_is_always_a_prefix_of_the_final_answer():
    """Streaming decodes the answer so far the way the final answer is decoded: special tokens dropped,
    an ending that may still become a stop string held back until it is known."""
    from videoxl2 import load_tokenizer
    from videoxl2.defaults import DEFAULT_MODEL
    from videoxl2.generation import GenerationSettings, decode_answer

    tokenizer = load_tokenizer(DEFAULT_MODEL)
    settings = GenerationSettings.from_dict({"stop": ["red circle"]})
    ids = tokenizer.encode("green square<|im_start|> and a red circle after", add_special_tokens=False)
    final = decode_answer(tokenizer, ids, settings)
    assert final == "green square and a", final
    shown = [decode_answer(tokenizer, ids[: n + 1], settings, partial=True) for n in range(len(ids))]
    assert all(final.startswith(text) for text in shown), shown
    assert "red" not in "".join(shown), shown  # "red" might have begun the stop string: never shown
