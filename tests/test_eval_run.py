"""`videoxl2 eval` end to end: for every benchmark a tiny dataset in its published layout (synthetic
videos), the full command with a tiny model, then resume and a 2-process run against a 1-process one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from videoxl2.cli import main

FAST = ["--max-frames", "8", "--max-new-tokens", "3", "--no-progress"]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Three short videos (different lengths and rates) that datasets link under their own names."""
    from videoxl2.video.synthetic import write_synthetic_video

    folder = tmp_path_factory.mktemp("clips")
    return [
        write_synthetic_video(folder / f"clip{i}.mp4", num_frames=n, fps=fps, size=(32, 32), seed=i)
        for i, (n, fps) in enumerate([(12, 4.0), (16, 8.0), (10, 2.0)])
    ]


def place(clip: Path, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(clip, path)


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


# -- tiny datasets in each benchmark's published layout ------------------------------------------------------
def videomme_data(root: Path, clips) -> Path:
    rows = []
    for v, (video_id, duration) in enumerate([("vid001", "short"), ("vid002", "long")]):
        place(clips[v], root / "data" / f"{video_id}.mp4")
        for q in range(2):
            rows.append(
                dict(
                    video_id=f"{v + 1:03d}", duration=duration, domain="Knowledge", sub_category="Astronomy",
                    url="https://example.invalid", videoID=video_id, question_id=f"{v + 1:03d}-{q + 1}",
                    task_type="Counting Problem", question=f"How many squares in part {q}?",
                    options=["A. One.", "B. Two.", "C. Three.", "D. Four."], answer="ABCD"[q + v],
                )
            )  # fmt: skip
    (root / "subtitle").mkdir()
    (root / "subtitle" / "vid001.srt").write_text(
        '1\n00:00:00,000 --> 00:00:01,500\n<font color="white" size=".72c">hello there</font>\n\n'
        '2\n00:00:01,500 --> 00:00:03,000\n<font color="white" size=".72c">general kenobi</font>\n'
    )
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq

        (root / "videomme").mkdir()
        pq.write_table(pa.Table.from_pylist(rows), root / "videomme" / "test-00000-of-00001.parquet")
    except ImportError:  # the loader reads the same fields from JSON
        write_json(root / "videomme" / "test.json", rows)
    return root


def mlvu_data(root: Path, clips) -> Path:
    for n, (task, qtype) in enumerate([("1_plotQA", "plotQA"), ("2_needle", "findNeedle")]):
        records = []
        for q in range(2):
            name = f"{task}_{q}.mp4"
            place(clips[(n + q) % 3], root / "MLVU" / "video" / task / name)
            candidates = ["red", "green", "blue", "white"]
            records.append(
                dict(video=name, duration=4, question=f"What colour is shown ({q})?", candidates=candidates,
                     answer=candidates[q + n], question_type=qtype)
            )  # fmt: skip
        write_json(root / "MLVU" / "json" / f"{task}.json", records)
    write_json(root / "MLVU" / "json" / "9_summary.json", [dict(video="x.mp4", question="Sum?", answer="s")])
    return root / "MLVU"


def longvideobench_data(root: Path, clips) -> Path:
    records = []
    for i in range(3):
        place(clips[i], root / "videos" / f"lvb{i}.mp4")
        records.append(
            dict(id=f"lvb-{i}", video_id=f"lvb{i}", video_path=f"lvb{i}.mp4", question=f"Which event ({i})?",
                 candidates=["a cat", "a dog", "a bird"][: 2 + i % 2], correct_choice=i % 2,
                 duration_group=[15, 60, 600][i], question_category="E2O", duration=4.0)
        )  # fmt: skip
    write_json(root / "lvb_val.json", records)
    return root


OPTIONS = "(A) Running\n(B) Jumping\n(C) Eating\n(D) Nothing"


def lvbench_data(root: Path, clips) -> Path:
    lines = []
    for v, kind in enumerate(["cartoon", "sport"]):
        key = f"key{v}"
        place(clips[v], root / "videos" / f"{key}.mp4")
        qa = [
            dict(uid=f"{v}{q}", question=f"What happens at {q}:05?\n{OPTIONS}",
                 answer="ABCD"[q + v], question_type=["key information retrieval", "reasoning"][: q + 1],
                 time_reference="00:01-00:03")
            for q in range(2)
        ]  # fmt: skip
        lines.append(json.dumps(dict(key=key, type=kind, qa=qa, video_info={"duration_minutes": 1})))
    (root / "video_info.meta.jsonl").write_text("\n".join(lines) + "\n")
    return root


def charades_data(root: Path, clips) -> Path:
    lines = []
    for i, vid in enumerate(["AO8RW", "Y6R7T"]):
        place(clips[i], root / "Charades_v1_480" / f"{vid}.mp4")
        lines += [f"{vid} 0.0 1.5##person opens a door.", f"{vid} 1.0 3.2##person turns on the light."]
    (root / "charades_sta_test.txt").write_text("\n".join(lines) + "\n")
    return root


def synthetic_data(root: Path, clips) -> Path:
    records = []
    for i in range(4):
        place(clips[i % 3], root / "videos" / f"needle{i}.mp4")
        records.append(
            dict(id=f"s{i}", video=f"videos/needle{i}.mp4", family=["colour", "count"][i % 2],
                 conversations=[{"from": "human", "value": f"<image>\nWhat is item {i}?"},
                                {"from": "gpt", "value": ["Red.", "3"][i % 2]}])
        )  # fmt: skip
    write_json(root / "synthetic.json", records)
    return root


BUILDERS = {
    "videomme": videomme_data,
    "mlvu": mlvu_data,
    "longvideobench": longvideobench_data,
    "lvbench": lvbench_data,
    "charades_sta": charades_data,
    "synthetic": synthetic_data,
}
QUESTIONS = {"videomme": 4, "mlvu": 4, "longvideobench": 3, "lvbench": 4, "charades_sta": 4, "synthetic": 4}


RECORD_FIELDS = (
    "id", "question", "answer", "prediction", "extracted", "correct", "frames", "timings", "stats",
)  # fmt: skip


def run_cli(bench, root, out, model, *extra) -> int:
    args = ["eval", bench, "--data-root", str(root), "--out", str(out), "--model", str(model), *FAST, *extra]
    return main(args)


def comparable(results: dict) -> dict:
    """Results without what legitimately differs between runs (timings, process count, clock)."""
    return {k: v for k, v in results.items() if k not in ("timings", "run")}


# -- every benchmark end to end ------------------------------------------------------------------------------
@pytest.mark.parametrize("bench", sorted(BUILDERS))
def test_benchmark_end_to_end(bench, tmp_path, clips, tiny_checkpoint, capsys):
    root = BUILDERS[bench](tmp_path / "data", clips)
    extra = {
        "videomme": ["--subtitles", "--protocol", "lmms-eval"],
        "synthetic": ["--mode", "bilevel", "--unit-size", "1", "--topk", "0"],
    }.get(bench, [])
    assert run_cli(bench, root, tmp_path / "out", tiny_checkpoint, *extra) == 0
    assert "results.json" in capsys.readouterr().out
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    records = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert results["questions"] == results["answered"] == len(records) == QUESTIONS[bench]
    assert results["errors"] == 0 and isinstance(results["metrics"]["score"], float)
    assert results["settings"]["max_frames"] == 8 and results["settings"]["max_new_tokens"] == 3
    for index, record in enumerate(records):
        assert record["index"] == index
        assert set(RECORD_FIELDS) <= set(record)
        assert 0 < record["frames"] <= 8 and record["stats"]["new_tokens"] <= 3
        assert "answer_s" in record["timings"]
        assert record["stats"]["mode"] == ("bilevel" if bench == "synthetic" else "dense")
    if bench == "synthetic":  # first and last units stay dense, topk 0 adds none
        assert all(r["stats"]["dense_units"] == sorted({0, -(-r["frames"] // 4) - 1}) for r in records)
        assert results["settings"]["engine"]["mode"] == "bilevel"
    # one pre-fill per video: later questions about it reuse the memory
    assert [r["video_reused"] for r in records].count(False) == len({r["video"] for r in records})
    if bench == "videomme":
        assert records[0]["question"].startswith("This video's subtitles are listed below: \nhello there\n")
        assert records[2]["question"].startswith("This video's subtitles are listed below: \nNo subtitles")
        assert records[0]["question"].endswith("D. Four.\nThe best answer is:")
    if bench == "charades_sta":
        assert set(results["metrics"]) >= {"mIoU", "R@0.3", "R@0.5", "R@0.7"}


def test_synthetic_clip_start_tells_the_clip_its_source_times(tmp_path, clips, tiny_checkpoint):
    """A record's `clip_start` starts the video's time text there: the answer equals a session given the
    moved timestamps directly, and the same video at another start is pre-filled again, not reused."""
    from types import SimpleNamespace

    import numpy as np
    import torch

    from videoxl2 import load_model, load_tokenizer
    from videoxl2.engine.session import VideoSession
    from videoxl2.errors import InputError
    from videoxl2.eval.synthetic import load
    from videoxl2.video import read_video

    place(clips[0], tmp_path / "data" / "videos" / "clip.mp4")
    ask = [
        {"from": "human", "value": "<image>\nWhen did the red circle appear?"},
        {"from": "gpt", "value": "0.0s"},
    ]
    starts = [0, 3000, 3000, 0.5]
    records = [
        dict(id=f"c{i}", video="videos/clip.mp4", clip_start=s, conversations=ask)
        for i, s in enumerate(starts)
    ]
    write_json(tmp_path / "data" / "synthetic.json", records)
    assert run_cli("synthetic", tmp_path / "data", tmp_path / "out", tiny_checkpoint) == 0
    got = {r["id"]: r for r in map(json.loads, (tmp_path / "out" / "samples.jsonl").read_text().splitlines())}
    assert [got[f"c{i}"]["video_reused"] for i in range(4)] == [False, False, True, False]

    model, tokenizer = load_model(tiny_checkpoint), load_tokenizer(tiny_checkpoint)
    plan, batches = read_video(clips[0], max_num_frames=8, sample_fps=1.0, max_sample_fps=4.0)
    frames = np.concatenate(list(batches))
    for i, start in enumerate(starts):
        moved = [t + start for t in plan.timestamps]
        session = VideoSession.from_frames(model, tokenizer, frames, moved, progress=False)
        with torch.inference_mode():
            answer = session.ask("When did the red circle appear?", generation_config={"max_new_tokens": 3})
        record = got[f"c{i}"]
        assert record["stats"]["video_tokens"] == session.layout.length, (start, record["stats"])
        assert record["prediction"] == answer.text, (start, record["prediction"], answer.text)
    assert got["c1"]["stats"]["video_tokens"] > got["c0"]["stats"]["video_tokens"]  # "3000.0" is longer text

    write_json(
        tmp_path / "bad" / "synthetic.json",
        [{**records[0], "clip_start": -4}, {**records[1], "clip_start": "1"}],
    )
    with pytest.raises(
        InputError,
        match=r"(?s)2 unusable records:.*record 0: 'clip_start' must be a finite .* >= 0, got -4.*'1'",
    ):
        load(tmp_path / "bad", SimpleNamespace(annotations=None))


def test_resume_continues_and_matches_a_fresh_run(tmp_path, clips, tiny_checkpoint):
    root = synthetic_data(tmp_path / "data", clips)
    out = tmp_path / "out"
    assert run_cli("synthetic", root, out, tiny_checkpoint, "--limit", "2") == 0
    assert run_cli("synthetic", root, out, tiny_checkpoint) == 2  # earlier answers: needs --resume
    assert run_cli("synthetic", root, out, tiny_checkpoint, "--resume", "--fps", "2") == 2  # changed settings
    with open(out / "shards" / "rank0.jsonl", "a") as shard:
        shard.write('{"id": "s2", "cut sh')  # a crash in the middle of a line
    assert run_cli("synthetic", root, out, tiny_checkpoint, "--resume") == 0
    lines = (out / "shards" / "rank0.jsonl").read_text().splitlines()
    answered = [json.loads(line)["id"] for line in lines if line.endswith("}")]
    assert sorted(answered) == ["s0", "s1", "s2", "s3"]  # nothing asked twice
    resumed = json.loads((out / "results.json").read_text())
    assert run_cli("synthetic", root, tmp_path / "fresh", tiny_checkpoint) == 0
    fresh = json.loads((tmp_path / "fresh" / "results.json").read_text())
    assert comparable(resumed) == comparable(fresh)


def test_two_processes_give_the_same_results(tmp_path, clips, tiny_checkpoint):
    root = lvbench_data(tmp_path / "data", clips)
    assert run_cli("lvbench", root, tmp_path / "one", tiny_checkpoint) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "videoxl2.cli", "eval", "lvbench", "--data-root", str(root), "--out", str(tmp_path / "two"),
        "--model", str(tiny_checkpoint), *FAST,
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("results.json") == 1  # only the first process reports
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["run"]["world_size"] == 2 and comparable(one) == comparable(two)
    shards = sorted(p.name for p in (tmp_path / "two" / "shards").glob("*.jsonl"))
    assert shards == ["rank0.jsonl", "rank1.jsonl"]  # both did work (one video each)

    def answers(folder):
        lines = (tmp_path / folder / "samples.jsonl").read_text().splitlines()
        return [(r["id"], r["prediction"], r["extracted"]) for r in map(json.loads, lines)]

    assert answers("one") == answers("two")


# -- prompts and alternative layouts (loaders only) ---------------------------------------------------------
def first_prompt(bench, root, protocol=None, **options):
    from videoxl2.eval.benchmarks import BENCHMARKS, Options

    benchmark = BENCHMARKS[bench]
    resolved = benchmark.resolve(Options(protocol, **options))
    sample = benchmark.load(root, resolved)[0]
    return benchmark.question(sample, resolved), sample


def test_prompts_follow_each_protocol(tmp_path, clips):
    instruction = (
        "Select the best answer to the following multiple-choice question based on the video and the "
        "subtitles. Respond with only the letter (A, B, C, or D) of the correct option.\n"
    )
    root = videomme_data(tmp_path / "vmme", clips)
    options = ["A. One.", "B. Two.", "C. Three.", "D. Four."]
    post = "\nAnswer with the option's letter from the given choices directly."
    release, sample = first_prompt("videomme", root)
    assert release == f"{instruction}How many squares in part 0?\n{options!r}\n{post}"
    assert sample.categories["duration"] == "short" and sample.answer == "A"
    lmms, _ = first_prompt("videomme", root, "lmms-eval")
    assert lmms == instruction + "How many squares in part 0?\n" + "\n".join(options) + "\n" + post
    long, _ = first_prompt("videomme", root, subset="long")
    assert long.startswith(instruction + "How many squares in part 0?")
    assert first_prompt("videomme", root, subset="long")[1].id == "002-1"

    root = mlvu_data(tmp_path / "mlvu", clips)
    question = "What colour is shown (0)?\n(A) red\n(B) green\n(C) blue\n(D) white"
    release, sample = first_prompt("mlvu", root)
    assert release == f"\n{question}\nOnly give the best option.\n\nBest option: ("
    assert (sample.answer, sample.categories) == ("A", {"task_type": "plotQA"})
    assert (
        first_prompt("mlvu", root, "lmms-eval")[0]
        == f"{question}\nOnly give the best option.\nBest option: ("
    )

    root = longvideobench_data(tmp_path / "lvb", clips)
    prompt, sample = first_prompt("longvideobench", root)
    post = "Answer with the option's letter from the given choices directly.\n"
    assert prompt == f"Which event (0)?\nA. a cat\nB. a dog\n{post}"
    assert sample.choices == ("A", "B") and sample.answer == "A"

    root = lvbench_data(tmp_path / "lvbench", clips)
    release, sample = first_prompt("lvbench", root)
    assert release == (
        "What happens at 0:05?\nA. (A) Running\nB. (B) Jumping\nC. (C) Eating\nD. (D) Nothing\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert sample.categories == {"question_type": ["key information retrieval"], "video_type": "cartoon"}
    lmms, _ = first_prompt("lvbench", root, "lmms-eval")
    assert lmms == f"What happens at 0:05?\n{OPTIONS}\nAnswer the question with the option letter"

    root = charades_data(tmp_path / "sta", clips)
    prompt, sample = first_prompt("charades_sta", root)
    assert prompt.endswith(
        "textual sentence: person opens a door.. Please return its start time and end time."
    )
    assert sample.answer == [0.0, 1.5]


def test_alternative_published_layouts(tmp_path, clips):
    """lmms-eval's copies: MLVU rows with video_name and a letter answer, LongVideoBench with option0..4,
    Charades-STA with video/caption/timestamp."""
    root = tmp_path / "mlvu"
    place(clips[0], root / "needle_1.mp4")
    rows = [dict(video_name="needle_1.mp4", question="Q?\n(A) x\n(B) y", answer="B", task_type="needle")]
    write_json(root / "mlvu" / "test.json", rows)
    prompt, sample = first_prompt("mlvu", root, "lmms-eval")
    assert prompt == "Q?\n(A) x\n(B) y\nOnly give the best option.\nBest option: (" and sample.answer == "B"

    root = tmp_path / "lvb"
    place(clips[0], root / "videos" / "v.mp4")
    row = dict(id="1", video_path="v.mp4", question="Q?", correct_choice=1, option0="x", option1="y")
    row.update({f"option{i}": "N/A" for i in (2, 3, 4)}, duration_group=15, question_category="S2E")
    write_json(root / "validation.json", [row])
    prompt, sample = first_prompt("longvideobench", root, annotations=root / "validation.json")
    assert prompt.startswith("Q?\nA. x\nB. y\nAnswer") and sample.choices == ("A", "B")

    root = tmp_path / "sta"
    place(clips[0], root / "Charades_v1_480" / "AB12C.mp4")
    write_json(root / "test.json", [dict(video="AB12C.mp4", caption="a person sits", timestamp="[1.5, 3.0]")])
    assert first_prompt("charades_sta", root)[1].answer == [1.5, 3.0]


# -- errors --------------------------------------------------------------------------------------------------
def test_missing_videos_and_fields_are_listed(tmp_path, clips, tiny_checkpoint, capsys):
    root = longvideobench_data(tmp_path / "data", clips)
    (root / "videos" / "lvb1.mp4").unlink()
    (root / "videos" / "lvb2.mp4").unlink()
    assert run_cli("longvideobench", root, tmp_path / "out", tiny_checkpoint) == 2
    error = capsys.readouterr().err
    assert "2 videos not found" in error and "lvb1.mp4" in error and "lvb2.mp4" in error
    records = json.loads((root / "lvb_val.json").read_text())
    del records[0]["question"], records[2]["correct_choice"]
    (root / "lvb_val.json").write_text(json.dumps(records))
    assert run_cli("longvideobench", root, tmp_path / "out", tiny_checkpoint) == 2
    error = capsys.readouterr().err
    assert "record 0: missing question" in error and "record 2: missing correct_choice" in error
    assert run_cli("lvbench", tmp_path / "nowhere", tmp_path / "out", tiny_checkpoint) == 2
    assert "no such folder" in capsys.readouterr().err
    assert run_cli("lvbench", root, tmp_path / "out", tiny_checkpoint) == 2
    assert "video_info.meta.jsonl" in capsys.readouterr().err


def test_cli_defaults_to_the_demo_model_and_checks_options(tmp_path, clips, tiny_checkpoint, capsys):
    from videoxl2.defaults import DEFAULT_MODEL

    root = synthetic_data(tmp_path / "data", clips)
    code = main(
        ["eval", "synthetic", "--data-root", str(root), "--out", str(tmp_path / "default"), "--limit", "1"]
    )
    if (DEFAULT_MODEL / "config.json").is_file():
        assert code == 0
        settings = json.loads((tmp_path / "default" / "results.json").read_text())["settings"]
        assert settings["model"] == str(DEFAULT_MODEL)
    else:
        assert code == 2 and "no config.json" in capsys.readouterr().err
    capsys.readouterr()
    assert run_cli("synthetic", root, tmp_path / "out", tiny_checkpoint, "--subset", "long") == 2
    assert "videomme only" in capsys.readouterr().err
    assert run_cli("charades_sta", root, tmp_path / "out", tiny_checkpoint, "--protocol", "release") == 2
    assert "lmms-eval" in capsys.readouterr().err
    shutil.rmtree(root / "videos")
    assert run_cli("synthetic", root, tmp_path / "out", tiny_checkpoint) == 2
    assert "4 videos not found" in capsys.readouterr().err
