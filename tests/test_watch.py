"""`videoxl2 watch`: a live MPEG-TS stream on standard input or in a growing file, questions every few
seconds of stream time, a final answer when the stream ends, is dropped or is interrupted, and one-line
errors for sources that cannot be streams."""

from __future__ import annotations

import io
import json
import os
import pty
import shutil
import signal
import subprocess
import sys
import threading
import time
from fractions import Fraction

import av
import numpy as np
import pytest

from videoxl2.cli import main

FPS = 10  # frames written per stream second; watch samples them at --fps
QUESTION = "What colour?"
FIELDS = {"question", "answer", "trigger", "seconds_seen", "frames_seen", "lag_s", "units", "answer_s"}


def ts_bytes(seconds: float, fps: int = FPS) -> bytes:
    """An MPEG-TS stream whose frames show colours cycling once per second (32x32)."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mpegts") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for index in range(int(seconds * fps)):
            level = (index // fps * 40) % 256
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), level, np.uint8), format="rgb24")
            frame.pts, frame.time_base = index, Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


# A producer process: writes the TS file argv[1] to stdout in real time (argv[2] seconds of stream, a chunk
# every 0.1 s), and the stream seconds written so far to stderr, one line per second.
PRODUCER = """
import sys, time
data = open(sys.argv[1], "rb").read()
chunks = int(float(sys.argv[2]) * 10); size = len(data) // chunks + 1
start = time.monotonic()
for i in range(chunks):
    sys.stdout.buffer.write(data[i * size : (i + 1) * size]); sys.stdout.buffer.flush()
    if (i + 1) % 10 == 0:
        print((i + 1) // 10, file=sys.stderr, flush=True)
    time.sleep(max(0.0, start + (i + 1) * 0.1 - time.monotonic()))
"""


def records(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def watch_exe() -> list[str]:
    exe = shutil.which("videoxl2")
    return [exe] if exe else [sys.executable, "-m", "videoxl2.cli"]


def check_record(record: dict) -> None:
    assert FIELDS <= set(record), record
    assert isinstance(record["answer"], str)
    assert record["answer_s"] > 0 and record["frames_seen"] >= 1
    for unit in record["units"]:
        assert {"index", "start_seconds", "end_seconds"} <= set(unit)
        assert 0 <= unit["start_seconds"] <= unit["end_seconds"]


def test_watch_stdin_every_and_final(tiny_checkpoint, monkeypatch, capsys):
    """In-process: a thread writes 6 s of stream into a pipe at 3x real time; --every 1 answers arrive while
    it runs, their seconds_seen increase, and the final answer has seen every sampled frame."""
    data = ts_bytes(6.0)
    read_fd, write_fd = os.pipe()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(os.fdopen(read_fd, "rb")))

    def produce():
        with os.fdopen(write_fd, "wb") as pipe:
            size = len(data) // 40 + 1
            for start in range(0, len(data), size):
                pipe.write(data[start : start + size])
                pipe.flush()
                time.sleep(0.05)

    producer = threading.Thread(target=produce)
    producer.start()
    argv = ["watch", "-", "--model", str(tiny_checkpoint), "--json", "--fps", "2", "--question", QUESTION]
    code = main([*argv, "--every", "1", "--max-new-tokens", "2"])
    producer.join()
    out = capsys.readouterr()
    assert code == 0, out.err
    answers = records(out.out)
    for record in answers:
        check_record(record)
    every = [r for r in answers if r["trigger"] == "every"]
    assert len(every) >= 2, answers
    seen = [r["seconds_seen"] for r in every]
    assert seen == sorted(seen) and seen[0] < seen[-1], seen
    assert all(r["seconds_seen"] < 5.5 for r in every[:1])  # asked while the stream was still coming
    final = answers[-1]
    assert final["trigger"] == "final" and [r["trigger"] for r in answers].count("final") == 1
    # 6 s sampled at 2 fps: ticks 0, 0.5, ..., 5.5
    assert final["frames_seen"] == 12 and final["seconds_seen"] == pytest.approx(5.5)
    assert final["ingest"]["state"] == "ended" and final["units"]


def test_a_killed_producer_ends_cleanly_with_an_answer(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """`producer | videoxl2 watch -`: the producer process is killed mid-stream (SIGKILL, mid-packet); watch
    still answers from what it saw, saves that memory and exits 0; the memory reopens with the same answer."""
    stream = tmp_path / "stream.ts"
    stream.write_bytes(ts_bytes(30.0))
    read_fd, write_fd = os.pipe()
    command = [sys.executable, "-c", PRODUCER, str(stream), "30"]
    producer = subprocess.Popen(command, stdout=write_fd, stderr=subprocess.PIPE, text=True)
    os.close(write_fd)  # the producer holds the only writing end: its death is the end of the stream
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(os.fdopen(read_fd, "rb")))

    def kill_after_3_seconds():  # of stream written, while watch reads it
        while int(producer.stderr.readline() or 30) < 3:
            pass
        producer.send_signal(signal.SIGKILL)

    killer = threading.Thread(target=kill_after_3_seconds)
    killer.start()
    memory = tmp_path / "seen.safetensors"
    argv = ["watch", "-", "--model", str(tiny_checkpoint), "--json", "--fps", "2", "--question", QUESTION]
    code = main([*argv, "--max-new-tokens", "2", "--save-memory", str(memory)])
    killer.join()
    assert producer.wait() == -signal.SIGKILL
    producer.stderr.close()
    out = capsys.readouterr()
    assert code == 0, out.err
    answers = records(out.out)
    assert [r["trigger"] for r in answers] == ["final"]
    final = answers[0]
    check_record(final)
    assert 4 <= final["frames_seen"] < 30, final  # 3 to 4 s of the 30 at 2 fps
    assert final["ingest"]["ended"] == "end of stream" or final["ingest"]["ended"].startswith("source error")
    assert "saved to" in out.err
    # the saved memory is what the final answer read: reopened, it gives the same answer
    from videoxl2 import load_model, load_tokenizer
    from videoxl2.engine.session import VideoSession

    reopened = VideoSession.from_memory(load_model(tiny_checkpoint), load_tokenizer(tiny_checkpoint), memory)
    again = reopened.ask(QUESTION, generation_config={"max_new_tokens": 2})
    assert again.text == final["answer"]
    assert reopened.stats["memory_origin"] == "recorded"  # the model, the settings, the frame times
    assert len(reopened.timestamps) == final["frames_seen"]
    chat = ["chat", str(memory), QUESTION, "--model", str(tiny_checkpoint), "--max-new-tokens", "2"]
    assert main(chat) == 0
    assert capsys.readouterr().out.strip() == final["answer"].strip()


def test_typed_questions_and_ctrl_c(tiny_checkpoint, tmp_path):
    """A followed file still being written, a terminal on standard input: a line typed there is answered;
    Ctrl-C (SIGINT) then ends the watch with exit 0 and a final answer from what was seen."""
    path = tmp_path / "growing.ts"
    path.write_bytes(b"")
    data = ts_bytes(40.0)
    stop = threading.Event()

    def writer():  # real time: 0.1 s of stream every 0.1 s
        size = len(data) // 400 + 1
        for start in range(0, len(data), size):
            if stop.is_set():
                return
            with open(path, "ab") as handle:
                handle.write(data[start : start + size])
            time.sleep(0.1)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    command = [*watch_exe(), "watch", str(path), "--model", str(tiny_checkpoint), "--json", "--fps", "2"]
    command += ["--question", QUESTION, "--every", "1", "--max-new-tokens", "2"]
    terminal, tty = pty.openpty()
    watcher = subprocess.Popen(command, stdin=tty, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    os.close(tty)
    try:
        first = json.loads(watcher.stdout.readline())
        assert first["trigger"] == "every", first
        os.write(terminal, b"What shape?\n")
        answers = [first]
        while answers[-1]["trigger"] != "typed":
            answers.append(json.loads(watcher.stdout.readline()))
        watcher.send_signal(signal.SIGINT)
        out, err = watcher.communicate(timeout=60)
    finally:
        stop.set()
        os.close(terminal)
        if watcher.poll() is None:
            watcher.kill()
    assert watcher.returncode == 0, err[-2000:]
    answers += records(out)
    typed = next(a for a in answers if a["trigger"] == "typed")
    assert typed["question"] == "What shape?" and typed["frames_seen"] >= first["frames_seen"]
    final = answers[-1]
    assert final["trigger"] == "final" and final["question"] == QUESTION and final["frames_seen"] < 80
    assert final["seconds_seen"] >= typed["seconds_seen"]
    assert "type a question" in err and "stopped; answering from what was seen" in err


def test_bounded_memory_spills_and_answers(tiny_checkpoint, tmp_path, capsys):
    """--dense-horizon (bilevel by default then): old units go to disk while the stream is read, the final
    answer reads the ones it selects back, and the spill folder is gone at the end."""
    path = tmp_path / "stream.ts"
    path.write_bytes(ts_bytes(20.0))
    spill = tmp_path / "spill"
    spill.mkdir()
    argv = [
        "watch",
        str(path),
        "--model",
        str(tiny_checkpoint),
        "--json",
        "--fps",
        "2",
        "--follow-idle",
        "0.2",
    ]
    argv += ["--question", QUESTION, "--max-new-tokens", "2", "--block-size", "2", "--prev-blocks", "1"]
    argv += ["--unit-size", "2", "--topk", "1", "--dense-horizon", "4", "--spill-dir", str(spill)]
    argv += ["--save-memory", str(tmp_path / "m.safetensors")]
    assert main(argv) == 0, capsys.readouterr().err
    (final,) = records(capsys.readouterr().out)
    check_record(final)
    # 20 s at 2 fps: 40 frames, 10 groups of 2 s, 5 units of 4 s; a 4 s horizon spills the oldest ones
    assert final["frames_seen"] == 40 and final["spilled_units"] >= 2, final
    dense = [u["index"] for u in final["units"]]
    assert 0 in dense and 4 in dense  # the first and last units are always read dense
    assert set(final["reloaded_units"]) == {u for u in dense if u < final["spilled_units"]}
    assert list(spill.iterdir()) == []  # the session's own spill folder went with it
    assert (tmp_path / "m.safetensors").stat().st_size > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["{tmp}/nope.ts"], "nope.ts: no such file"),
        (["ftp://example.com/live"], "unsupported URL scheme 'ftp'"),
        (["-", "--every", "5"], "--every needs --question"),
        (["-", "--question", "q", "--every", "0"], "--every must be > 0"),
        (["-", "--fps", "0"], "--fps must be > 0"),
        (["-", "--max-memory", "lots"], "--max-memory 'lots'"),
        (["-", "--save-memory", "{tmp}/no/such/dir/m.safetensors"], "its folder does not exist"),
    ],
)
def test_bad_arguments_are_one_line_errors(tiny_checkpoint, tmp_path, capsys, args, message):
    code = main(["watch", *[a.format(tmp=tmp_path) for a in args], "--model", str(tiny_checkpoint)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.strip().count("\n") == 0 and err.startswith("videoxl2: error: ") and message in err, err


def test_a_file_that_is_not_a_video_is_one_line(tiny_checkpoint, tmp_path, capsys):
    text = tmp_path / "notes.ts"
    text.write_text("not a video at all\n" * 50)
    code = main(["watch", str(text), "--model", str(tiny_checkpoint), "--follow-idle", "0.2"])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err
    assert last.startswith("videoxl2: error: ") and "notes.ts" in last, err
