"""The web UI in a real browser: headless Chromium (Debian's) driven by Playwright asks about a synthetic
video and finds the answer on the page; a screenshot is kept."""

from __future__ import annotations

import shutil

import pytest

gr = pytest.importorskip("gradio", reason="the UI needs the serve extra")
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (.ci/run installs Debian's)")

from serve_helpers import running_server  # noqa: E402

from videoxl2.serve.api import create_app  # noqa: E402
from videoxl2.serve.service import Job, ServeSettings, VideoChatService  # noqa: E402
from videoxl2.serve.ui import build_ui, synthetic_video  # noqa: E402

FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip


def test_ui_answers_a_question_about_a_synthetic_video(tiny, tiny_checkpoint, tmp_path):
    model, tokenizer = tiny
    service = VideoChatService(ServeSettings(model=str(tiny_checkpoint)), model=model, tokenizer=tokenizer)
    app = gr.mount_gradio_app(create_app(service), build_ui(service), path="/ui")
    question = "What was the first shape shown?"
    # The answer the UI must show: the same question, video and settings, asked directly.
    video = synthetic_video(tmp_path)
    expected = service.answer(
        Job(video, "video", question, max_frames=256, engine={"mode": "bilevel"},
            generation={"max_new_tokens": 128}, local_path=video)
    )["text"]  # fmt: skip
    assert expected
    try:
        with running_server(app) as url, sync_api.sync_playwright() as play:
            browser = play.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(url + "/ui/", wait_until="networkidle")
            page.click("#use-synthetic")
            page.wait_for_function(
                "document.querySelector('#video').innerText.includes('synthetic')", timeout=30_000
            )
            page.fill("#question textarea", question)
            page.click("#ask")
            page.wait_for_selector("#timeline img", timeout=60_000)
            chat = page.inner_text("#chat")
            shot = tmp_path / "ui.png"
            page.screenshot(path=str(shot), full_page=True)
            errors = page.locator(".toast-body").all_inner_texts()
            browser.close()
    finally:
        service.close()
    assert not errors, errors
    assert question in chat
    assert " ".join(expected.split()) in " ".join(chat.split()), (expected, chat)
    assert shot.stat().st_size > 10_000
