"""The HTTP face: OpenAI-style /v1/chat/completions (plain and server-sent events), /v1/models, /health,
and /v1/streams (live sources watched in the background, see streams.py).

Every failure is a JSON `{"error": {...}}` with a 4xx/5xx status; nothing a client sends reaches it as a
stack trace, and one bad request never stops the server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from .errors import ServeError
from .media import size_text
from .schemas import ChatRequest, StreamRequest
from .service import Job, VideoChatService

log = logging.getLogger("videoxl2.serve")


def conversation(request: ChatRequest) -> Job:
    """The one video, image or live stream of the conversation, its earlier turns and the question."""
    media, turns = [], []
    for number, message in enumerate(request.messages):
        if message.role == "system":
            continue  # the model has its own fixed system prompt (see docs/serving.md)
        parts = [] if isinstance(message.content, str) else message.content
        text = message.content if isinstance(message.content, str) else ""
        text = text or "\n".join(p.text for p in parts if p.type == "text")
        for part in parts:
            if part.type in ("video_url", "image_url"):
                if message.role != "user":
                    raise ServeError(400, f"messages[{number}]: media can only be in user messages")
                kind = part.type.split("_")[0]
                media.append((getattr(part, part.type).url, kind))
            elif part.type == "video_stream":
                if message.role != "user":
                    raise ServeError(400, f"messages[{number}]: media can only be in user messages")
                media.append((part.stream_id, "stream"))
        turns.append((message.role, text.strip()))
    if len(media) != 1:
        raise ServeError(
            400,
            "a conversation needs exactly one video_url or image_url part (or one video_stream), "
            f"found {len(media)}",
        )
    fixed = request.video_fields_set()
    if media[0][1] == "stream" and fixed:
        raise ServeError(
            400, f"{', '.join(fixed)}: a video_stream is sampled and pre-filled with the settings given "
            "when it was created (POST /v1/streams); remove them here",
        )  # fmt: skip
    roles = [role for role, _ in turns]
    if roles != ["user", "assistant"] * (len(roles) // 2) + ["user"]:
        raise ServeError(
            400, "messages must alternate user/assistant, starting and ending with a user message"
        )
    if not turns[-1][1]:
        raise ServeError(400, "the last user message has no text question")
    history = [(turns[i][1], turns[i + 1][1]) for i in range(0, len(turns) - 1, 2)]
    if media[0][1] == "stream":
        return Job(
            media_url="",
            media_kind="stream",
            question=turns[-1][1],
            history=history,
            generation=request.generation(),
            stream_id=media[0][0],
        )
    return Job(
        media_url=media[0][0],
        media_kind=media[0][1],
        question=turns[-1][1],
        history=history,
        max_frames=request.max_frames,
        sample_fps=request.sample_fps,
        max_sample_fps=request.max_sample_fps,
        engine=request.engine(),
        generation=request.generation(),
    )


def create_app(service: VideoChatService) -> FastAPI:
    settings = service.settings

    @asynccontextmanager
    async def lifespan(_app):
        yield
        service.streams.close()  # every stream stopped and its reader joined before the server exits

    app = FastAPI(title="videoxl2", version="0.1.0", lifespan=lifespan)
    app.state.service = service

    @app.exception_handler(ServeError)
    async def serve_error(_request, err: ServeError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_request, err: RequestValidationError):
        problems = []
        for item in err.errors()[:5]:
            where = ".".join(str(x) for x in item.get("loc", ()) if x != "body") or "body"
            problems.append(f"{where}: {item.get('msg')}")
        return JSONResponse(
            ServeError(400, "invalid request: " + "; ".join(problems)).body(), status_code=400
        )

    @app.exception_handler(Exception)
    async def unexpected(_request, err: Exception):
        log.exception("unexpected error")
        return JSONResponse(ServeError(500, f"internal error ({type(err).__name__})").body(), status_code=500)

    limit = settings.max_upload_bytes * 4 // 3 + 2**20  # base64 of the largest upload, plus the JSON

    # A plain ASGI middleware, not @app.middleware("http"): Starlette's BaseHTTPMiddleware wraps `receive` so
    # that Request.is_disconnected() never sees the client leave, and abandoned jobs would run to the end.
    app.add_middleware(BodyLimit, limit=limit, max_upload_bytes=settings.max_upload_bytes)

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), settings.api_key):
            raise ServeError(401, "missing or wrong API key (send Authorization: Bearer KEY)")

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "model": service.model_id,
            "busy": service.busy,
            "cached_videos": len(service.cache),
            "streams": len(service.streams),
        }

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        return {
            "object": "list",
            "data": [{"id": service.model_id, "object": "model", "owned_by": "videoxl2"}],
        }

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat(body: ChatRequest, request: Request):
        job = conversation(body)
        if job.stream_id is not None:
            service.streams.check_answerable(job.stream_id)  # 404 / 409 now, before queueing
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        cancel = threading.Event()
        service.admit()  # 429 now, before any response starts
        if body.stream:
            events = stream_events(service, job, cancel, ident, created, body)
            return StreamingResponse(events, media_type="text/event-stream")
        task = asyncio.ensure_future(service.submit(job, None, cancel, admitted=True))
        while not task.done():
            await asyncio.wait({task}, timeout=0.5)
            if not task.done() and await request.is_disconnected():
                cancel.set()
                task.cancel()
                return JSONResponse(ServeError(499, "client closed the request").body(), status_code=499)
        result = task.result()
        return {
            "id": ident,
            "object": "chat.completion",
            "created": created,
            "model": service.model_id,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": result["text"]},
                    "finish_reason": result["finish_reason"],
                }
            ],
            "usage": usage(result),
            "videoxl2": result["stats"],
        }

    # Plain `def` handlers run in a thread pool: DELETE waits for a reader thread, which must not hold the
    # event loop up.
    @app.post("/v1/streams", status_code=201, dependencies=[Depends(authorize)])
    def create_stream(body: StreamRequest):
        return service.streams.create(body.source, body.fps, body.engine()).status()

    @app.get("/v1/streams", dependencies=[Depends(authorize)])
    def list_streams():
        return {"object": "list", "data": [stream.status() for stream in service.streams.list()]}

    @app.get("/v1/streams/{ident}", dependencies=[Depends(authorize)])
    def stream_status(ident: str):
        return service.streams.get(ident).status()

    @app.delete("/v1/streams/{ident}", dependencies=[Depends(authorize)])
    def delete_stream(ident: str):
        service.streams.delete(ident)
        return {"id": ident, "object": "stream.deleted", "deleted": True}

    return app


class BodyLimit:
    """413 for a request body over the limit, before the app reads it: at once when its declared length is
    too large, else (chunked upload) as soon as the bytes received pass the limit; the app then gets the body
    buffered here."""

    def __init__(self, app, limit: int, max_upload_bytes: int):
        self.app, self.limit, self.max_upload_bytes = app, limit, max_upload_bytes

    async def refuse(self, scope, receive, send) -> None:
        error = ServeError(
            413, f"request body over the server's {size_text(self.max_upload_bytes)} upload limit"
        )
        await JSONResponse(error.body(), status_code=413)(scope, receive, send)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit():
            if int(length) > self.limit:
                return await self.refuse(scope, receive, send)
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left while sending
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self.refuse(scope, receive, send)
            if not message.get("more_body", False):
                break
        pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)


def usage(result: dict) -> dict:
    prompt, completion = result["prompt_tokens"], result["completion_tokens"]
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def stream_events(service, job, cancel, ident, created, body):
    """OpenAI chunk events: the role, text deltas as tokens come, a last chunk with the finish reason (and
    usage when asked), then [DONE]. If the client leaves, the job is cancelled and its slot freed."""
    loop = asyncio.get_running_loop()
    deltas: asyncio.Queue[str] = asyncio.Queue()

    def chunk(delta: dict, finish=None, **extra) -> str:
        data = {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": created,
            "model": service.model_id,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            **extra,
        }
        return f"data: {json.dumps(data)}\n\n"

    def on_text(delta: str) -> None:
        loop.call_soon_threadsafe(deltas.put_nowait, delta)

    task = asyncio.ensure_future(service.submit(job, on_text, cancel, admitted=True))
    streamed = ""
    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            getter = asyncio.ensure_future(deltas.get())
            done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                streamed += getter.result()
                yield chunk({"content": getter.result()})
                continue
            getter.cancel()
            while not deltas.empty():
                delta = deltas.get_nowait()
                streamed += delta
                yield chunk({"content": delta})
            break
        try:
            result = task.result()
        except ServeError as err:
            yield f"data: {json.dumps(err.body())}\n\n"
            yield "data: [DONE]\n\n"
            return
        text = result["text"]
        if text.startswith(streamed) and len(text) > len(streamed):
            yield chunk({"content": text[len(streamed) :]})
        extra = {"videoxl2": result["stats"]}
        if body.stream_options is not None and body.stream_options.include_usage:
            extra["usage"] = usage(result)
        yield chunk({}, result["finish_reason"], **extra)
        yield "data: [DONE]\n\n"
    finally:
        if not task.done():
            cancel.set()
