"""Load on `videoxl2 serve`: N concurrent clients on loopback for a bounded time.

Each client holds conversations: a first question about a video the server has not seen (decode + pre-fill)
then follow-ups on it (answered from the cached video memory). 429 (queue full) is counted and retried after
a pause; anything else that is not 200 is an error. Prints a table and JSON; writes the JSON to
benchmarks/results/serve-load-<model>-<time>.json.

    python benchmarks/serve_load.py --clients 20 --duration 60            # starts a server on the demo model
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --media-root DIR --api-key KEY
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import httpx
import numpy as np

RESULTS = Path(__file__).parent / "results"
QUESTIONS = (
    "What was the first shape shown in the video?",
    "When did it appear?",
    "How many shapes were shown?",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_videos(folder: Path, count: int, frames: int) -> list[Path]:
    from videoxl2.data.synthetic import random_spec, write_video

    rng = np.random.default_rng(0)
    return [write_video(random_spec(rng, frames), folder / f"load-{i:03d}.mp4") for i in range(count)]


def start_server(args, media: Path):
    port = free_port()
    command = [
        sys.executable, "-m", "videoxl2.cli", "serve", "--port", str(port), "--media-root", str(media),
        "--max-queue", str(args.max_queue), "--timeout", str(args.timeout),
    ] + (["--model", args.model] if args.model else [])  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited: {process.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("server did not start within 120 s")


def client(url, key, videos, index, deadline, follow_ups, records, lock, max_tokens):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    conversation = 0
    with httpx.Client(timeout=600, headers=headers) as http:
        while time.monotonic() < deadline:
            video = videos[(index + conversation * 97) % len(videos)]
            conversation += 1
            answers: list[str] = []
            for turn in range(1 + follow_ups):
                if time.monotonic() >= deadline:
                    return
                messages = [{"role": "user", "content": [
                    {"type": "video_url", "video_url": {"url": f"file://{video}"}},
                    {"type": "text", "text": QUESTIONS[0]},
                ]}]  # fmt: skip
                for number, answer in enumerate(answers):
                    messages += [
                        {"role": "assistant", "content": answer},
                        {"role": "user", "content": QUESTIONS[(number + 1) % len(QUESTIONS)]},
                    ]
                while True:
                    start = time.monotonic()
                    try:
                        response = http.post(
                            url + "/v1/chat/completions",
                            json={"messages": messages, "max_tokens": max_tokens},
                        )
                        status = response.status_code
                    except httpx.HTTPError as err:
                        status, response = f"{type(err).__name__}", None
                    latency = time.monotonic() - start
                    record = dict(client=index, turn=turn, status=status, latency_s=latency)
                    if status == 200:
                        body = response.json()
                        record["cache_hit"] = body["videoxl2"]["cache_hit"]
                        answers.append(body["choices"][0]["message"]["content"])
                    with lock:
                        records.append(record)
                    if status != 429:
                        break
                    time.sleep(0.2)
                if status != 200:
                    break


def percentile(values, q):
    return round(float(np.percentile(values, q)), 3) if values else None


def summarize(records, args, seconds) -> dict:
    ok = [r for r in records if r["status"] == 200]
    first = [r["latency_s"] for r in ok if not r["cache_hit"]]
    follow = [r["latency_s"] for r in ok if r["cache_hit"]]
    statuses: dict[str, int] = {}
    for r in records:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    return dict(
        clients=args.clients,
        duration_s=args.duration,
        wall_s=round(seconds, 1),
        max_queue=args.max_queue,
        frames=args.frames,
        requests=len(records),
        answered=len(ok),
        statuses=statuses,
        errors_other_than_429=sum(n for s, n in statuses.items() if s not in ("200", "429")),
        answers_per_s=round(len(ok) / seconds, 3),
        first_question=dict(count=len(first), p50_s=percentile(first, 50), p95_s=percentile(first, 95)),
        follow_up=dict(count=len(follow), p50_s=percentile(follow, 50), p95_s=percentile(follow, 95)),
        all=dict(
            p50_s=percentile([r["latency_s"] for r in ok], 50),
            p95_s=percentile([r["latency_s"] for r in ok], 95),
        ),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="an already running server (default: start one)")
    parser.add_argument("--model", help="checkpoint for the started server (default: the demo model)")
    parser.add_argument("--api-key", default=None)
    parser.add_argument(
        "--media-root", help="with --url: a folder the server reads (videos are written there)"
    )
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--frames", type=int, default=64, help="frames per synthetic video (1 fps)")
    parser.add_argument("--videos", type=int, default=60)
    parser.add_argument("--follow-ups", type=int, default=2)
    parser.add_argument("--max-queue", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    scratch = Path(args.media_root or tempfile.mkdtemp(prefix="videoxl2-load-"))
    videos = write_videos(scratch, args.videos, args.frames)
    server = None
    url = args.url
    if url is None:
        server, url = start_server(args, scratch)
    records: list[dict] = []
    lock = threading.Lock()
    start = time.monotonic()
    deadline = start + args.duration
    try:
        with ThreadPoolExecutor(args.clients) as pool:
            for i in range(args.clients):
                pool.submit(
                    client,
                    url,
                    args.api_key,
                    videos,
                    i,
                    deadline,
                    args.follow_ups,
                    records,
                    lock,
                    args.max_tokens,
                )
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
    seconds = time.monotonic() - start
    summary = summarize(records, args, seconds)
    summary["model"] = args.model or "demo (bundled)"
    summary["cpu_count"] = os.cpu_count()
    print(f"{'':14}{'count':>8}{'p50 s':>9}{'p95 s':>9}")
    for name in ("first_question", "follow_up"):
        part = summary[name]
        print(f"{name:14}{part['count']:>8}{part['p50_s'] or 0:>9.3f}{part['p95_s'] or 0:>9.3f}")
    print(f"statuses {summary['statuses']}; errors other than 429: {summary['errors_other_than_429']}; "
          f"{summary['answers_per_s']} answers/s")  # fmt: skip
    print(json.dumps(summary, indent=1))
    RESULTS.mkdir(exist_ok=True)
    name = Path(args.model).name if args.model else "demo"
    out = RESULTS / f"serve-load-{name}-{datetime.now():%Y%m%d-%H%M}.json"
    out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {out}")
    return 1 if summary["errors_other_than_429"] else 0


if __name__ == "__main__":
    sys.exit(main())
