"""Live streams over HTTP (POST /v1/streams): a source watched in the background, chat completions that
answer from what it has seen so far, status, delete, limits, refused sources, and no thread left behind."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import threading
import time

import numpy as np
import pytest
from engine_helpers import mpegts_bytes

pytest.importorskip("fastapi", reason="serving needs the serve extra")

from fastapi.testclient import TestClient  # noqa: E402

from videoxl2.serve.api import create_app  # noqa: E402
from videoxl2.serve.errors import ServeError  # noqa: E402
from videoxl2.serve.service import ServeSettings, VideoChatService  # noqa: E402
from videoxl2.serve.streams import StreamPolicy, resolve_source  # noqa: E402
from videoxl2.video.synthetic import frame_colour, write_synthetic_video  # noqa: E402

KEY = "stream-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
FPS = 10  # the producers' frame rate; streams sample them at 1 fps


def ts_bytes(seconds: float, fps: int = FPS) -> bytes:
    """An MPEG-TS stream: frame i is palette colour i // fps with a moving white square."""

    def picture(index):
        pixels = np.empty((64, 64, 3), np.uint8)
        pixels[:] = frame_colour(index // fps)
        pixels[index % 48 : index % 48 + 16, 8:24] = 255
        return pixels

    return mpegts_bytes(seconds, fps, 64, picture)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("streams")
    root, outside = base / "media", base / "private"
    root.mkdir()
    outside.mkdir()
    write_synthetic_video(root / "clip.mp4", num_frames=24, fps=4.0, seed=5)  # 6 s, finished
    write_synthetic_video(outside / "secret.mp4", num_frames=8, fps=4.0, seed=6)
    os.symlink(outside / "secret.mp4", root / "link.mp4")
    (root / "notavideo.ts").write_bytes(b"this is not a video stream " * 40)
    return root, outside


def make_service(tiny, tiny_checkpoint, root, **overrides):
    model, tokenizer = tiny
    values = dict(
        model=str(tiny_checkpoint), media_roots=[str(root)], api_key=KEY, max_queue=4, max_streams=2,
        stream_follow_idle_s=0.5,
    )  # fmt: skip
    values.update(overrides)
    return VideoChatService(ServeSettings(**values), model=model, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def server(tiny, tiny_checkpoint, folders):
    service = make_service(tiny, tiny_checkpoint, folders[0])
    with TestClient(create_app(service)) as client:
        client.headers.update(AUTH)
        yield client, service
    service.close()


def extra_threads(before: set, deadline_s: float = 3.0) -> list[str]:
    """Threads alive now that were not in `before`, after giving them `deadline_s` to end. The server's
    own pools are left out: the model's worker (started at the first question, kept for the server's
    life) and the HTTP framework's idle thread pool."""
    end = time.monotonic() + deadline_s
    while True:
        extra = [
            t.name
            for t in threading.enumerate()
            if t not in before and t.is_alive() and not t.name.startswith(("AnyIO worker", "videoxl2-model"))
        ]
        if not extra or time.monotonic() > end:
            return extra
        time.sleep(0.05)


def wait_for(client, ident, check, timeout=60.0) -> dict:
    end = time.monotonic() + timeout
    while True:
        status = client.get(f"/v1/streams/{ident}").json()
        if check(status):
            return status
        assert time.monotonic() < end, f"stream never got there: {status}"
        time.sleep(0.05)


def ask(client, ident, question="What colour is shown?", stream=False, **extra):
    body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "video_stream", "stream_id": ident},
                    {"type": "text", "text": question},
                ],
            }
        ],
        "max_tokens": 6,
        "stream": stream,
        **extra,
    }
    return client.post("/v1/chat/completions", json=body)


def sse_events(response) -> list[dict]:
    assert response.status_code == 200, response.text
    lines = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def assert_error(response, status, words, *hidden):
    assert response.status_code == status, response.text
    message = response.json()["error"]["message"]
    assert words.lower() in message.lower(), message
    assert "\n" not in message and "Traceback" not in response.text
    for text in hidden:
        assert str(text) not in response.text, response.text


