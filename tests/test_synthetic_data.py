"""Synthetic needle videos and their questions: deterministic, exact, and visible in the decoded video."""

from __future__ import annotations

import json

import numpy as np
import pytest

from videoxl2 import InputError
from videoxl2.cli import main
from videoxl2.data import (
    COLOURS,
    Needle,
    VideoSpec,
    make_dataset,
    needle_haystack_spec,
    questions,
    random_spec,
    render_frame,
    write_video,
)
from videoxl2.data.synthetic import CHOICE_SUFFIX, LIST_QUESTION, option_matching_records
from videoxl2.video import iter_frame_batches, plan_sampling, probe_video


def test_needle_frames_show_the_needle_after_encoding(tmp_path):
    spec = VideoSpec(16, 1.0, 3, (Needle("blue", "circle", 8),))
    path = write_video(spec, tmp_path / "v.mp4")
    info = probe_video(path)
    plan = plan_sampling(info.num_frames, info.avg_fps, 64, sample_fps=1.0)
    assert plan.indices == list(range(16))  # every frame is sampled at the video's own rate
    frames = np.concatenate(list(iter_frame_batches(path, plan.indices)))
    centre = frames[:, 32, 32].astype(int)
    for index in range(16):
        distance = np.abs(centre[index] - np.array(COLOURS["blue"])).max()
        assert (distance < 40) == (8 <= index < 12), (index, centre[index])


def test_late_frames_of_a_long_video_decode_as_cleanly_as_the_first(tmp_path):
    """The encoder runs at a fixed quantiser: without it the rate control let the error of a shape's pixels
    climb over the first dozen frames to 4.7x the first frame's, so long videos' needles were noisier than
    clips'."""
    spec = VideoSpec(48, 1.0, 0, tuple(Needle("blue", "cross", g * 4) for g in range(12)))
    path = write_video(spec, tmp_path / "v.mp4")
    frames = np.concatenate(list(iter_frame_batches(path, list(range(48))))).astype(int)
    rendered = np.stack([render_frame(spec, i) for i in range(48)]).astype(int)
    errors = np.abs(frames - rendered).mean(axis=(1, 2, 3))
    assert errors.max() <= 1.5 * errors[0], (
        f"mean abs error {errors[0]:.2f} at frame 0, {errors.max():.2f} later"
    )


def test_haystack_is_colourless_and_varied():
    spec = VideoSpec(40, 1.0, 5, ())
    frames = np.stack([render_frame(spec, i) for i in range(40)])
    assert (frames[..., 0] == frames[..., 1]).all() and (frames[..., 1] == frames[..., 2]).all()
    assert np.abs(frames[0].astype(int) - frames[20].astype(int)).max() > 10  # the blobs move


def test_questions_have_exact_answers():
    spec = VideoSpec(
        40, 2.0, 0, (Needle("red", "square", 4), Needle("green", "cross", 12), Needle("red", "circle", 28))
    )
    found = {q.family: q for q in questions(spec, np.random.default_rng(0))}
    assert found["what"].answer == "red square"
    assert found["when"].answer == "2.0s"  # frame 4 at 2 fps
    assert found["count"].answer == "2" and "red shape" in found["count"].question
    assert found["order"].answer == "red square"
    choice = found["choice"]
    options = choice.extra["options"]
    letter = "ABCD"[options.index("red square")]
    assert len(set(options)) == 4 and f"\n({letter}) red square\n" in choice.question
    name, *verdicts, last = choice.answer.split("\n")
    assert name == "red square" and last == f"Answer: {letter}"
    yes = lambda same: "yes" if same else "no"  # noqa: E731
    assert verdicts == [
        f"({x}) {o}: colour {yes(o.startswith('red '))}, shape {yes(o.endswith(' square'))}, "
        f"so {yes(x == letter)}"
        for x, o in zip("ABCD", options)
    ]


