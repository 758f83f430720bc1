"""Live video: `videoxl2 watch -` fed through a pipe by a producer process, with the bundled demo model.

The stream is a V-NIAH haystack of the demo's kind (`videoxl2.data.synthetic`: drifting grey blobs, one
coloured shape shown for one 4-second group, placed in the first minute but after the first unit, which is
always kept dense) rendered at 64x64, written at 30 fps as MPEG-TS (mpeg4, a keyframe each second, each
packet flushed as soon as it is muxed). `watch` samples it at 1 fps (every 30th frame: the haystack holds
each picture for a second) and asks the demo's needle question, "What was the first shape shown in the
video?", every `--every` seconds of stream time and once at the end.

1. Real time (`--minutes`, default 3): the producer writes each frame at its wall-clock time. Reported: the
   ingest lag (arrival -> answerable: the engine's p50 / p95 over the stream), the latency of the `--every`
   answers asked while the stream runs, the watch process's RSS sampled every second (with the stream
   seconds seen then), exact mode and, with `--horizon`, bounded mode (`--dense-horizon`).
2. Long (`--long-minutes`, default 60, `--trials`): the same stream written as fast as the watcher takes it
   (no pacing: the pipe's back-pressure sets the pace, so stream time runs faster than real time and lag
   says nothing), asked once at the end: whether the needle's unit is among the units the answer read
   dense, whether the answer names the needle, RSS from the first horizon to the end (the trend: the median
   of 5 samples after the horizon against the last 5 before the end; and the peak); exact vs bounded.

3. `--sessions`: the long streams fed to a `LiveSession` in a process of its own, RSS and KV read after each
   16-frame append (between blocks): the memory the session holds, exact vs bounded.

All run in bi-level mode (selection is what bounded mode reloads by). Each case of 1 and 2 is one
`videoxl2 watch` process; this script only produces, watches RSS and reads the JSON lines.

    flock /tmp/cpu.lock python benchmarks/live.py --skip-long            # 3 min real time, exact + bounded
    python benchmarks/live.py --minutes 1 --skip-long --no-bounded       # a quick look
    flock /tmp/cpu.lock python benchmarks/live.py --skip-realtime --long-minutes 60 --trials 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from fractions import Fraction
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
WRITE_FPS = 30
NEEDLE_SECONDS = 60  # the needle starts within the first minute
STATUS = re.compile(r"([\d.]+) s seen, (\d+) frames, lag ([\d.]+ s|-), memory ([\d.]+) MiB")


# -- the producer (its own process: `live.py --produce SPEC`) ------------------------------------------------
def needle_spec(seconds: int, seed: int, trial: int):
    """A one-needle haystack of `seconds` at 1 fps, the needle in the first minute after unit 0."""
    from videoxl2.data.synthetic import GROUP, Needle, VideoSpec
    from videoxl2.demo.niah import trial_needle

    rng = np.random.default_rng([seed, trial, 7])
    needle = trial_needle(seed, trial)
    groups = max(1, min(NEEDLE_SECONDS, seconds) // GROUP)
    first = min(2, groups - 1)  # groups 0 and 1 make unit 0 (the demo's unit size is 2 groups)
    start = int(rng.integers(first, groups)) * GROUP
    return VideoSpec(int(seconds), 1.0, seed * 100_003 + trial, (Needle(needle.colour, needle.shape, start),))


class PipeOut:
    """PyAV's output: every write goes straight to file descriptor 1 (no Python buffering)."""

    def write(self, data) -> int:
        view = memoryview(data)
        while view:
            view = view[os.write(1, view) :]
        return len(data)

    def flush(self) -> None:
        pass