def test_lifecycle_of_a_finished_file(server, folders, tiny):
    """A finished file is followed until it stops growing: create, status, two questions (plain and SSE)
    equal to a LiveSession fed the same frames, list, delete (404 after), nothing left running."""
    from videoxl2.engine.live import LiveSession
    from videoxl2.video.live import iter_live_frames

    client, service = server
    root, _ = folders
    before = set(threading.enumerate())
    reply = client.post("/v1/streams", json={"source": str(root / "clip.mp4"), "model": "any"})
    assert reply.status_code == 201, reply.text
    created = reply.json()
    ident = created["id"]
    assert ident.startswith("stream-") and created["object"] == "stream"
    assert created["state"] in ("starting", "running", "ended") and created["fps"] == 1.0
    status = wait_for(client, ident, lambda s: s["state"] == "ended")
    assert status["frames_seen"] == 6 and status["seconds_seen"] == 5.0, status
    assert status["ended"] == "end of stream" and status["error"] is None
    assert status["memory_bytes"] > 0 and status["lag_s"] >= 0 and status["lag_p95_s"] is not None
    assert status["source"] == str(root / "clip.mp4")

    model, tokenizer = tiny
    expected_session = LiveSession(model, tokenizer, source="expected", progress=False)
    frames = list(iter_live_frames(str(root / "clip.mp4"), 1.0, follow_idle_s=0.1))
    expected_session.append(np.stack([f for f, _ in frames]), [t for _, t in frames])
    expected_session.finish()
    expected = expected_session.ask("What colour is shown?", generation_config={"max_new_tokens": 6})
    expected_session.close()

    first = ask(client, ident)
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["choices"][0]["message"]["content"] == expected.text
    stats = body["videoxl2"]
    assert stats["stream_id"] == ident and stats["seconds_seen"] == 5.0 and stats["frames_seen"] == 6
    assert stats["state"] == "ended" and stats["lag_s"] >= 0
    assert body["usage"]["completion_tokens"] == len(expected.token_ids)
    assert (
        body["usage"]["prompt_tokens"] == expected.stats["video_tokens"] + expected.stats["question_tokens"]
    )

    events = sse_events(ask(client, ident, stream=True, stream_options={"include_usage": True}))
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if "choices" in e)
    assert text == expected.text
    assert events[-1]["videoxl2"]["seconds_seen"] == 5.0 and events[-1]["usage"]["completion_tokens"] > 0

    listed = client.get("/v1/streams").json()
    assert [s["id"] for s in listed["data"]] == [ident] and listed["object"] == "list"
    assert client.get("/health").json()["streams"] == 1

    session = service.streams.get(ident).session
    deleted = client.delete(f"/v1/streams/{ident}")
    assert deleted.status_code == 200 and deleted.json() == {
        "id": ident, "object": "stream.deleted", "deleted": True,
    }  # fmt: skip
    assert session.prefill is None, "the session's memory was not freed"
    assert_error(client.get(f"/v1/streams/{ident}"), 404, "no stream")
    assert_error(client.delete(f"/v1/streams/{ident}"), 404, "no stream")
    assert_error(ask(client, ident), 404, "no stream")
    assert client.get("/v1/streams").json()["data"] == []
    assert extra_threads(before) == []
    assert multiprocessing.active_children() == []
    assert not any((service.scratch / "streams").iterdir()), "spill folder left behind"