def test_random_specs_are_deterministic_and_on_group_boundaries():
    a = random_spec(np.random.default_rng(7), 64)
    b = random_spec(np.random.default_rng(7), 64)
    assert a == b and a != random_spec(np.random.default_rng(8), 64)
    assert all(n.start_frame % 4 == 0 and n.start_frame + 4 <= 64 for n in a.needles)
    assert len({n.start_frame for n in a.needles}) == len(a.needles)


@pytest.mark.parametrize("depth, start", [(0.0, 0), (1.0, 60), (0.5, 32)])
def test_needle_depth(depth, start):
    spec = needle_haystack_spec(64, depth)
    assert spec.needles[0].start_frame == start
    with pytest.raises(InputError, match="depth"):
        needle_haystack_spec(64, 1.5)


def test_dataset_files_and_determinism(tmp_path):
    first = make_dataset(tmp_path / "a", 2, seed=1, frames_range=(8, 16))
    second = make_dataset(tmp_path / "b", 2, seed=1, frames_range=(8, 16))
    assert first.read_text() == second.read_text()
    records = json.loads(first.read_text())
    assert {r["family"] for r in records} >= {"what", "choice", "when", "count"}
    for record in records:
        human, gpt = record["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n") and gpt["from"] == "gpt"
        assert (first.parent / record["video"]).is_file()
    assert "json_path: train.json" in (tmp_path / "a" / "data.yaml").read_text()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["data.yaml", "train.json", "videos"]


def test_make_data_command(tmp_path, capsys):
    assert (
        main(["make-data", str(tmp_path / "d"), "--videos", "1", "--frames-min", "8", "--frames-max", "8"])
        == 0
    )
    assert "wrote 1 videos" in capsys.readouterr().out
    assert main(["make-data", str(tmp_path / "e"), "--videos", "0"]) == 2
    assert capsys.readouterr().err.startswith("videoxl2: error: nothing to write: --videos 0")


