"""The OpenAI-compatible API, through the official `openai` client against a real server on loopback."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest
from PIL import Image

openai = pytest.importorskip("openai", reason="the API tests use the openai client (serve extra)")
pytest.importorskip("fastapi", reason="serving needs the serve extra")

from serve_helpers import running_server  # noqa: E402

from videoxl2.serve.api import create_app  # noqa: E402
from videoxl2.serve.service import ServeSettings, VideoChatService  # noqa: E402
from videoxl2.video.synthetic import write_synthetic_video  # noqa: E402

KEY = "test-key"


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    write_synthetic_video(root / "clip.mp4", num_frames=32, fps=4.0, seed=1)
    write_synthetic_video(root / "other.mp4", num_frames=16, fps=4.0, seed=2)
    Image.fromarray(np.full((48, 64, 3), (200, 30, 30), np.uint8)).save(root / "still.png")
    return root


@pytest.fixture(scope="module")
def server(tiny, tiny_checkpoint, media):
    model, tokenizer = tiny
    settings = ServeSettings(model=str(tiny_checkpoint), media_roots=[str(media)], api_key=KEY, max_queue=4)
    service = VideoChatService(settings, model=model, tokenizer=tokenizer)
    with running_server(create_app(service)) as url:
        yield url, service
    service.close()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0)


def video_message(path, question):
    return [
        {
            "role": "user",
            "content": [
                {"type": "video_url", "video_url": {"url": f"file://{path}"}},
                {"type": "text", "text": question},
            ],
        }
    ]


def test_answer_usage_stats_and_models(client, media, tiny):
    model, tokenizer = tiny
    reply = client.chat.completions.create(
        model="any", messages=video_message(media / "clip.mp4", "What is shown?"), max_tokens=8,
        extra_body={"max_frames": 16, "mode": "bilevel", "unit_size": 1, "topk": 1},
    )  # fmt: skip
    # The same question through the library directly gives the same (greedy) answer.
    from videoxl2.engine.session import VideoSession
    from videoxl2.engine.settings import EngineSettings

    engine = EngineSettings.from_config(model.config, mode="bilevel", unit_size=1, topk=1)
    session = VideoSession.from_path(
        model, tokenizer, media / "clip.mp4", 16, 1.0, settings=engine, progress=False
    )
    expected = session.ask("What is shown?", generation_config={"max_new_tokens": 8})
    choice = reply.choices[0]
    assert choice.message.content == expected.text and choice.message.role == "assistant"
    assert reply.usage.completion_tokens == len(expected.token_ids)
    assert reply.usage.prompt_tokens == session.layout.video_end + expected.stats["question_tokens"]
    stats = reply.model_extra["videoxl2"]
    assert stats["mode"] == "bilevel" and stats["kv_bytes"] == expected.stats["kv_bytes"]
    assert [u["index"] for u in stats["selected_units"]] == [
        u["index"] for u in expected.stats["units"] if u["dense"]
    ]
    assert all(u["end_seconds"] >= u["start_seconds"] for u in stats["selected_units"])
    assert [m.id for m in client.models.list().data] == ["model"]
    # `rerotate` reaches the engine: the answer is the library's at pre-fill positions.
    kept = client.chat.completions.create(
        model="any", messages=video_message(media / "clip.mp4", "What is shown?"), max_tokens=8,
        extra_body={"max_frames": 16, "mode": "bilevel", "unit_size": 1, "topk": 1, "rerotate": False},
    )  # fmt: skip
    session = VideoSession.from_path(
        model, tokenizer, media / "clip.mp4", 16, 1.0, settings=engine.with_overrides(rerotate=False),
        progress=False,
    )  # fmt: skip
    expected = session.ask("What is shown?", generation_config={"max_new_tokens": 8})
    assert kept.choices[0].message.content == expected.text


def test_stream_joins_to_the_plain_answer(client, media):
    messages = video_message(media / "other.mp4", "Describe the colours.")
    plain = client.chat.completions.create(model="m", messages=messages, max_tokens=12)
    chunks = list(
        client.chat.completions.create(
            model="m", messages=messages, max_tokens=12, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 2  # really streamed


def test_follow_up_hits_the_cache_and_is_faster(client, server, media, tmp_path):
    service = server[1]
    path = media / "clip.mp4"
    extra = {"max_frames": 32, "sample_fps": 4.0}
    first = client.chat.completions.create(
        model="m", messages=video_message(path, "First question?"), max_tokens=4, extra_body=extra
    )
    history = video_message(path, "First question?") + [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And a follow-up?"},
    ]
    second = client.chat.completions.create(model="m", messages=history, max_tokens=4, extra_body=extra)
    one, two = first.model_extra["videoxl2"], second.model_extra["videoxl2"]
    assert not one["cache_hit"] and two["cache_hit"]
    assert two["timings"]["prepare_s"] < one["timings"]["prepare_s"], (one["timings"], two["timings"])
    assert two["timings"]["total_s"] < one["timings"]["total_s"]
    assert service.cache.hits >= 1


def test_image_question_by_upload(client, media):
    data = base64.b64encode((media / "still.png").read_bytes()).decode()
    reply = client.chat.completions.create(
        model="m",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}},
                    {"type": "text", "text": "What colour is it?"},
                ],
            }
        ],
        max_tokens=6,
    )
    stats = reply.model_extra["videoxl2"]
    assert stats["frames"] == 1 and stats["groups"] == 1
    assert isinstance(reply.choices[0].message.content, str)


def test_health_is_open_and_reports(server):
    body = httpx.get(server[0] + "/health").json()
    assert body["status"] == "ok" and body["busy"] == 0