def test_questions_while_the_stream_runs(server, folders):
    """A file still being written: asked once with half of it written and once with all of it, both while
    the stream is running; the second answer has seen more. DELETE stops a stream that would go on."""
    client, service = server
    root, _ = folders
    data = ts_bytes(8.0)
    path = root / "growing.ts"
    path.write_bytes(data[: len(data) // 2])
    service.settings.stream_follow_idle_s = 30.0  # only DELETE ends this one
    before = set(threading.enumerate())
    try:
        reply = client.post("/v1/streams", json={"source": f"file://{path}"})
    finally:
        service.settings.stream_follow_idle_s = 0.5
    assert reply.status_code == 201, reply.text
    ident = reply.json()["id"]
    wait_for(client, ident, lambda s: s["frames_seen"] >= 2)
    first = ask(client, ident)
    assert first.status_code == 200, first.text
    early = first.json()["videoxl2"]
    assert early["state"] == "running" and 1.0 <= early["seconds_seen"] < 5.0, early

    with open(path, "ab") as handle:
        handle.write(data[len(data) // 2 :])
    wait_for(client, ident, lambda s: s["seconds_seen"] >= 6.0)
    events = sse_events(ask(client, ident, stream=True))
    late = events[-1]["videoxl2"]
    assert late["state"] == "running" and late["seconds_seen"] >= 6.0 > early["seconds_seen"]
    assert late["frames_seen"] > early["frames_seen"]
    assert client.get(f"/v1/streams/{ident}").json()["state"] == "running"

    start = time.monotonic()
    assert client.delete(f"/v1/streams/{ident}").status_code == 200
    assert time.monotonic() - start < 10, "DELETE waited for the follow timeout instead of stopping"
    assert extra_threads(before) == []
    assert multiprocessing.active_children() == []


def test_stream_limits_and_unready_streams(server, folders):
    """At most --max-streams at once (429 beyond, any state counts until deleted); a stream with no frame
    yet answers 409; stream conversations refuse per-request sampling and engine fields."""
    client, service = server
    root, _ = folders
    (root / "empty.ts").write_bytes(b"")
    before = set(threading.enumerate())
    service.settings.stream_follow_idle_s = 30.0
    try:
        empty = client.post("/v1/streams", json={"source": str(root / "empty.ts")})
        clip = client.post("/v1/streams", json={"source": str(root / "clip.mp4"), "mode": "chunked"})
    finally:
        service.settings.stream_follow_idle_s = 0.5
    assert empty.status_code == 201 and clip.status_code == 201, (empty.text, clip.text)
    empty_id, clip_id = empty.json()["id"], clip.json()["id"]
    assert clip.json()["mode"] == "chunked"
    assert_error(
        client.post("/v1/streams", json={"source": str(root / "clip.mp4")}), 429, "at most 2 streams"
    )

    assert_error(ask(client, empty_id), 409, "no frames yet")
    assert_error(ask(client, "stream-nope"), 404, "no stream 'stream-nope'")
    wait_for(client, clip_id, lambda s: s["frames_seen"] > 0)
    assert_error(ask(client, clip_id, mode="bilevel", max_frames=8), 400, "mode, max_frames")
    both = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "video_stream", "stream_id": clip_id},
                    {"type": "video_url", "video_url": {"url": f"file://{root}/clip.mp4"}},
                    {"type": "text", "text": "Which?"},
                ],
            }
        ]
    }
    assert_error(client.post("/v1/chat/completions", json=both), 400, "exactly one")

    assert client.delete(f"/v1/streams/{empty_id}").status_code == 200  # blocked in its open: stops
    again = client.post("/v1/streams", json={"source": str(root / "clip.mp4")})
    assert again.status_code == 201, again.text
    for ident in (clip_id, again.json()["id"]):
        assert client.delete(f"/v1/streams/{ident}").status_code == 200
    assert extra_threads(before) == []
    assert client.post("/v1/streams", json={"source": str(root / "clip.mp4")}, headers={
        "Authorization": "Bearer wrong"}).status_code == 401  # fmt: skip


