"""Limits and safety of the server: every bad request gets the right 4xx/429/504 as JSON, and the server
keeps answering afterwards."""

from __future__ import annotations

import base64
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytest.importorskip("fastapi", reason="serving needs the serve extra")

from serve_helpers import running_server  # noqa: E402

from videoxl2.serve.api import create_app  # noqa: E402
from videoxl2.serve.service import ServeSettings, VideoChatService  # noqa: E402
from videoxl2.video.synthetic import write_synthetic_video  # noqa: E402

KEY = "s3cret"
CAPACITY = 3


@pytest.fixture(scope="module")
def setup(tiny, tiny_checkpoint, tmp_path_factory):
    base = tmp_path_factory.mktemp("serve")
    root, outside = base / "media", base / "private"
    root.mkdir()
    outside.mkdir()
    write_synthetic_video(root / "clip.mp4", num_frames=16, fps=4.0, seed=3)
    write_synthetic_video(outside / "secret.mp4", num_frames=16, fps=4.0, seed=4)
    os.symlink(outside / "secret.mp4", root / "link.mp4")
    (root / "notavideo.mp4").write_bytes(b"this is not a video")
    model, tokenizer = tiny
    settings = ServeSettings(
        model=str(tiny_checkpoint), media_roots=[str(root)], api_key=KEY, max_queue=CAPACITY,
        max_upload_bytes=30_000, timeout_s=1.5,
    )  # fmt: skip
    service = VideoChatService(settings, model=model, tokenizer=tokenizer)
    with running_server(create_app(service)) as url:
        yield url, root, outside, service
    service.close()


def body(url, question="What is shown?", **extra):
    return {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "video_url", "video_url": {"url": url}},
                    {"type": "text", "text": question},
                ],
            }
        ],
        "max_tokens": 4,
        **extra,
    }


def post(base, payload, key=KEY, **kwargs):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(base + "/v1/chat/completions", json=payload, headers=headers, timeout=30, **kwargs)


def assert_error(response, status, words):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert words.lower() in error["message"].lower(), error
    assert "Traceback" not in response.text


def assert_still_answers(base, root):
    response = post(base, body(f"file://{root}/clip.mp4"))
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] is not None


def test_paths_outside_the_media_root_are_refused(setup):
    base, root, outside, _ = setup
    assert_error(post(base, body("file:///etc/passwd")), 403, "outside the server's media roots")
    assert_error(post(base, body(f"file://{root}/../private/secret.mp4")), 403, "outside")
    assert_error(post(base, body(f"file://{root}/link.mp4")), 403, "outside")
    assert_error(post(base, body(f"file://{root}/missing.mp4")), 404, "no such file")
    assert_still_answers(base, root)


def test_remote_urls_uploads_and_bad_media(setup):
    base, root, _, _ = setup
    assert_error(post(base, body("http://example.com/v.mp4")), 403, "disabled")
    assert_error(post(base, body("ftp://example.com/v.mp4")), 400, "unsupported url scheme")
    big = base64.b64encode(os.urandom(40_000)).decode()
    assert_error(post(base, body(f"data:video/mp4;base64,{big}")), 413, "limit")

    def chunked():  # no Content-Length: the cap must hold while the body streams in
        payload = json.dumps(body(f"data:video/mp4;base64,{'A' * 3_000_000}")).encode()
        for start in range(0, len(payload), 65536):
            yield payload[start : start + 65536]

    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    response = httpx.post(base + "/v1/chat/completions", content=chunked(), headers=headers, timeout=30)
    assert_error(response, 413, "request body over")  # refused by the stream cap, not after parsing
    small = json.dumps(body(f"file://{root}/clip.mp4")).encode()
    response = httpx.post(
        base + "/v1/chat/completions", content=iter([small[:50], small[50:]]), headers=headers
    )
    assert response.status_code == 200, response.text  # a small chunked body is passed on whole
    small = base64.b64encode(os.urandom(1000)).decode()
    assert_error(post(base, body(f"data:image/png;base64,{small}")), 400, "expected data:video")
    assert_error(post(base, body(f"file://{root}/notavideo.mp4")), 422, "notavideo.mp4")
    reply = post(base, body(f"data:video/mp4;base64,{base64.b64encode(b'not a video' * 20).decode()}"))
    assert_error(reply, 422, "the uploaded video: not a video file")
    assert "/tmp" not in reply.text and "videoxl2-serve" not in reply.text, reply.text  # no server paths
    assert_still_answers(base, root)


