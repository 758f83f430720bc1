"""The `videoxl2` command: answers, JSON output, and one-line errors with a non-zero exit."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from videoxl2.cli import main


def test_chat_json(tiny_checkpoint, synthetic_video, capsys):
    code = main(
        [
            "chat",
            str(synthetic_video),
            "What colour?",
            "--model",
            str(tiny_checkpoint),
            "--max-frames",
            "8",
            "--fps",
            "4",
            "--max-new-tokens",
            "4",
            "--json",
            "--mode",
            "bilevel",
            "--unit-size",
            "1",
            "--topk",
            "0",
        ]
    )
    assert code == 0
    record = json.loads(capsys.readouterr().out)
    assert record["frames"] == 8 and len(record["timestamps"]) == 8
    assert record["timestamps"] == sorted(record["timestamps"])
    stats = record["stats"]
    assert stats["mode"] == "bilevel" and stats["load_s"] > 0 and stats["new_tokens"] <= 4
    assert sum(u["dense"] for u in stats["units"]) == 2


def test_chat_plain_text(tiny_checkpoint, synthetic_video, capsys):
    assert (
        main(
            [
                "chat",
                str(synthetic_video),
                "Hi?",
                "--model",
                str(tiny_checkpoint),
                "--max-frames",
                "4",
                "--max-new-tokens",
                "3",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.endswith("\n")


@pytest.mark.parametrize(
    "args, message",
    [
        (["chat", "{tmp}/none.mp4", "q", "--model", "{ckpt}"], "none.mp4: no such file"),
        (["chat", "{text}", "q", "--model", "{ckpt}"], "not a video file"),
        (["chat", "{video}", " ", "--model", "{ckpt}"], "question is empty"),
        (["chat", "{video}", "q", "--model", "{tmp}"], "no config.json"),
        (["chat", "{video}", "q", "--model", "{ckpt}", "--max-frames", "0"], "max_num_frames"),
        (["chat", "{video}", "q", "--model", "{ckpt}", "--fps", "-1"], "fps"),
    ],
)
def test_errors_are_one_line(tmp_path, tiny_checkpoint, synthetic_video, capsys, args, message):
    text = tmp_path / "text.mp4"
    text.write_text("hello")
    values = dict(tmp=tmp_path, ckpt=tiny_checkpoint, text=text, video=synthetic_video)
    code = main([a.format(**values) for a in args])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # earlier lines can only be progress bars
    assert code == 2 and "Traceback" not in err
    assert last.startswith("videoxl2: error: ") and message in last, err


def test_console_script_end_to_end(tmp_path):
    """The installed entry point: make a tiny model and a clip, ask, read the JSON."""
    exe = shutil.which("videoxl2") or pytest.skip("console script not installed")
    model, clip = tmp_path / "tiny", tmp_path / "clip.mp4"
    subprocess.run([exe, "init-tiny", str(model)], check=True, capture_output=True)
    subprocess.run([exe, "synth-video", str(clip), "--frames", "12"], check=True, capture_output=True)
    out = subprocess.run(
        [
            exe,
            "chat",
            str(clip),
            "What?",
            "--model",
            str(model),
            "--json",
            "--fps",
            "4",
            "--max-new-tokens",
            "2",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    assert json.loads(out.stdout)["frames"] == 12
    bad = subprocess.run(
        [exe, "chat", str(tmp_path / "x.mp4"), "q", "--model", str(model)], capture_output=True, text=True
    )
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "x.mp4: no such file" in bad.stderr
    assert sys.executable  # the same interpreter family runs the script


def test_external_units(tiny_checkpoint, synthetic_video, tmp_path, capsys):
    base = ["chat", str(synthetic_video), "What colour?", "--model", str(tiny_checkpoint), "--fps", "4"]
    base += ["--max-new-tokens", "2", "--json", "--unit-size", "1"]
    assert main([*base, "--mode", "bilevel", "--units", "2"]) == 0
    units = json.loads(capsys.readouterr().out)["stats"]["units"]
    assert [u["index"] for u in units if u["dense"]] == [0, 2, len(units) - 1]
    assert all(u["score"] is None for u in units)  # not scored: the selection came from outside
    selection = tmp_path / "selected.json"
    selection.write_text(
        json.dumps({"cat": {"config": {}, "selected_unit_indices": {"clip.mp4_What colour?": [1]}}})
    )
    assert main([*base, "--mode", "bilevel", "--selection-file", str(selection)]) == 0
    units = json.loads(capsys.readouterr().out)["stats"]["units"]
    dense = [u["index"] for u in units if u["dense"]]
    assert dense == [0, 2, 3, len(units) - 1]  # the file's 8-frame unit 1 is our groups 2 and 3
    assert main([*base, "--units", "2"]) == 2
    assert "need --mode bilevel" in capsys.readouterr().err
    assert main([*base, "--mode", "bilevel", "--units", "x"]) == 2
    assert "comma-separated integers" in capsys.readouterr().err