def test_bad_and_disallowed_sources(server, folders):
    """Refused in one line with the right 4xx, never naming a path the server resolved."""
    client, _ = server
    root, outside = folders

    def create(source, **extra):
        return client.post("/v1/streams", json={"source": source, **extra})

    hidden = (root, outside, "/tmp", "pytest-")
    assert_error(create("-"), 400, "standard input")
    assert_error(create("/etc/passwd"), 403, "outside the server's media roots", *hidden, "/etc")
    assert_error(create(f"{root}/../private/secret.mp4"), 403, "outside", outside)
    assert_error(create(f"file://{root}/link.mp4"), 403, "outside", *hidden)
    assert_error(create(f"{root}/missing.ts"), 404, "no such file", *hidden)
    assert_error(create("clip.mp4"), 400, "absolute path")
    assert_error(create("rtsp://camera.example/live"), 403, "rtsp:// streams are not allowed")
    assert_error(create("concat:a.ts|b.ts"), 400, "unsupported scheme 'concat'")
    assert_error(create("file://elsewhere/clip.mp4"), 400, "another host")
    assert_error(create(f"{root}/clip.mp4\\..\\x"), 400, "backslashes")
    assert_error(create(f"{root}/clip.mp4", fps=30), 400, "over this server's limit")
    assert_error(create(f"{root}/clip.mp4", fps=0), 400, "fps")
    assert_error(create(f"{root}/clip.mp4", colour="red"), 400, "colour")
    assert_error(create(f"{root}/clip.mp4", mode="sparse"), 400, "mode")

    # A file that is there but is no video: the create call cannot know at once; the stream fails.
    reply = create(f"file://{root}/notavideo.ts")
    assert reply.status_code == 201, reply.text
    ident = reply.json()["id"]
    status = wait_for(client, ident, lambda s: s["state"] in ("failed", "ended"))
    assert status["state"] == "failed" and status["frames_seen"] == 0, status
    assert "notavideo.ts" in status["error"] and "\n" not in status["error"]
    assert_error(ask(client, ident), 409, "reader failed")
    assert client.delete(f"/v1/streams/{ident}").status_code == 200


def test_url_allow_list():
    root = StreamPolicy([], frozenset({"tcp", "rtsp"}), frozenset({"127.0.0.1", "Cams.Example"}))
    assert resolve_source("rtsp://cams.example:554/live", root) == "rtsp://cams.example:554/live"
    assert resolve_source("tcp://127.0.0.1:9000", root) == "tcp://127.0.0.1:9000"
    for source, status, words in [
        ("tcp://localhost:9000", 403, "host 'localhost'"),
        ("tcp://127.0.0.1@evil.example:9000", 403, "host 'evil.example'"),
        ("srt://127.0.0.1:9000", 403, "allowed: rtsp, tcp"),
        ("rtsp:///live", 400, "no host"),
        ("/videos/a.ts", 403, "no --media-root"),
    ]:
        with pytest.raises(ServeError) as caught:
            resolve_source(source, root)
        assert caught.value.status == status and words in caught.value.message, caught.value.message
    with pytest.raises(Exception, match="unknown scheme 'gopher'"):
        StreamPolicy([], frozenset({"gopher"}))


def test_an_allowed_url_is_watched_and_shutdown_stops_every_stream(tiny, tiny_checkpoint, folders):
    """A tcp:// producer on loopback (scheme and host allowed at start) is watched to its end; a second
    stream (a file still followed) is running when the app shuts down: both stopped, threads joined."""
    root, _ = folders
    data = ts_bytes(4.0)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def produce():
        connection, _ = listener.accept()
        with connection:
            for start in range(0, len(data), 4096):
                connection.sendall(data[start : start + 4096])
                time.sleep(0.01)

    producer = threading.Thread(target=produce)
    producer.start()
    (root / "forever.ts").write_bytes(ts_bytes(6.0))
    service = make_service(
        tiny, tiny_checkpoint, root, stream_url_schemes=["tcp"], stream_hosts=["127.0.0.1"],
        stream_follow_idle_s=30.0,
    )  # fmt: skip
    before = set(threading.enumerate())
    try:
        with TestClient(create_app(service)) as client:
            client.headers.update(AUTH)
            assert_error(
                client.post("/v1/streams", json={"source": f"tcp://localhost:{port}"}), 403, "stream-hosts"
            )
            remote = client.post("/v1/streams", json={"source": f"tcp://127.0.0.1:{port}"})
            assert remote.status_code == 201, remote.text
            status = wait_for(client, remote.json()["id"], lambda s: s["state"] != "running" and
                              s["state"] != "starting")  # fmt: skip
            assert status["state"] == "ended" and status["seconds_seen"] == 3.0, status
            reply = ask(client, remote.json()["id"])
            assert reply.status_code == 200 and reply.json()["videoxl2"]["frames_seen"] == 4
            follow = client.post("/v1/streams", json={"source": str(root / "forever.ts")})
            assert follow.status_code == 201, follow.text
            wait_for(client, follow.json()["id"], lambda s: s["frames_seen"] >= 2)
            sessions = [stream.session for stream in service.streams.list()]
            start = time.monotonic()
        assert time.monotonic() - start < 10, "shutdown waited for the follow timeout"
        assert len(service.streams) == 0 and all(s.prefill is None for s in sessions)
        assert extra_threads(before) == []
        assert multiprocessing.active_children() == []
    finally:
        service.close()
        producer.join(timeout=10)
        listener.close()


