"""`videoxl2 watch SOURCE`: watch a live stream and answer questions while it plays.

SOURCE is a file still being written (followed until it stops growing), `-` (standard input, e.g. MPEG-TS
from `ffmpeg ... -f mpegts -`) or a URL PyAV opens. Frames are sampled at `--fps` from presentation times
and pre-filled as they arrive (`engine/live.py`: a background `LiveIngest` feeding a `LiveSession`); this
module only decides when to ask and how to print. Questions come from `--question Q --every SECONDS`
(stream time), from lines typed on the terminal (when standard input is a terminal and not the source), and
once more at the end of the stream. End of stream, a source that drops (a killed producer) and Ctrl-C all
end the same way: the final answer from what was seen, the memory saved if asked, exit 0. A second Ctrl-C
during that final answer aborts (exit 130).
"""

from __future__ import annotations

import argparse
import json
import queue
import re
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

from ..errors import InputError, MediaNotFoundError, VideoDecodeError

HELP = "watch a live stream (a growing file, - for stdin, or a URL) and answer questions while it plays"
DEFAULT_QUESTION = "Describe the video."
POLL_S = 0.1  # how often the main thread looks at the stream (ticks of --every, typed questions)
STATUS_S = 0.5  # how often the status line on stderr is redrawn
STOP_WAIT_S = 15.0  # how long Ctrl-C waits for the frames read to be appended before answering from the rest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..cli import _add_memory_args, _add_model_args

    parser.add_argument(
        "source",
        help="a file still being written (followed), - for standard input (e.g. MPEG-TS), or a URL "
        "(rtsp, rtmp, http(s), udp, tcp, srt)",
    )
    _add_model_args(parser)
    parser.add_argument("--mode", choices=["dense", "chunked", "bilevel"], default=None, help="engine mode")
    _add_memory_args(parser)
    parser.add_argument(
        "--offload", action="store_true", help="keep the dense video KV in CPU memory (GPU runs)"
    )
    parser.add_argument(
        "--decode-threads", type=int, default=None, help="FFmpeg decoding threads (default: FFmpeg's choice)"
    )
    parser.add_argument("--fps", type=float, default=1.0, help="frames sampled per stream second (default 1)")
    parser.add_argument(
        "--question",
        default=None,
        help=f"asked every --every seconds and at the end of the stream (default at the end: "
        f"the last question typed, else {DEFAULT_QUESTION!r})",
    )
    parser.add_argument(
        "--every",
        type=float,
        default=None,
        metavar="SECONDS",
        help="with --question: ask it each time this many more seconds of the stream have been seen",
    )
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument(
        "--json",
        action="store_true",
        help="one JSON object per answer on stdout (question, answer, seconds_seen, lag_s, units, answer_s)",
    )
    parser.add_argument("--save-memory", default=None, metavar="FILE", help="write the memory at the end")
    parser.add_argument(
        "--dense-horizon",
        type=float,
        default=None,
        metavar="SECONDS",
        help="bounded memory: units older than this keep their sparse KV in memory, dense KV on disk "
        "(bilevel mode, the default then)",
    )
    parser.add_argument(
        "--max-memory",
        default=None,
        metavar="BYTES",
        help="bounded memory: KV held in memory at most (e.g. 2GB, 512MiB); older units spill to disk",
    )
    parser.add_argument("--spill-dir", default=None, help="folder for spilled units (default: a temp folder)")
    parser.add_argument(
        "--follow-idle",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="a followed file that has not grown for this long has ended (default 2)",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="status line on stderr: seconds seen, lag, memory (default: when stderr is a terminal)",
    )


def check_source(source: str) -> None:
    """Fail before loading any weights when the source cannot be a stream."""
    from ..video.live import URL_SCHEMES

    if source == "-":
        return
    scheme = urlparse(source).scheme.lower()
    if scheme in URL_SCHEMES:
        return
    if scheme and len(scheme) > 1:  # one letter: a Windows drive
        raise InputError(f"{source}: unsupported URL scheme {scheme!r}; use {', '.join(sorted(URL_SCHEMES))}")
    if not Path(source).is_file():
        raise MediaNotFoundError(f"{source}: no such file")


