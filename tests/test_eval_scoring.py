"""Answer extraction and scoring with fixed predictions: known accuracies per benchmark and protocol,
malformed outputs included ('The answer is (B).', 'b', 'none of them', empty)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from videoxl2.eval.benchmarks import BENCHMARKS, Options
from videoxl2.eval.data import Sample
from videoxl2.eval.scoring import (
    longvideobench_letter,
    lvbench_release_normalize,
    mcq_letter,
    mlvu_release_letter,
    normalize_text,
    parse_span,
    temporal_iou,
    videomme_release_letter,
)

MALFORMED = ["The answer is (B).", "b", "none of them", ""]


def score(bench: str, protocol: str, golds, predictions, categories=None, choices=("A", "B", "C", "D")):
    """Judge fixed predictions and summarise them as the runner does."""
    benchmark = BENCHMARKS[bench]
    options = benchmark.resolve(Options(protocol))
    records = []
    for i, (gold, prediction) in enumerate(zip(golds, predictions)):
        cats = (categories or [{}] * len(golds))[i]
        sample = Sample(f"q{i}", Path(f"v{i}.mp4"), "?", gold, cats, tuple(choices))
        verdict = benchmark.judge(sample, prediction, options)
        records.append({"prediction": prediction, "categories": cats, **verdict})
    return records, benchmark.summarize(records, options)


# -- extraction rules ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, letter",
    [
        ("The answer is (B).", "B"), ("b", ""), ("none of them", ""), ("", ""), ("   ", ""), ("C", "C"),
        ("D. Four.", "D"), ("(A) One", "A"), ("Option C is wrong; the answer is D", "D"),
        ("The correct option is B, not C.", "C"), ("Answer: C", "C"), ("答案是B", "B"),
        ("I would go with A: it fits", "A"), ("Best option: (C", "C"), ("xyz", ""),
    ],
)  # fmt: skip
def test_lmms_eval_letter(text, letter):
    assert mcq_letter(text) == letter


@pytest.mark.parametrize(
    "text, letter",
    [
        ("The answer is (B).", "B"), ("b", ""), ("none of them", ""), ("", ""), ("B", "B"),
        ("The best answer is D.", "D"), ("(C) Three.", "C"), ("A person counts.", "A"),
        ("The correct option is C", "C"),  # not a prefix in the release's list: its "T" is no option
        ("Best answer:Best option: D", "D"),  # the glued prefix goes as a whole...
        ("Best answer: D", "B"),  # ...but "Best answer:" alone is no prefix there, and "Best" starts with B
    ],
)  # fmt: skip
def test_videomme_release_letter(text, letter):
    assert videomme_release_letter(text) == letter


def test_mlvu_release_letter():
    assert [mlvu_release_letter(t) for t in MALFORMED] == ["B", "b", "none of them", ""]
    assert mlvu_release_letter("C) the blue one") == "C"
    assert mlvu_release_letter(")") == ""


def test_lvbench_release_normalize():
    assert [lvbench_release_normalize(t) for t in MALFORMED] == ["B", "B", "none of them", ""]
    assert lvbench_release_normalize("C. Eating") == "C"
    assert lvbench_release_normalize("(d)") == "D"
    assert lvbench_release_normalize("It is 3.5 metres") == "it is 3.5 metres"


def test_longvideobench_letter_guesses_reproducibly():
    assert longvideobench_letter("The answer is (B).", "ABCDE", "x") == ("B", False)
    assert longvideobench_letter("Best option: E", "ABCDE", "x") == ("E", False)
    for text in MALFORMED[1:]:
        letter, guessed = longvideobench_letter(text, ("A", "B", "C"), "q7")
        assert guessed and letter == random.Random("q7").choice(["A", "B", "C"])


@pytest.mark.parametrize(
    "text, span",
    [
        ("The event happens in 2.0 - 4.0 seconds.", (2.0, 4.0)),
        ("It happens from 0:01 to 0:03.", (1.0, 3.0)),
        ("The event starts at 5 seconds.\nIt ends at 7 seconds.", (5.0, 7.0)),
        ("happens in 9.5-3", (3.0, 9.5)),
        ("The event starts at 00:00:12 and ends at 00:00:20.", (12.0, 20.0)),
        ("starts at 5 and ends at 7", None),  # one sentence: only its first number counts, as in lmms-eval
        ("none of them", None),
        ("", None),
    ],
)
def test_parse_span(text, span):
    assert parse_span(text) == span


def test_temporal_iou_and_text_normalisation():
    assert temporal_iou((2, 4), (2, 4)) == 1.0
    assert temporal_iou((2, 4), (1, 3)) == pytest.approx(1 / 3)
    assert temporal_iou((0, 1), (2, 3)) == 0.0
    assert temporal_iou((1, 1), (1, 1)) == 0.0
    assert normalize_text("  The  Red Ball. ") == "the red ball"


# -- per benchmark: known accuracies -------------------------------------------------------------------------
def test_videomme_scores():
    golds = ["B", "B", "B", "B", "C", "A"]
    predictions = [*MALFORMED, "C. Three.", "the answer is a"]
    cats = [{"duration": d, "domain": "Knowledge", "sub_category": "Law", "task_type": "OCR Problems"}
            for d in ["short", "short", "medium", "medium", "long", "long"]]  # fmt: skip
    _, release = score("videomme", "release", golds, predictions, cats)
    assert (release["correct"], release["total"]) == (2, 6)  # (B), C. ("the answer is a": no capital)
    assert release["categories"]["duration"]["short"]["accuracy"] == 50.0
    assert release["categories"]["duration"]["long"]["accuracy"] == 50.0
    _, lmms = score("videomme", "lmms-eval", golds, predictions, cats)
    assert (lmms["correct"], lmms["score"]) == (2, pytest.approx(100 * 2 / 6, abs=1e-3))


def test_mlvu_scores_micro_for_release_and_macro_for_lmms_eval():
    golds = ["B", "B", "B", "B", "C", "A"]
    predictions = [*MALFORMED, "C) blue", "(A) red"]
    cats = [{"task_type": t} for t in ["needle", "needle", "count", "count", "order", "order"]]
    _, release = score("mlvu", "release", golds, predictions, cats)
    assert release["correct"] == 3 and release["score"] == 50.0  # (B), C), (A): all by the ")" rule
    _, lmms = score("mlvu", "lmms-eval", golds, predictions, cats)
    assert lmms["correct"] == 3 and lmms["accuracy"] == 50.0
    # per type: needle 50, count 0, order 100; seven types averaged, absent ones as 0
    assert lmms["score"] == pytest.approx((50 + 0 + 100) / 7, abs=1e-3)


def test_longvideobench_scores():
    golds = ["B", "B", "A", "C", "E"]
    predictions = ["The answer is (B).", "b", "none of them", "", "Best option: E"]
    records, summary = score(
        "longvideobench", "release", golds, predictions, choices=("A", "B", "C", "D", "E")
    )
    guesses = [random.Random(f"q{i}").choice("ABCDE") for i in (1, 2, 3)]
    expected = 2 + sum(g == gold for g, gold in zip(guesses, golds[1:4]))
    assert summary["correct"] == expected and summary["guessed"] == 3
    assert [r["guessed"] for r in records] == [False, True, True, True, False]


def test_lvbench_scores_leave_empty_outputs_out_for_release():
    golds = ["B", "B", "B", "B", "D"]
    predictions = [*MALFORMED, "D. Nothing"]
    types = [["reasoning", "summarization"][: 1 + i % 2] for i in range(5)]
    cats = [{"question_type": t, "video_type": "sport"} for t in types]
    _, release = score("lvbench", "release", golds, predictions, cats)
    assert (release["correct"], release["total"], release["score"]) == (3, 4, 75.0)  # (B), b, D.
    assert release["categories"]["question_type"]["summarization"]["total"] == 1  # of 2: "" not counted
    _, lmms = score("lvbench", "lmms-eval", golds, predictions, cats)
    assert (lmms["correct"], lmms["total"], lmms["score"]) == (2, 5, 40.0)  # (B), D.


def test_charades_scores():
    golds = [[2.0, 4.0], [2.0, 4.0], [0.0, 10.0], [1.0, 2.0], [1.0, 2.0]]
    predictions = [
        "The event happens in 2.0 - 4.0 seconds.", "It happens from 0:01 to 0:03.", "happens in 0 - 6",
        "none of them", "",
    ]  # fmt: skip
    records, summary = score("charades_sta", "lmms-eval", golds, predictions)
    assert [round(r["iou"], 4) for r in records] == [1.0, 0.3333, 0.6, 0.0, 0.0]
    assert summary["mIoU"] == pytest.approx(100 * (1 + 1 / 3 + 0.6) / 5, abs=1e-3)
    assert (summary["R@0.3"], summary["R@0.5"], summary["R@0.7"]) == (60.0, 40.0, 20.0)
    assert summary["unparsed"] == 2 and summary["score"] == summary["mIoU"]


def test_synthetic_scores_per_family():
    golds = ["Red.", "red", "3", "3", "blue"]
    predictions = ["red", "The answer is red", "3", "", "  BLUE!"]
    cats = [{"family": f} for f in ["colour", "colour", "count", "count", "colour"]]
    _, summary = score("synthetic", "exact", golds, predictions, cats)
    assert summary["correct"] == 3
    assert summary["categories"]["family"]["colour"]["accuracy"] == pytest.approx(200 / 3, abs=1e-3)
    assert summary["categories"]["family"]["count"]["accuracy"] == 50.0