def test_memory_limit_stops_the_stream_and_keeps_what_it_saw(server, folders):
    client, service = server
    root, _ = folders
    service.settings.stream_max_memory = 1000
    try:
        reply = client.post("/v1/streams", json={"source": str(root / "clip.mp4")})
    finally:
        service.settings.stream_max_memory = None
    assert reply.status_code == 201, reply.text
    ident = reply.json()["id"]
    status = wait_for(client, ident, lambda s: s["state"] in ("failed", "ended"))
    assert status["state"] == "failed" and "memory limit" in status["error"], status
    assert status["memory_limit_bytes"] == 1000 and status["memory_bytes"] > 1000
    assert status["frames_seen"] > 0
    answer = ask(client, ident)
    assert answer.status_code == 200, answer.text  # what was seen before the limit still answers
    assert client.delete(f"/v1/streams/{ident}").status_code == 200


def test_a_file_url_error_names_the_clients_path_not_the_resolved_one(server, folders):
    client, _ = server
    root, _ = folders
    (root / "sub").mkdir(exist_ok=True)
    alias = root / "sub" / "alias.mp4"
    if not alias.exists():
        os.symlink(root / "notavideo.ts", alias)
    body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "video_url", "video_url": {"url": f"file://{alias}"}},
                    {"type": "text", "text": "What?"},
                ],
            }
        ],
        "max_tokens": 2,
    }
    reply = client.post("/v1/chat/completions", json=body)
    assert reply.status_code == 422, reply.text
    assert "alias.mp4" in reply.text and "notavideo.ts" not in reply.text, reply.text


def test_stream_flags():
    import argparse

    from videoxl2.errors import InputError
    from videoxl2.serve.command import add_serve_arguments, stream_settings

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(
        ["--stream-url-schemes", "rtsp, srt", "--stream-hosts", "cam1.lan,10.0.0.7", "--max-streams", "3",
         "--stream-max-memory", "512MiB", "--stream-dense-horizon", "60"]
    )  # fmt: skip
    assert stream_settings(args) == dict(
        max_streams=3, stream_url_schemes=["rtsp", "srt"], stream_hosts=["cam1.lan", "10.0.0.7"],
        stream_max_memory=512 * 2**20, stream_dense_horizon=60.0, stream_max_fps=4.0,
        stream_follow_idle_s=2.0,
    )  # fmt: skip
    defaults = stream_settings(parser.parse_args([]))
    assert defaults["stream_url_schemes"] == [] and defaults["stream_hosts"] == []
    assert defaults["max_streams"] == 2 and defaults["stream_max_memory"] is None
    for bad, words in [
        (["--stream-url-schemes", "rtsp,gopher"], "unknown scheme 'gopher'"),
        (["--stream-max-memory", "lots"], "--stream-max-memory 'lots'"),
        (["--stream-max-fps", "0"], "--stream-max-fps"),
    ]:
        with pytest.raises(InputError, match=words):
            stream_settings(parser.parse_args(bad))


def test_delete_while_an_answer_holds_the_stream_frees_it_after(server, folders):
    """DELETE takes the stream out at once and joins its reader; the memory an answer in progress still
    reads is freed when that answer lets go, not under it."""
    client, service = server
    root, _ = folders
    ident = client.post("/v1/streams", json={"source": str(root / "clip.mp4")}).json()["id"]
    wait_for(client, ident, lambda s: s["frames_seen"] > 0)
    held = service.streams.acquire(ident)  # what the worker does around `ask`
    assert client.delete(f"/v1/streams/{ident}").status_code == 200
    assert held.ingest.done.is_set() and held.session.prefill is not None
    assert_error(ask(client, ident), 404, "no stream")
    with held.session.snapshot() as view:  # still readable by its holder
        assert view.stats["frames_seen"] > 0
    held.release()
    assert held.session.prefill is None and not held.spill_dir.exists()