def check_args(args) -> None:
    if not args.fps > 0:
        raise InputError(f"--fps must be > 0, got {args.fps}")
    if args.every is not None:
        if args.question is None:
            raise InputError("--every needs --question")
        if not args.every > 0:
            raise InputError(f"--every must be > 0 seconds, got {args.every}")
    if args.question is not None and not args.question.strip():
        raise InputError("--question is empty")
    if args.dense_horizon is not None and not args.dense_horizon > 0:
        raise InputError(f"--dense-horizon must be > 0 seconds, got {args.dense_horizon}")
    if not args.follow_idle > 0:
        raise InputError(f"--follow-idle must be > 0 seconds, got {args.follow_idle}")
    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.save_memory is not None and not Path(args.save_memory).resolve().parent.is_dir():
        raise InputError(f"--save-memory {args.save_memory}: its folder does not exist")


def max_memory_bytes(args) -> int | None:
    from .plan import parse_bytes

    return None if args.max_memory is None else parse_bytes(args.max_memory, "--max-memory")


def dense_units(stats: dict) -> list[dict]:
    """The units an answer read at full resolution, with their time ranges (all of them outside bilevel)."""
    keep = ("index", "start_seconds", "end_seconds", "score")
    return [{k: u.get(k) for k in keep} for u in stats.get("units", []) if u.get("dense")]


class Watcher:
    """Asks the session while the ingest thread fills it, and prints each answer."""

    def __init__(self, session, ingest, args, out=None, err=None):
        self.session, self.ingest, self.args = session, ingest, args
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.typed: queue.Queue[str | None] = queue.Queue()
        self.interactive = args.source != "-" and sys.stdin is not None and sys.stdin.isatty()
        progress = args.progress
        self.progress = (self.err.isatty() and not self.interactive) if progress is None else progress
        self.last_typed: str | None = None
        self.next_tick = args.every
        self.records: list[dict] = []
        self._status_at = 0.0
        self._status_shown = False
        self._status_frames = -1
        generation = dict(max_new_tokens=args.max_new_tokens)
        if args.temperature > 0:
            generation.update(do_sample=True, temperature=args.temperature)
        self.generation = generation

    # -- questions -----------------------------------------------------------------------------------------
    def start_typing(self) -> None:
        """Lines typed on the terminal become questions (a daemon thread: it may stay blocked in readline)."""
        if not self.interactive:
            return

        def read():
            for line in sys.stdin:
                self.typed.put(line.strip())
            self.typed.put(None)

        threading.Thread(target=read, name="watch-typed", daemon=True).start()
        print("videoxl2: type a question and press Enter (an empty line shows the status)", file=self.err)

    def ask(self, question: str, trigger: str) -> dict:
        status = self.ingest.status()
        start = time.perf_counter()
        answer = self.session.ask(question, generation_config=self.generation)
        stats = answer.stats
        record = dict(
            question=question,
            answer=answer.text,
            trigger=trigger,
            seconds_seen=float(stats.get("seconds_seen", status["seconds_seen"])),
            frames_seen=int(stats.get("frames_seen", status["frames_seen"])),
            lag_s=status["lag_s"],
            units=dense_units(stats),
            answer_s=time.perf_counter() - start,
            memory_bytes=status["memory_bytes"],
            spilled_units=stats.get("spilled_units", 0),
            reloaded_units=stats.get("reloaded_units", []),
            ingest={k: status.get(k) for k in ("state", "lag_p50_s", "lag_p95_s", "ended")},
        )
        self.records.append(record)
        self.show(record)
        return record

    def show(self, record: dict) -> None:
        self.clear_status()
        if self.args.json:
            print(json.dumps(record), file=self.out, flush=True)
            return
        spans = ", ".join(f"{u['start_seconds']:.0f}-{u['end_seconds']:.0f} s" for u in record["units"])
        lag = "" if record["lag_s"] is None else f", lag {record['lag_s']:.1f} s"
        head = f"[{record['seconds_seen']:.1f} s seen{lag}, {record['answer_s']:.1f} s to answer"
        head += f"; looked at {spans}]" if spans and len(record["units"]) <= 16 else "]"
        print(f"{head}\nQ: {record['question']}\nA: {record['answer']}", file=self.out, flush=True)

    def due(self) -> bool:
        """--every: the next tick of stream time has been seen (ticks missed while answering are skipped)."""
        if self.next_tick is None or self.session.seconds_seen + 1e-6 < self.next_tick:
            return False
        every = self.args.every
        self.next_tick = (int(self.session.seconds_seen / every + 1e-6) + 1) * every
        return True

    def poll_typed(self) -> str | None:
        try:
            line = self.typed.get_nowait()
        except queue.Empty:
            return None
        if line is None:
            return None
        if not line:
            print(self.status_text(), file=self.err, flush=True)
            return None
        return line

    # -- the loop ----------------------------------------------------------------------------------------
    def watch(self) -> None:
        """Until the ingest thread ends: ask on --every ticks and typed lines, redraw the status line."""
        self.start_typing()
        while not self.ingest.done.is_set():
            if self.session.frames_seen and self.due():
                self.ask(self.args.question, "every")
                continue
            typed = self.poll_typed()
            if typed is not None:
                if self.session.frames_seen:
                    self.last_typed = typed
                    self.ask(typed, "typed")
                else:
                    print("videoxl2: nothing seen yet; ask again in a moment", file=self.err, flush=True)
                continue
            self.draw_status()
            self.ingest.done.wait(POLL_S)

    def final(self) -> dict:
        question = self.args.question or self.last_typed or DEFAULT_QUESTION
        return self.ask(question, "final")

    # -- status line ---------------------------------------------------------------------------------------
    def status_text(self) -> str:
        status = self.ingest.status()
        lag = "-" if status["lag_s"] is None else f"{status['lag_s']:.1f} s"
        memory = status["memory_bytes"] or 0
        return (
            f"watch: {status['seconds_seen']:.1f} s seen, {status['frames_seen']} frames, lag {lag}, "
            f"memory {memory / 2**20:.1f} MiB, {status['state']}"
        )

    def draw_status(self) -> None:
        """Redrawn when a frame has come (within POLL_S) and every STATUS_S (the lag grows meanwhile)."""
        now, frames = time.monotonic(), self.session.frames_seen
        if not self.progress or (now - self._status_at < STATUS_S and frames == self._status_frames):
            return
        self._status_at, self._status_frames = now, frames
        self.err.write("\r\x1b[K" + self.status_text())
        self.err.flush()
        self._status_shown = True

    def clear_status(self) -> None:
        if self._status_shown:
            self.err.write("\r\x1b[K")
            self.err.flush()
            self._status_shown = False