def produce(spec_json: str) -> int:
    import av

    from videoxl2.data.synthetic import Needle, VideoSpec, render_frame
    from videoxl2.video.synthetic import MPEG4_QSCALE_2

    values = json.loads(spec_json)
    spec = VideoSpec(
        values["seconds"], 1.0, values["seed"], (Needle(values["colour"], values["shape"], values["start"]),)
    )
    realtime = values["realtime"]
    try:
        with av.open(PipeOut(), "w", format="mpegts", options={"flush_packets": "1"}) as container:
            stream = container.add_stream("mpeg4", rate=WRITE_FPS)
            stream.height, stream.width = spec.size
            stream.pix_fmt = "yuv420p"
            stream.options = {**MPEG4_QSCALE_2, "g": str(WRITE_FPS)}
            start, picture, shown = time.monotonic(), None, -1
            print(f"start {start!r}", file=sys.stderr, flush=True)  # frame i is written at start + i / 30
            for index in range(spec.num_frames * WRITE_FPS):
                second = index // WRITE_FPS
                if second != shown:
                    picture, shown = render_frame(spec, second), second
                frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
                frame.pts, frame.time_base = index, Fraction(1, WRITE_FPS)
                if realtime:
                    time.sleep(max(0.0, start + index / WRITE_FPS - time.monotonic()))
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    except (BrokenPipeError, OSError):
        pass  # the watcher went away: nothing left to do
    return 0


# -- one watched stream --------------------------------------------------------------------------------
def spec_values(spec, **extra) -> dict:
    needle = spec.needles[0]
    values = dict(seconds=spec.num_frames, seed=spec.seed, colour=needle.colour, shape=needle.shape)
    return dict(values, start=needle.start_frame, **extra)


def run_session(spec_json: str) -> int:
    """`--session SPEC` (its own process): a `LiveSession` fed the stream's 1 fps pictures directly (no
    encoder, decoder or `watch`), RSS read after each 16-frame append, i.e. between blocks: the memory the
    session holds, without a block's working memory. One JSON line out."""
    import torch

    from videoxl2 import load_model, load_tokenizer
    from videoxl2.data.synthetic import Needle, VideoSpec, render_frame
    from videoxl2.demo.niah import QUESTION
    from videoxl2.engine.live import LiveSession
    from videoxl2.engine.settings import EngineSettings

    values = json.loads(spec_json)
    spec = VideoSpec(
        values["seconds"], 1.0, values["seed"], (Needle(values["colour"], values["shape"], values["start"]),)
    )
    model, tokenizer = load_model(values["model"]), load_tokenizer(values["model"])
    settings = EngineSettings.from_config(model.config, mode="bilevel")
    samples = []
    with (
        torch.inference_mode(),
        LiveSession(model, tokenizer, settings, progress=False, dense_horizon=values["horizon"]) as live,
    ):
        for start in range(0, spec.num_frames, 16):
            stamps = list(range(start, min(start + 16, spec.num_frames)))
            live.append(np.stack([render_frame(spec, i) for i in stamps]), [float(i) for i in stamps])
            samples.append(
                dict(
                    seconds_seen=live.seconds_seen,
                    rss_mib=round(proc_rss(os.getpid()) / 2**20, 1),
                    kv_mib=round(live.memory_bytes() / 2**20, 1),
                )
            )
        live.finish()
        answer = live.ask(QUESTION, generation_config={"max_new_tokens": 8})
    print(json.dumps(dict(samples=samples, answer=answer.text, spilled_units=answer.stats["spilled_units"])))
    return 0