def test_api_key_is_required(setup):
    base, root, _, _ = setup
    assert_error(post(base, body(f"file://{root}/clip.mp4"), key="wrong"), 401, "api key")
    assert_error(post(base, body(f"file://{root}/clip.mp4"), key=None), 401, "api key")
    assert httpx.get(base + "/v1/models").status_code == 401
    assert httpx.get(base + "/health").status_code == 200
    assert_still_answers(base, root)


def test_malformed_and_invalid_bodies(setup):
    base, root, _, _ = setup
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    response = httpx.post(base + "/v1/chat/completions", content=b'{"messages": [', headers=headers)
    assert_error(response, 400, "invalid request")
    assert_error(post(base, {"messages": []}), 400, "messages")
    assert_error(post(base, body(f"file://{root}/clip.mp4", mode="sparse")), 400, "mode")
    assert_error(post(base, body(f"file://{root}/clip.mp4", frobnicate=1)), 400, "frobnicate")
    assert_error(post(base, body(f"file://{root}/clip.mp4", max_tokens=0)), 400, "max_tokens")
    text_only = {"messages": [{"role": "user", "content": "hello"}]}
    assert_error(post(base, text_only), 400, "exactly one video_url or image_url")
    two = body(f"file://{root}/clip.mp4")
    two["messages"] += [{"role": "user", "content": "again?"}]
    assert_error(post(base, two), 400, "alternate")
    assert_still_answers(base, root)


def block_worker(service):
    """Occupy the model's one worker thread until the returned event is set."""
    release = threading.Event()
    started = threading.Event()
    service._executor.submit(lambda: (started.set(), release.wait(30)))
    started.wait(5)
    return release


def test_twice_the_queue_capacity_at_once_gets_429_for_the_excess(setup):
    base, root, _, service = setup
    release = block_worker(service)
    try:
        with ThreadPoolExecutor(2 * CAPACITY) as pool:
            futures = [pool.submit(post, base, body(f"file://{root}/clip.mp4")) for _ in range(2 * CAPACITY)]
            # The excess is answered at once with 429, while the admitted ones wait for the worker.
            threading.Event().wait(0.5)
            early = sorted(f.result().status_code for f in futures if f.done())
            release.set()
            statuses = sorted(f.result(timeout=60).status_code for f in futures)
    finally:
        release.set()
    assert early == [429] * CAPACITY, early
    assert statuses == [200] * CAPACITY + [429] * CAPACITY, statuses
    assert_still_answers(base, root)
    assert service.busy == 0


def test_a_request_over_the_time_limit_gets_504_and_frees_its_slot(setup):
    base, root, _, service = setup
    release = block_worker(service)
    try:
        assert_error(post(base, body(f"file://{root}/clip.mp4")), 504, "limit")
    finally:
        release.set()
    assert_still_answers(base, root)
    threading.Event().wait(0.2)
    assert service.busy == 0


def test_a_client_that_disconnects_frees_its_slot_and_its_job_is_dropped(setup):
    """The client gives up while its request waits: the server cancels the job (the worker skips it, so
    the video is never pre-filled) and the slot is free again."""
    base, root, _, service = setup
    write_synthetic_video(root / "fresh.mp4", num_frames=16, fps=4.0, seed=9)
    cached = len(service.cache)
    release = block_worker(service)
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                base + "/v1/chat/completions",
                json=body(f"file://{root}/fresh.mp4"),
                headers={"Authorization": f"Bearer {KEY}"},
                timeout=0.5,
            )
        threading.Event().wait(1.0)  # the server notices the closed connection within its 0.5 s poll
    finally:
        release.set()
    threading.Event().wait(0.5)
    assert service.busy == 0
    assert len(service.cache) == cached, "the abandoned request's video was pre-filled anyway"
    assert_still_answers(base, root)