def ingest_error(ingest, source: str) -> str | None:
    """The reader's failure as one line, or None when it ended cleanly."""
    status = ingest.status()
    if status["state"] != "failed":
        return None
    error = status.get("error") or f"{source}: the stream failed"
    return re.sub(r"^\w+(Error|Exception): ", "", error)  # the type name adds nothing to the CLI's line


def run(args) -> int:
    import torch

    from .. import load_model, load_tokenizer
    from ..cli import _engine_overrides, _weight_kwargs
    from .live import LiveIngest, LiveSession
    from .settings import EngineSettings

    check_args(args)
    check_source(args.source)  # fail fast, before loading weights
    max_memory = max_memory_bytes(args)
    model = load_model(args.model, device=args.device, dtype=args.dtype, **_weight_kwargs(args))
    tokenizer = load_tokenizer(args.model)
    overrides = _engine_overrides(args)
    if (args.dense_horizon is not None or max_memory is not None) and args.mode is None:
        overrides["mode"] = "bilevel"  # bounded memory answers from selected units
    settings = EngineSettings.from_config(model.config, **overrides)
    session = LiveSession(
        model,
        tokenizer,
        settings=settings,
        source=args.source,
        progress=False,
        dense_horizon=args.dense_horizon,
        max_memory=max_memory,
        spill_dir=args.spill_dir,
    )
    try:
        ingest = LiveIngest(
            session, args.source, fps=args.fps, follow_idle_s=args.follow_idle, threads=args.decode_threads
        )
        watcher = Watcher(session, ingest, args)
        ingest.start()
        interrupted = False
        try:
            with torch.inference_mode():
                watcher.watch()
        except KeyboardInterrupt:
            interrupted = True
            watcher.clear_status()
            print("videoxl2: stopped; answering from what was seen", file=sys.stderr, flush=True)
            ingest.stop()
        # not join(): a reader blocked on a silent source outlives the ingest; it is a daemon thread
        ingest.done.wait(STOP_WAIT_S)
        watcher.clear_status()
        error = ingest_error(ingest, args.source)
        if session.frames_seen == 0:
            ended = "stopped" if interrupted else ingest.status().get("ended") or "the stream ended"
            raise VideoDecodeError(error or f"{args.source}: no frames were seen ({ended})")
        with torch.inference_mode():
            watcher.final()
        if args.save_memory is not None:
            path = session.save_memory(args.save_memory)  # source, seconds seen and settings recorded
            print(
                f"videoxl2: memory of {session.seconds_seen:.1f} s ({session.frames_seen} frames) saved to "
                f"{path}",
                file=sys.stderr,
            )
        if error is not None:
            print(f"videoxl2: error: {error}", file=sys.stderr)
            return 2
        return 0
    finally:
        session.close()


COMMANDS = {"watch": (HELP, add_arguments, run)}
