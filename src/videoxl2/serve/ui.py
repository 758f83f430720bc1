"""The web UI (Gradio): pick or upload a video, chat about it with streamed answers, and see where the model
looked (the relevance timeline) and what it cost (the engine's figures) beside each answer.

It talks to the same VideoChatService as the API, in-process, so it shares the worker and the video cache.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from .errors import ServeError
from .service import Job, VideoChatService

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


def synthetic_video(folder: Path) -> str:
    """The demo's synthetic needle video (three coloured shapes in a grey haystack), for trying the UI."""
    from ..data.synthetic import write_video
    from ..demo.run import demo_spec

    return str(write_video(demo_spec(96, 1.0, seed=0), folder / "synthetic-needles.mp4"))


def build_ui(service: VideoChatService):
    import asyncio

    import gradio as gr

    from ..demo.timeline import plot_timeline

    scratch = Path(tempfile.mkdtemp(prefix="videoxl2-ui-", dir=service.scratch))

    async def respond(video, question, history, mode, max_frames):
        history = list(history or [])
        question = (question or "").strip()
        if not video:
            raise gr.Error("Choose or upload a video first.")
        if not question:
            raise gr.Error("Type a question.")
        turns = [(history[i]["content"], history[i + 1]["content"]) for i in range(0, len(history) - 1, 2)]
        path = Path(video)
        job = Job(
            media_url=path.as_uri(),
            media_kind="image" if path.suffix.lower() in IMAGE_SUFFIXES else "video",
            question=question,
            history=turns,
            max_frames=int(max_frames),
            engine={"mode": mode},
            generation={"max_new_tokens": 128},
            local_path=path,
        )
        history += [{"role": "user", "content": question}, {"role": "assistant", "content": ""}]
        deltas: asyncio.Queue[str] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(
            service.submit(job, lambda d: loop.call_soon_threadsafe(deltas.put_nowait, d))
        )
        yield history, "", None, None
        while not task.done() or not deltas.empty():
            getter = asyncio.ensure_future(deltas.get())
            done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                history[-1]["content"] += getter.result()
                yield history, "", None, None
            else:
                getter.cancel()
        try:
            result = task.result()
        except ServeError as err:
            history[-1]["content"] = f"[error {err.status}] {err.message}"
            yield history, "", None, None
            return
        history[-1]["content"] = result["text"]
        stats = result["stats"]
        picture = plot_timeline(
            stats["units"], scratch / f"timeline-{len(history)}.png", title=f"{mode}: {question[:60]}"
        )
        shown = {k: v for k, v in stats.items() if k != "units"}
        yield history, "", str(picture), shown

    with gr.Blocks(title="videoxl2") as ui:
        gr.Markdown(f"## videoxl2 · {service.model_id}\nAsk questions about a video; answers stream in.")
        with gr.Row():
            with gr.Column(scale=1):
                # A file box, not a player: browsers play few of the codecs PyAV reads (MPEG-4, HEVC, ...).
                video = gr.File(label="video or image", file_types=["video", "image"], elem_id="video")
                example = gr.Button("Use a synthetic needle video", elem_id="use-synthetic")
                mode = gr.Radio(["dense", "chunked", "bilevel"], value="bilevel", label="engine mode")
                max_frames = gr.Slider(4, 1024, value=256, step=4, label="max frames")
            with gr.Column(scale=2):
                chat = gr.Chatbot(label="chat", elem_id="chat", height=360)
                question = gr.Textbox(
                    label="question", placeholder="What was the first shape shown?", elem_id="question"
                )
                ask = gr.Button("Ask", variant="primary", elem_id="ask")
                clear = gr.Button("New conversation")
        with gr.Row():
            timeline = gr.Image(label="relevance timeline (orange: kept dense)", elem_id="timeline")
            stats = gr.JSON(label="stats", elem_id="stats")

        example.click(lambda: synthetic_video(scratch), outputs=video)
        outputs = [chat, question, timeline, stats]
        ask.click(respond, [video, question, chat, mode, max_frames], outputs)
        question.submit(respond, [video, question, chat, mode, max_frames], outputs)
        clear.click(lambda: ([], "", None, None), outputs=outputs)
    return ui
