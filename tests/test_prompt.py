"""Prompt text, time rewriting and the token layout."""

from __future__ import annotations

import pytest
import torch

from videoxl2 import InputError
from videoxl2.prompt import (
    IMAGE_MARKER,
    build_layout,
    build_prompt,
    normalize_history,
    rewrite_times,
    time_text,
)
from videoxl2.tokenizer import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def test_chatml_prompt_matches_release_template():
    assert build_prompt("How many people?") == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nHow many people?"
        "<|im_end|>\n<|im_start|>assistant\n"
    )


def test_multi_turn_history_places_image_in_first_turn():
    prompt = build_prompt("And then?", [("What is red?", "A ball.")])
    assert prompt.count(IMAGE_MARKER) == 1
    assert prompt.endswith(
        "user\n<image>\nWhat is red?<|im_end|>\n<|im_start|>assistant\nA ball.<|im_end|>\n"
        "<|im_start|>user\nAnd then?<|im_end|>\n<|im_start|>assistant\n"
    )
    dicts = [{"role": "user", "content": "What is red?"}, {"role": "assistant", "content": "A ball."}]
    assert normalize_history(dicts) == [("What is red?", "A ball.")]


def test_existing_image_marker_is_not_duplicated():
    assert build_prompt("<image>\nWhat?").count(IMAGE_MARKER) == 1


@pytest.mark.parametrize(
    "text, expected",
    [
        ("at 01:05 and 12:30", "at 65 seconds and 750 seconds"),
        ("from 1:02:03 on", "from 3723 seconds on"),
        ("between 24:49-26:00", "between 1489 seconds-1560 seconds"),
        ("ratio 3:2:1:0 stays", "ratio 3:2:1:0 stays"),
        ("no times here", "no times here"),
    ],
)
def test_rewrite_times(text, expected):
    assert rewrite_times(text) == expected


def test_question_times_are_rewritten_in_prompt():
    assert "What happens at 90 seconds?" in build_prompt("What happens at 01:30?")


@pytest.mark.parametrize(
    "seconds, text", [(0, "Time 0.0s:"), (12.5, "Time 12.5s:"), (3.04, "Time 3.0s:"), (61.26, "Time 61.3s:")]
)
def test_time_text(seconds, text):
    assert time_text(seconds) == text


@pytest.mark.parametrize("question", ["", "   ", None])
def test_empty_question_is_rejected(question):
    with pytest.raises(InputError, match="question is empty"):
        build_prompt(question)


def test_bad_history_is_rejected():
    with pytest.raises(InputError, match="chat_history"):
        normalize_history([{"role": "robot", "content": "x"}])
    with pytest.raises(InputError, match="chat_history"):
        normalize_history([("only one",)])


def test_layout_spans(tokenizer):
    prompt = build_prompt("What colour?")
    layout = build_layout(tokenizer, prompt, [0.0, 4.0, 8.5], tokens_per_group=5, video_token_id=3)
    ids = layout.input_ids
    prefix = tokenizer(prompt.split(IMAGE_MARKER)[0], add_special_tokens=False)["input_ids"]
    assert ids[: layout.video_start].tolist() == prefix
    for group, seconds in zip(layout.groups, [0.0, 4.0, 8.5]):
        assert tokenizer.decode(ids[group.time_start : group.visual_start]) == f"Time {seconds}s:"
        assert ids[group.visual_start : group.end].tolist() == [3] * 5
        assert group.seconds == seconds
    assert layout.groups[0].time_start == layout.video_start
    assert layout.groups[-1].end == layout.video_end
    assert tokenizer.decode(ids[layout.video_end :]) == prompt.split(IMAGE_MARKER)[1]
    assert int(layout.visual_mask().sum()) == 15
    assert int(layout.time_mask().sum()) == sum(g.visual_start - g.time_start for g in layout.groups)
    assert not (layout.visual_mask() & layout.time_mask()).any()


def test_layout_rejects_over_context(tokenizer):
    with pytest.raises(InputError, match="over the model's context of 100"):
        build_layout(tokenizer, build_prompt("q"), [0.0] * 10, 16, 3, max_length=100)


def test_layout_needs_one_marker(tokenizer):
    with pytest.raises(InputError, match="exactly one <image>"):
        build_layout(tokenizer, "no marker", [0.0], 4, 3)
    assert isinstance(build_layout(tokenizer, "<image>", [0.0], 4, 3).input_ids, torch.Tensor)


def test_blank_line_after_marker_survives():
    assert "user\n<image>\n\nWhich option?" in build_prompt("<image>\n\nWhich option?")
    assert "user\n<image>\n\nWhich option?" in build_prompt("\nWhich option?")


def test_tiny_tokenizer_keeps_seconds_and_names_whole(tokenizer):
    """A time is the same tokens in the prompt and in an answer, a whole second up to 199 one token; a
    colour or shape name is one token."""

    def pieces(text):
        return [tokenizer.decode([i]) for i in tokenizer(text)["input_ids"]]

    assert pieces("Time 56.0s:") == ["Time", " ", "56", ".", "0", "s", ":"]
    assert pieces("56.0s") == ["56", ".", "0", "s"]
    assert all(pieces(f"Time {n}.0s:")[2] == str(n) for n in range(200))
    assert pieces("Time 4092.0s:")[2:-4] == pieces("4092.0s")[:-3]  # longer numbers: same pieces both ways
    assert pieces("(B) magenta triangle") == ["(", "B", ")", " magenta", " triangle"]
    text = "Time 1234.5s: (A) cyan cross\n<|im_end|>"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


@pytest.mark.parametrize("value", [-4, float("nan"), float("inf"), "12", True, None])
def test_clip_start_must_be_finite_seconds(value):
    """One check for training records, evaluation records and sessions: a bad start never reaches the text."""
    from videoxl2.prompt import check_clip_start

    assert check_clip_start(96, "clip.json[0]") == 96.0 and check_clip_start(0.5, "x") == 0.5
    with pytest.raises(
        InputError, match=r"clip\.json\[0\]: 'clip_start' must be a finite number of seconds >= 0"
    ):
        check_clip_start(value, "clip.json[0]")