def proc_rss(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def watch_command() -> list[str]:
    exe = shutil.which("videoxl2", path=str(Path(sys.executable).parent)) or shutil.which("videoxl2")
    return [exe] if exe else [sys.executable, "-m", "videoxl2.cli"]


class StderrLog:
    """`watch --progress` status lines as they arrive, each with the monotonic time it came (the clock is
    system-wide, so comparable with the producer's), and the text for error reports."""

    def __init__(self, pipe):
        self.lines: list[tuple[float, float, int, float | None, float]] = []  # (time, seen, frames, lag, MiB)
        self.text = bytearray()
        self.thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self.thread.start()

    def _read(self, pipe) -> None:
        partial = b""
        while chunk := pipe.read1(4096):
            now = time.monotonic()
            self.text += chunk
            del self.text[:-20000]
            *complete, partial = re.split(rb"[\r\n]", partial + chunk)
            if STATUS.search(partial.decode(errors="replace")):  # a status line ends at the next one's \r
                complete.append(partial)
                partial = b""
            for line in complete:
                match = STATUS.search(line.decode(errors="replace"))
                if match:
                    seen, frames, lag, memory = match.groups()
                    lag = None if lag == "-" else float(lag[:-2])
                    self.lines.append((now, float(seen), int(frames), lag, float(memory)))

    def latest(self):
        return self.lines[-1] if self.lines else None


def producer_lags(lines, clock_start: float, stream_s: int) -> list[float]:
    """Per stream second s: when `watch` first reported s answerable, minus when the producer wrote it
    (clock_start + s). An upper bound: status lines come every 0.5 s, and not while a question runs."""
    lags, i = [], 0
    for second in range(stream_s):
        while i < len(lines) and lines[i][1] + 1e-6 < second:
            i += 1
        if i == len(lines):
            break
        lags.append(lines[i][0] - (clock_start + second))
    return lags


def run_case(name, spec, realtime: bool, args, every=None, horizon=None, timeout_s=None) -> dict:
    """One producer -> pipe -> `videoxl2 watch -` run; answers, RSS and status lines as they came."""
    from videoxl2.demo.niah import QUESTION

    values = spec_values(spec, realtime=realtime)
    command = [*watch_command(), "watch", "-", "--json", "--progress", "--model", str(args.model)]
    command += ["--mode", "bilevel", "--question", QUESTION, "--max-new-tokens", "8"]
    command += [] if every is None else ["--every", str(every)]
    command += [] if horizon is None else ["--dense-horizon", str(horizon)]
    command += [] if args.max_memory is None or horizon is None else ["--max-memory", args.max_memory]
    spill = tempfile.mkdtemp(prefix="live-spill-")
    command += ["--spill-dir", spill]
    start = time.monotonic()
    producer = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--produce", json.dumps(values)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    watcher = subprocess.Popen(command, stdin=producer.stdout, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    producer.stdout.close()
    log = StderrLog(watcher.stderr)
    answers: list[dict] = []

    def read_answers():
        for line in watcher.stdout:
            if line.strip():
                record = json.loads(line)
                record["arrived_s"] = time.monotonic() - start
                answers.append(record)

    reader = threading.Thread(target=read_answers, daemon=True)
    reader.start()
    samples, produced_s, killed = [], None, False
    while watcher.poll() is None:
        time.sleep(1.0)
        now = time.monotonic() - start
        if produced_s is None and producer.poll() is not None:
            produced_s = now
        rss, seen = proc_rss(watcher.pid), log.latest()
        if rss is not None:
            samples.append(
                dict(
                    wall_s=round(now, 2),
                    seconds_seen=None if seen is None else seen[1],
                    rss_mib=round(rss / 2**20, 1),
                    kv_mib=None if seen is None else seen[4],
                )
            )
        if timeout_s is not None and now > timeout_s:
            watcher.kill()
            killed = True
    producer.kill()
    producer.wait()
    clock = producer.stderr.read().decode().split()
    producer.stderr.close()
    reader.join(timeout=10)
    log.thread.join(timeout=10)
    wall = time.monotonic() - start
    shutil.rmtree(spill, ignore_errors=True)
    case = summarize_case(name, spec, realtime, every, horizon, answers, samples, produced_s, wall,
                          watcher.returncode, killed, log.text.decode(errors="replace"))  # fmt: skip
    if realtime and clock[:1] == ["start"]:
        clock_start = float(clock[1])
        lags = producer_lags(log.lines, clock_start, spec.num_frames)
        case.update(
            producer_lag_p50_s=percentile(lags, 50),
            producer_lag_p95_s=percentile(lags, 95),
            producer_lag_max_s=max(lags) if lags else None,
            producer_lags_s=[round(x, 3) for x in lags],
        )
        for answer in answers:  # stream clock minus the seconds answerable, when the question was asked
            asked = start + answer["arrived_s"] - answer["answer_s"]
            answer["behind_s"] = round(asked - clock_start - answer["seconds_seen"], 3)
    return case


def percentile(values, q):
    return None if not values else float(np.percentile(values, q))


def summarize_case(name, spec, realtime, every, horizon, answers, samples, produced_s, wall, code, killed,
                   stderr) -> dict:  # fmt: skip
    from videoxl2.eval.scoring import normalize_text

    needle = spec.needles[0]
    needle_s = float(needle.start_frame)  # 1 fps: frame k of the spec is shown from second k
    final = next((a for a in reversed(answers) if a.get("trigger") == "final"), None)
    periodic = [a for a in answers if a.get("trigger") == "every"]
    while_running = [a for a in periodic if produced_s is None or a["arrived_s"] < produced_s]
    latencies = [a["answer_s"] for a in periodic]
    case = dict(
        name=name,
        mode="bounded" if horizon is not None else "exact",
        dense_horizon_s=horizon,
        realtime=realtime,
        stream_s=spec.num_frames,
        needle=dict(name=needle.name, start_s=needle_s),
        wall_s=round(wall, 1),
        exit_code=code,
        timed_out=killed,
        every_s=every,
        every_answers=len(periodic),
        every_answers_while_streaming=len(while_running),
        answer_latency_p50_s=percentile(latencies, 50),
        answer_latency_p95_s=percentile(latencies, 95),
        answer_latency_max_s=max(latencies) if latencies else None,
        answer_lags_s=[a["lag_s"] for a in periodic],
        rss=samples,
        answers=answers,
        stderr_tail=stderr.replace("\r", "\n")[-1500:] if code != 0 else "",
    )
    if final is not None:
        ingest = final.get("ingest") or {}
        units = final["units"]
        holder = [
            u for u in units if u["start_seconds"] <= needle_s < max(u["end_seconds"], u["start_seconds"] + 1)
        ]
        case.update(
            lag_p50_s=ingest.get("lag_p50_s"),
            lag_p95_s=ingest.get("lag_p95_s"),
            seconds_seen=final["seconds_seen"],
            frames_seen=final["frames_seen"],
            final_answer=final["answer"],
            correct=normalize_text(final["answer"]) == normalize_text(needle.name),
            needle_unit_selected=bool(holder),
            dense_units=[u["index"] for u in units],
            spilled_units=final.get("spilled_units", 0),
            reloaded_units=final.get("reloaded_units", []),
            needle_unit_reloaded=bool(holder) and holder[0]["index"] in final.get("reloaded_units", []),
        )
    case.update(rss_growth(samples, horizon))
    return case


WINDOW = 5  # RSS samples (one a second) whose median stands for the start and the end of a long stream


def rss_growth(samples: list[dict], horizon) -> dict:
    """RSS when the stream passed the first horizon (or its first third in exact mode), when the whole
    stream had been seen (the first sample at its last second: what the stream left, before the final
    question's working memory), and the peak after the mark (the final question included)."""
    seen = [s for s in samples if s["seconds_seen"] is not None]
    if not seen:
        return {}
    stream_end = seen[-1]["seconds_seen"]
    mark = horizon if horizon is not None else stream_end / 3
    after = [s for s in seen if s["seconds_seen"] >= mark] or seen[-1:]
    first, peak = after[0]["rss_mib"], max(s["rss_mib"] for s in after)
    end = next(s["rss_mib"] for s in after if s["seconds_seen"] >= stream_end)
    # RSS swings by tens of MiB while a block is computed (activations, freed heap): the trend is the median
    # of the first WINDOW samples after the mark against that of the last WINDOW before the stream's end
    streaming = [s["rss_mib"] for s in after if s["seconds_seen"] < stream_end]
    window = min(WINDOW, len(streaming) // 2)
    trend = None
    if window:
        start_median = float(np.median(streaming[:window]))
        end_median = float(np.median(streaming[-window:]))
        trend = round(100 * (end_median - start_median) / start_median, 1)

    def growth(value):
        return round(100 * (value - first) / first, 1) if first else None

    return dict(
        rss_mark_s=mark,
        rss_at_mark_mib=first,
        rss_at_end_mib=end,
        rss_growth_to_end_pct=growth(end),
        rss_growth_median_pct=trend,
        rss_peak_after_mark_mib=peak,
        rss_growth_after_mark_pct=growth(peak),
        rss_peak_mib=max(s["rss_mib"] for s in samples),
    )


# -- the runs ------------------------------------------------------------------------------------------
def realtime_cases(args) -> list[dict]:
    seconds = int(args.minutes * 60)
    spec = needle_spec(seconds, args.seed, 0)
    horizons = [None] + ([min(args.horizon, seconds / 3)] if args.bounded else [])
    cases = []
    for horizon in horizons:
        case = run_case(
            "realtime", spec, True, args, every=args.every, horizon=horizon, timeout_s=seconds + 300
        )
        cases.append(case)
        print(row(case), file=sys.stderr, flush=True)
    return cases


def long_cases(args) -> list[dict]:
    seconds = int(args.long_minutes * 60)
    horizons = [None] + ([args.horizon] if args.bounded else [])
    cases = []
    for trial in range(args.trials):
        spec = needle_spec(seconds, args.seed, 1000 + trial)
        for horizon in horizons:
            case = run_case(f"long-{trial}", spec, False, args, horizon=horizon, timeout_s=args.long_timeout)
            cases.append(case)
            print(row(case), file=sys.stderr, flush=True)
    return cases


def session_cases(args) -> list[dict]:
    """The long streams again, each fed to a `LiveSession` in its own process (`run_session`)."""
    from videoxl2.eval.scoring import normalize_text

    seconds, cases = int(args.long_minutes * 60), []
    for trial in range(args.trials):
        spec = needle_spec(seconds, args.seed, 1000 + trial)
        for horizon in [None] + ([args.horizon] if args.bounded else []):
            values = spec_values(spec, model=str(args.model), horizon=horizon)
            command = [sys.executable, str(Path(__file__).resolve()), "--session", json.dumps(values)]
            start = time.monotonic()
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"session run failed: {done.stderr.strip().splitlines()[-1:]}")
            out = json.loads(done.stdout.strip().splitlines()[-1])
            samples = out.pop("samples")
            mark = horizon if horizon is not None else seconds / 3  # as `rss_growth`
            at = next((s for s in samples if s["seconds_seen"] >= mark), samples[-1])
            case = dict(
                name=f"session-{trial}",
                mode="exact" if horizon is None else "bounded",
                dense_horizon_s=horizon,
                stream_s=seconds,
                wall_s=round(time.monotonic() - start, 1),
                needle=dict(name=spec.needles[0].name, start_s=spec.seconds(spec.needles[0].start_frame)),
                correct=normalize_text(out["answer"]) == normalize_text(spec.needles[0].name),
                kv_at_mark_mib=at["kv_mib"],
                kv_at_end_mib=samples[-1]["kv_mib"],
                **out,
                **rss_growth(samples, horizon),
                rss=samples,
            )
            cases.append(case)
            print(session_row(case), file=sys.stderr, flush=True)
    return cases


SESSION_HEADER = (
    f"{'case':<11}{'mode':<9}{'wall':>7}{'KV MiB mark/end':>17}{'RSS MiB mark/end':>18}{'trend':>8}"
)


def session_row(case: dict) -> str:
    kv = f"{case['kv_at_mark_mib']:.1f}/{case['kv_at_end_mib']:.1f}"
    rss = f"{case['rss_at_mark_mib']:.0f}/{case['rss_at_end_mib']:.0f}"
    return (
        f"{case['name']:<11}{case['mode']:<9}{case['wall_s']:>6.0f}s{kv:>17}{rss:>18}"
        f"{fmt(case['rss_growth_median_pct'], '.1f') + '%':>8}"
    )


def long_summary(cases: list[dict]) -> dict:
    out = {}
    for mode in ("exact", "bounded"):
        rows = [c for c in cases if c["mode"] == mode and "correct" in c]
        if rows:
            out[mode] = dict(
                trials=len(rows),
                accuracy_pct=100 * float(np.mean([c["correct"] for c in rows])),
                needle_unit_selected_pct=100 * float(np.mean([c["needle_unit_selected"] for c in rows])),
                rss_growth_to_end_pct=[c.get("rss_growth_to_end_pct") for c in rows],
                rss_growth_median_pct=[c.get("rss_growth_median_pct") for c in rows],
                rss_growth_after_mark_pct=[c.get("rss_growth_after_mark_pct") for c in rows],
                wall_s=[c["wall_s"] for c in rows],
            )
    return out


def fmt(value, spec=".2f") -> str:
    return "-" if value is None else format(value, spec)


HEADER = (
    f"{'case':<11}{'mode':<9}{'stream':>7}{'wall':>7}{'lag p50':>8}{'p95':>6}{'pipe p95':>9}{'every':>7}"
    f"{'ans p50':>8}{'p95':>6}{'RSS MiB mark/end/peak':>22}{'trend':>8}{'peak':>7}{'needle':>7}{'right':>6}"
)


def row(case: dict) -> str:
    every = f"{case['every_answers_while_streaming']}/{case['every_answers']}" if case["every_s"] else "-"
    rss = "/".join(
        fmt(case.get(k), ".0f") for k in ("rss_at_mark_mib", "rss_at_end_mib", "rss_peak_after_mark_mib")
    )
    to_end, growth = (
        fmt(case.get("rss_growth_median_pct"), ".1f"),
        fmt(case.get("rss_growth_after_mark_pct"), ".1f"),
    )
    selected = {True: "yes", False: "no", None: "-"}[case.get("needle_unit_selected")]
    right = {True: "yes", False: "no", None: "-"}[case.get("correct")]
    return (
        f"{case['name']:<11}{case['mode']:<9}{case['stream_s'] / 60:>6.0f}m{case['wall_s']:>6.0f}s"
        f"{fmt(case.get('lag_p50_s') if case['realtime'] else None):>8}"
        f"{fmt(case.get('lag_p95_s') if case['realtime'] else None):>6}"
        f"{fmt(case.get('producer_lag_p95_s')):>9}{every:>7}"
        f"{fmt(case['answer_latency_p50_s']):>8}{fmt(case['answer_latency_p95_s']):>6}{rss:>22}"
        f"{to_end + '%' if to_end != '-' else '-':>8}{growth + '%' if growth != '-' else '-':>7}"
        f"{selected:>7}{right:>6}" + ("" if case["exit_code"] == 0 else f"  exit {case['exit_code']}")
    )


def machine() -> dict:
    import torch

    return dict(
        cpu_count=os.cpu_count(),
        affinity=len(os.sched_getaffinity(0)),
        torch_threads=torch.get_num_threads(),
        python=platform.python_version(),
        torch=torch.__version__,
        platform=platform.platform(),
    )


def main() -> int:
    from videoxl2.defaults import DEFAULT_MODEL

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--produce", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--session", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--minutes", type=float, default=3.0, help="real-time stream length (default 3)")
    parser.add_argument("--every", type=float, default=30.0, help="real time: ask every this many seconds")
    parser.add_argument("--long-minutes", type=float, default=60.0, help="long stream length (default 60)")
    parser.add_argument("--trials", type=int, default=3, help="long streams (needles) per mode")
    parser.add_argument("--long-timeout", type=float, default=3600.0, help="seconds one long run may take")
    parser.add_argument("--horizon", type=float, default=300.0, help="bounded mode's --dense-horizon")
    parser.add_argument("--max-memory", default=None, help="passed to watch --max-memory (bounded runs)")
    parser.add_argument("--bounded", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--skip-realtime", action="store_true")
    parser.add_argument("--skip-long", action="store_true")
    parser.add_argument(
        "--sessions", action="store_true", help="also feed the long streams to a LiveSession in-process"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()
    if args.produce is not None:
        return produce(args.produce)
    if args.session is not None:
        return run_session(args.session)
    result = dict(
        benchmark="live",
        date=datetime.now().isoformat(timespec="seconds"),
        machine=machine(),
        args={k: v for k, v in vars(args).items() if k not in ("produce", "session")},
        cases=[],
    )
    print(HEADER, file=sys.stderr)
    if not args.skip_realtime:
        result["cases"] += realtime_cases(args)
    if not args.skip_long:
        result["cases"] += long_cases(args)
        result["long"] = long_summary([c for c in result["cases"] if c["name"].startswith("long")])
    if args.sessions:
        print(SESSION_HEADER, file=sys.stderr)
        result["sessions"] = session_cases(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"live-{datetime.now().strftime('%Y%m%d-%H%M')}.json"
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "cases"}, indent=1))
    print(HEADER)
    for case in result["cases"]:
        print(row(case))
    if result.get("sessions"):
        print(SESSION_HEADER)
        for case in result["sessions"]:
            print(session_row(case))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
