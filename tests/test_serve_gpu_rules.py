"""Serving under pressure: a client that leaves stops its pre-fill within one block and its reader with it;
out of memory is a 503 that empties the cache, and the server goes on."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

pytest.importorskip("fastapi", reason="serving needs the serve extra")

from serve_helpers import running_server  # noqa: E402

from videoxl2.engine.prefill import StreamingPrefill  # noqa: E402
from videoxl2.engine.session import VideoSession  # noqa: E402
from videoxl2.errors import Cancelled  # noqa: E402
from videoxl2.serve.api import create_app  # noqa: E402
from videoxl2.serve.service import Job, ServeSettings, VideoChatService  # noqa: E402
from videoxl2.video.synthetic import write_synthetic_video  # noqa: E402


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    write_synthetic_video(root / "long.mp4", num_frames=128, fps=4.0, seed=3)
    write_synthetic_video(root / "short.mp4", num_frames=16, fps=4.0, seed=4)
    return root


@pytest.fixture
def service(tiny, tiny_checkpoint, media):
    model, tokenizer = tiny
    settings = ServeSettings(model=str(tiny_checkpoint), media_roots=[str(media)], cache_bytes=2**30)
    service = VideoChatService(settings, model=model, tokenizer=tokenizer)
    yield service
    service.close()


def _reader_threads():
    return [t for t in threading.enumerate() if t.name.startswith("videoxl2-reader")]


def test_a_cancelled_request_stops_prefill_within_one_block(service, media, monkeypatch):
    """The client goes away during pre-fill (the API sets the request's cancel event): at most one more
    block runs, the reader thread is gone, and nothing is cached."""
    blocks, cancel = [], threading.Event()
    real = StreamingPrefill.add_groups

    def counted(self, embeds):
        blocks.append(embeds.shape[0])
        if len(blocks) == 3:
            cancel.set()  # as api.py does when the connection drops
        return real(self, embeds)

    monkeypatch.setattr(StreamingPrefill, "add_groups", counted)
    job = Job(f"file://{media / 'long.mp4'}", "video", "What is shown?", max_frames=128, sample_fps=4.0,
              engine={"mode": "chunked", "block_size": 1})  # fmt: skip
    with pytest.raises(Cancelled):
        service.answer(job, cancel=cancel)
    assert len(blocks) == 3, f"{len(blocks)} blocks ran; the cancel came during block 3 of 32"
    assert not _reader_threads()
    assert len(service.cache) == 0


def test_an_abandoned_http_request_frees_its_worker(tiny, tiny_checkpoint, media, monkeypatch):
    model, tokenizer = tiny
    settings = ServeSettings(model=str(tiny_checkpoint), media_roots=[str(media)], max_queue=2)
    service = VideoChatService(settings, model=model, tokenizer=tokenizer)
    started, blocks = threading.Event(), []
    real = StreamingPrefill.add_groups

    def slow(self, embeds):
        blocks.append(time.monotonic())
        started.set()
        time.sleep(0.05)
        return real(self, embeds)

    monkeypatch.setattr(StreamingPrefill, "add_groups", slow)
    body = {
        "model": "any", "max_tokens": 4, "max_frames": 128, "sample_fps": 4.0,
        "mode": "chunked", "block_size": 1,
        "messages": [{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": f"file://{media / 'long.mp4'}"}},
            {"type": "text", "text": "What is shown?"}]}],
    }  # fmt: skip
    with running_server(create_app(service)) as url:
        with httpx.Client(timeout=30) as client:
            with pytest.raises(httpx.ReadTimeout):
                client.post(url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(30, read=0.5))
        assert started.is_set()
        deadline = time.monotonic() + 20
        while service.busy and time.monotonic() < deadline:
            time.sleep(0.05)
        assert service.busy == 0, "the abandoned request still holds the model"
        assert len(blocks) < 32, "pre-fill ran to the end for a client that had left"
        assert not _reader_threads()
    service.close()


def test_out_of_memory_is_a_503_that_empties_the_cache(service, media, monkeypatch):
    import torch

    def question(path):
        return {
            "model": "any", "max_tokens": 4, "max_frames": 16,
            "messages": [{"role": "user", "content": [
                {"type": "video_url", "video_url": {"url": f"file://{path}"}},
                {"type": "text", "text": "What is shown?"}]}],
        }  # fmt: skip

    real_ask = VideoSession.ask
    failures = [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")]

    def ask_once_out_of_memory(self, *args, **kwargs):
        if failures:
            raise failures.pop()
        return real_ask(self, *args, **kwargs)

    with running_server(create_app(service)) as url:
        assert httpx.post(url + "/v1/chat/completions", json=question(media / "short.mp4")).status_code == 200
        assert len(service.cache) == 1
        monkeypatch.setattr(VideoSession, "ask", ask_once_out_of_memory)
        reply = httpx.post(url + "/v1/chat/completions", json=question(media / "long.mp4"), timeout=60)
        assert reply.status_code == 503, reply.text
        assert "out of memory" in reply.json()["error"]["message"]
        assert len(service.cache) == 0
        again = httpx.post(url + "/v1/chat/completions", json=question(media / "short.mp4"), timeout=60)
        assert again.status_code == 200 and again.json()["choices"][0]["message"]["content"] is not None


def test_the_cache_budget_defaults_from_free_memory(tiny, tiny_checkpoint):
    from videoxl2.engine.budget import available_bytes

    model, tokenizer = tiny
    service = VideoChatService(ServeSettings(model=str(tiny_checkpoint)), model=model, tokenizer=tokenizer)
    free = available_bytes("cpu")
    assert abs(service.cache.max_bytes - free // 2) <= 0.1 * free  # RAM moves a little between the reads
    service.close()