def test_multi_turn_conversations_ask_every_family_once(tmp_path):
    records = json.loads(make_dataset(tmp_path, 3, seed=2, frames_range=(8, 24), multi_turn=True).read_text())
    assert len(records) == 3
    for record in records:
        turns = record["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert turns[0]["value"].startswith("<image>\n")
        assert not any("<image>" in t["value"] for t in turns[1:])
        asked = [t["value"].removeprefix("<image>\n") for t in turns[::2]]
        assert len(asked) in (4, 5) and len(set(asked)) == len(asked)


def _turns(record: dict) -> tuple[list, list]:
    """(multiple-choice, other) question/answer pairs of a conversation."""
    turns = record["conversations"]
    pairs = [(q["value"].removeprefix("<image>\n"), a["value"]) for q, a in zip(turns[::2], turns[1::2])]
    choice = [pair for pair in pairs if pair[0].endswith(CHOICE_SUFFIX)]
    return choice, [pair for pair in pairs if pair not in choice]


def test_choice_repeats_reshuffle_the_options_and_change_nothing_else(tmp_path):
    def dataset(name, repeats):
        path = make_dataset(tmp_path / name, 3, 4, (8, 24), multi_turn=True, choice_repeats=repeats)
        return json.loads(path.read_text())

    for before, after in zip(dataset("a", 0), dataset("b", 3), strict=True):
        assert before["needles"] == after["needles"]
        videos = (tmp_path / "a" / before["video"], tmp_path / "b" / after["video"])
        assert videos[0].read_bytes() == videos[1].read_bytes()
        choice, rest = _turns(after)
        assert rest == _turns(before)[1]
        assert len(choice) == 4 and len({question for question, _ in choice}) > 1
        first = "{colour} {shape}".format(**after["needles"][0])
        for question, answer in choice:
            name, *_, last = answer.split("\n")
            letter = last.removeprefix("Answer: ")
            assert name == first and f"\n({letter}) {first}\n" in question
    with pytest.raises(InputError, match="--choice-repeats needs --multi-turn"):
        make_dataset(tmp_path / "c", 1, choice_repeats=2)


def test_when_repeats_follow_each_when_turn_with_copies_and_change_nothing_else(tmp_path):
    def dataset(name, repeats):
        path = make_dataset(
            tmp_path / name, 4, 7, (8, 40), multi_turn=True, every_needle=True, when_repeats=repeats
        )
        return json.loads(path.read_text())

    def pairs(record):
        turns = record["conversations"]
        return [(q["value"].removeprefix("<image>\n"), a["value"]) for q, a in zip(turns[::2], turns[1::2])]

    repeated = 0
    for before, after in zip(dataset("a", 0), dataset("b", 2), strict=True):
        assert before["needles"] == after["needles"]
        videos = (tmp_path / "a" / before["video"], tmp_path / "b" / after["video"])
        assert videos[0].read_bytes() == videos[1].read_bytes()
        assert after["conversations"][0]["value"].startswith("<image>\n")
        assert sum(turn["value"].startswith("<image>") for turn in after["conversations"]) == 1
        old, new, expected = pairs(before), pairs(after), []
        for pair in old:
            expected += [pair] * (3 if pair[0].startswith("When did") else 1)
        assert new == expected
        repeated += sum(question.startswith("When did") for question, _ in old)
    assert repeated > 4
    with pytest.raises(InputError, match="--when-repeats needs --multi-turn"):
        make_dataset(tmp_path / "c", 1, when_repeats=1)


def test_list_shapes_asks_for_every_needle_in_order_and_changes_nothing_else(tmp_path):
    def dataset(name, listed):
        path = make_dataset(tmp_path / name, 4, 5, (8, 32), multi_turn=True, list_shapes=listed)
        return json.loads(path.read_text())

    for before, after in zip(dataset("a", False), dataset("b", True), strict=True):
        assert before["needles"] == after["needles"]
        videos = (tmp_path / "a" / before["video"], tmp_path / "b" / after["video"])
        assert videos[0].read_bytes() == videos[1].read_bytes()
        turns = after["conversations"]
        pairs = [(q["value"].removeprefix("<image>\n"), a["value"]) for q, a in zip(turns[::2], turns[1::2])]
        listed = [answer for question, answer in pairs if question == LIST_QUESTION]
        names = ["{colour} {shape}".format(**n) for n in after["needles"]]
        assert listed == [", ".join(names)]
        old = before["conversations"]
        assert [pair for pair in pairs if pair[0] != LIST_QUESTION] == [
            (q["value"].removeprefix("<image>\n"), a["value"]) for q, a in zip(old[::2], old[1::2])
        ]
    with pytest.raises(InputError, match="--list-shapes needs --multi-turn"):
        make_dataset(tmp_path / "c", 1, list_shapes=True)


def test_reading_first_opens_on_the_two_reading_questions_and_changes_nothing_else(tmp_path):
    def dataset(name, chance):
        path = make_dataset(tmp_path / name, 6, 3, (8, 24), multi_turn=True, reading_first=chance)
        return json.loads(path.read_text())

    openings = set()
    for before, after in zip(dataset("a", 0.0), dataset("b", 1.0), strict=True):
        assert before["needles"] == after["needles"]
        videos = (tmp_path / "a" / before["video"], tmp_path / "b" / after["video"])
        assert videos[0].read_bytes() == videos[1].read_bytes()
        choice, rest = _turns(after)
        opening = [q["value"].removeprefix("<image>\n") for q in after["conversations"][:4:2]]
        assert set(opening) == {choice[0][0], "What was the first shape shown in the video?"}
        openings.add(opening[0] == choice[0][0])
        assert sorted(choice + rest) == sorted(sum(_turns(before), []))
    assert openings == {True, False}  # both reading questions open some conversations
    with pytest.raises(InputError, match="--reading-first needs --multi-turn"):
        make_dataset(tmp_path / "c", 1, reading_first=0.5)
    with pytest.raises(InputError, match="chance in \\[0, 1\\], got 1.5"):
        make_dataset(tmp_path / "d", 1, multi_turn=True, reading_first=1.5)


def test_every_needle_asks_about_the_later_needles_and_changes_nothing_else(tmp_path):
    def dataset(name, every):
        path = make_dataset(tmp_path / name, 12, 8, (12, 40), multi_turn=True, every_needle=every)
        return json.loads(path.read_text())

    added = 0
    for before, after in zip(dataset("a", False), dataset("b", True), strict=True):
        assert before["needles"] == after["needles"]
        videos = (tmp_path / "a" / before["video"], tmp_path / "b" / after["video"])
        assert videos[0].read_bytes() == videos[1].read_bytes()
        old, new = (sum(_turns(r), []) for r in (before, after))
        extra = [pair for pair in new if pair not in old]
        assert sorted(pair for pair in new if pair in old) == sorted(old)
        needles = after["needles"]
        names = ["{colour} {shape}".format(**n) for n in needles]
        for question, answer in extra:
            if question.startswith("When did the "):
                name = question.removeprefix("When did the ").removesuffix(" appear?")
                assert name != names[0] and answer == f"{float(needles[names.index(name)]['start_frame'])}s"
            elif question.startswith("How many times did a "):
                colour = question.split()[5]
                assert colour != needles[0]["colour"]
                assert answer == str(sum(n["colour"] == colour for n in needles))
            else:
                a, b = question.removeprefix("Which came first, the ").removesuffix("?").split(" or the ")
                assert names[0] not in (a, b) and answer == min((a, b), key=names.index)
        unique = len(set(names))
        colours = {n["colour"] for n in needles} - {needles[0]["colour"]}
        assert len(extra) == (unique - 1) + len(colours) + (unique - 1) * (unique - 2) // 2
        added += len(extra)
    assert added > 6
    with pytest.raises(InputError, match="--every-needle needs --multi-turn"):
        make_dataset(tmp_path / "c", 1, every_needle=True)


def test_repeat_colour_gives_counting_practice():
    def repeated(p):
        rng = np.random.default_rng(5)
        specs = [random_spec(rng, 64, max_needles=3, repeat_colour=p) for _ in range(300)]
        return np.mean([sum(n.colour == s.needles[0].colour for n in s.needles) >= 2 for s in specs])

    assert repeated(0.0) < 0.25 < 0.5 < repeated(1.0) and repeated(1.0) > repeated(0.5) > repeated(0.0)
    with pytest.raises(InputError, match="repeat_colour must be in"):
        random_spec(np.random.default_rng(0), 64, repeat_colour=1.5)


def test_option_matching_drills_point_at_the_named_option():
    records = option_matching_records(50, seed=3)
    assert option_matching_records(50, seed=3) == records
    letters = set()
    for record in records:
        question, answer = (t["value"] for t in record["conversations"])
        named, *verdicts, last = answer.split("\n")
        letter = last.removeprefix("Answer: ")
        assert question.startswith("What was the first shape shown in the video?\n")
        assert f"({letter}) {named}\n" in question
        assert f"({letter}) {named}: colour yes, shape yes, so yes" in verdicts
        assert sum(v.endswith("so yes") for v in verdicts) == 1 and len(verdicts) == 4
        for line in verdicts:  # each word judged against the name, then both
            option = line.split(") ", 1)[1].split(":")[0].split()
            colour, shape = (word == own for word, own in zip(option, named.split()))
            yes = lambda same: "yes" if same else "no"  # noqa: E731
            assert line.endswith(f"colour {yes(colour)}, shape {yes(shape)}, so {yes(colour and shape)}")
        assert "video" not in record
        letters.add(letter)
    assert letters == set("ABCD")


def test_option_matching_grid_drills_are_near_misses():
    """`grid` drills list two colours x two shapes; grid 0 leaves the drills exactly as before."""
    assert option_matching_records(40, seed=3, grid=0.0) == option_matching_records(40, seed=3)
    records = option_matching_records(200, seed=3, grid=0.5)
    grids = 0
    for record in records:
        question, answer = (t["value"] for t in record["conversations"])
        options = [line.split(") ", 1)[1] for line in question.split("\n")[1:5]]
        named, *verdicts, last = answer.split("\n")
        letter = last.removeprefix("Answer: ")
        assert options["ABCD".index(letter)] == named and len(set(options)) == 4
        colours, shapes = ({o.split()[i] for o in options} for i in (0, 1))
        grids += len(colours) == 2 and len(shapes) == 2
    assert 70 <= grids <= 130, grids
    with pytest.raises(InputError, match="grid must be in"):
        option_matching_records(4, seed=3, grid=1.5)


def test_clip_start_moves_the_times_only(tmp_path):
    """`clip_start_max`: the same videos and questions, the "when" answers moved by each video's clip_start
    (what its time text will say in training and in evaluation, which tells each clip its start)."""
    from types import SimpleNamespace

    from videoxl2.eval.synthetic import load

    plain = json.loads(make_dataset(tmp_path / "a", 6, 3, (8, 32), multi_turn=True).read_text())
    clips = json.loads(
        make_dataset(tmp_path / "b", 6, 3, (8, 32), multi_turn=True, clip_start_max=600).read_text()
    )
    assert all(
        (tmp_path / "a" / r["video"]).read_bytes() == (tmp_path / "b" / r["video"]).read_bytes()
        for r in plain
    )
    starts = [record.get("clip_start", 0.0) for record in clips]
    assert len(set(starts)) > 1 and all(1 <= s <= 600 and s == int(s) for s in starts), starts
    moved = 0
    for before, after, start in zip(plain, clips, starts):
        for old, new in zip(before["conversations"], after["conversations"]):
            if (
                old["from"] == "gpt"
                and old["value"].endswith("s")
                and old["value"][:-1].replace(".", "").isdigit()
            ):
                assert float(new["value"][:-1]) == float(old["value"][:-1]) + start, (old, new, start)
                moved += 1
            else:
                assert new == old
    assert moved >= 6

    test = make_dataset(tmp_path / "c", 2, 3, (8, 16), split="test", clip_start_max=600)
    written = json.loads(test.read_text())
    samples = load(test.parent, SimpleNamespace(annotations=None))
    assert [s.clip_start for s in samples] == [r.get("clip_start", 0.0) for r in written]
    assert any(s.clip_start for s in samples)
    with pytest.raises(InputError, match="--clip-start-max must be whole seconds >= 0"):
        make_dataset(tmp_path / "d", 1, clip_start_max=-1)
    with pytest.raises(InputError, match=r"--clip-start-share must be a share in \[0, 1\], got 1.5"):
        make_dataset(tmp_path / "d", 1, clip_start_max=600, clip_start_share=1.5)


def test_clip_start_share_keeps_the_others_at_zero(tmp_path):
    """`clip_start_share`: that share of videos moved, each with the start it has at share 1, the others at
    0 and identical to a dataset without clips."""
    kwargs = dict(num_videos=24, seed=5, frames_range=(4, 4), clip_start_max=3600)
    every = json.loads(make_dataset(tmp_path / "all", **kwargs).read_text())
    part = json.loads(make_dataset(tmp_path / "part", clip_start_share=0.5, **kwargs).read_text())
    none = json.loads(make_dataset(tmp_path / "none", clip_start_share=0.0, **kwargs).read_text())
    plain = json.loads(make_dataset(tmp_path / "plain", 24, 5, (4, 4)).read_text())
    assert none == plain
    moved = {r["video"] for r in part if "clip_start" in r}
    assert 6 <= len(moved) <= 18, len(moved)
    for record, at_one, at_zero in zip(part, every, plain, strict=True):
        assert record == (at_one if "clip_start" in record else at_zero)
