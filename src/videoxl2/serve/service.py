"""The model behind the API and the UI: one worker thread runs one question at a time (the model is not
re-entrant and a CPU has no spare cores to share), a bounded number of requests may wait, and pre-filled
videos are cached so follow-up questions skip decoding and pre-fill. Live streams (`streams.py`) pre-fill in
their own reader threads; questions about them queue for the same worker."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

from ..errors import Cancelled, VideoXL2Error
from .cache import SessionCache, file_digest
from .errors import ServeError, from_library_error
from .media import MediaPolicy, resolve_media


@dataclass
class ServeSettings:
    model: str
    device: str = "cpu"
    dtype: str | None = None
    quantize: str | None = None  # weight-only "int8" / "int4" through torchao (load_model's quantize=)
    quantize_vision: bool = False
    device_map: str | dict | None = None  # weights spread or offloaded by accelerate (load_model's)
    offload_folder: str | None = None
    media_roots: list[str] = field(default_factory=list)
    api_key: str | None = None
    max_queue: int = 8  # requests admitted at once (running + waiting); more get 429
    cache_bytes: int | None = None  # None: half the memory free on the model's device once it is loaded
    allow_remote_urls: bool = False
    max_upload_bytes: int = 64 * 2**20
    timeout_s: float = 300.0
    max_frames_limit: int = 2048  # the most frames one request may ask for
    decode_threads: int | None = None  # how videos are read (the frames are the same either way)
    decode_workers: int = 1
    # Live streams (POST /v1/streams): how many at once, which URLs may be watched, memory per stream.
    max_streams: int = 2
    stream_url_schemes: list[str] = field(default_factory=list)  # e.g. ["rtsp", "srt"]; none by default
    stream_hosts: list[str] = field(default_factory=list)  # hosts those URLs may name; none by default
    stream_max_memory: int | None = None  # KV bytes one stream may hold (LiveSession's max_memory)
    stream_dense_horizon: float | None = None  # seconds of dense KV kept in memory (bounded mode)
    stream_max_fps: float = 4.0  # the most frames per stream second a stream may ask for
    stream_follow_idle_s: float = 2.0  # a followed file that has not grown for this long has ended


def default_cache_bytes(model) -> int:
    """Half the memory still free on the model's device (GPU memory on CUDA, RAM on CPU), at least 256 MiB:
    a fixed budget is either smaller than one long video's memory or more than a small card has."""
    from ..engine.budget import available_bytes

    free = available_bytes(model.get_input_embeddings().weight.device)
    return max(256 * 2**20, int(free or 0) // 2)


@dataclass
class Job:
    """One question: the conversation's media, earlier turns, and the settings to answer with."""

    media_url: str
    media_kind: str  # "video" | "image"
    question: str
    history: list[tuple[str, str]] = field(default_factory=list)
    max_frames: int = 512
    sample_fps: float | None = 1.0
    max_sample_fps: float | None = None
    engine: dict = field(default_factory=dict)
    generation: dict = field(default_factory=dict)
    local_path: Path | None = None  # set by the in-process UI only: a file it already holds, no URL checks
    stream_id: str | None = None  # a live stream (POST /v1/streams) instead of media_url


class VideoChatService:
    def __init__(self, settings: ServeSettings, model=None, tokenizer=None):
        from .. import load_model, load_tokenizer

        self.settings = settings
        if model is None:
            model = load_model(
                settings.model,
                settings.device,
                settings.dtype,
                quantize=settings.quantize,
                quantize_vision=settings.quantize_vision,
                device_map=settings.device_map,
                offload_folder=settings.offload_folder,
            )
        self.model = model
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(settings.model)
        self.model_id = Path(settings.model).name or "videoxl2"
        self.policy = MediaPolicy(
            [Path(r) for r in settings.media_roots], settings.allow_remote_urls, settings.max_upload_bytes
        )
        self.cache = SessionCache(
            default_cache_bytes(self.model) if settings.cache_bytes is None else settings.cache_bytes
        )
        self.scratch = Path(tempfile.mkdtemp(prefix="videoxl2-serve-"))
        from .streams import StreamManager

        self.streams = StreamManager(self)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="videoxl2-model")
        self._admitted = 0
        self._lock = threading.Lock()

    @property
    def busy(self) -> int:
        return self._admitted

    def close(self) -> None:
        """Stop every stream (joining its reader), then the worker; idempotent."""
        self.streams.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
        shutil.rmtree(self.scratch, ignore_errors=True)

    # -- admission -------------------------------------------------------------------------------------
    def admit(self) -> None:
        with self._lock:
            if self._admitted >= self.settings.max_queue:
                raise ServeError(
                    429, f"server busy: {self._admitted} requests queued or running; retry later"
                )
            self._admitted += 1

    def _release(self) -> None:
        with self._lock:
            self._admitted -= 1

    async def submit(
        self, job: Job, on_text=None, cancel: threading.Event | None = None, admitted: bool = False
    ) -> dict:
        """Queue `job` for the worker; raises ServeError 429 when full (unless the caller already called
        `admit`), 504 after the timeout."""
        cancel = cancel or threading.Event()
        if not admitted:
            self.admit()
        loop = asyncio.get_running_loop()
        queued = time.perf_counter()
        try:
            future = loop.run_in_executor(self._executor, self._run, job, on_text, cancel, queued)
        except RuntimeError:  # executor shut down
            self._release()
            raise ServeError(503, "server is shutting down") from None
        # A job given up on (timeout, client gone) still ends in the worker; its outcome is nobody's to read.
        future.add_done_callback(lambda done: done.cancelled() or done.exception())
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.settings.timeout_s)
        except asyncio.TimeoutError:
            cancel.set()
            raise ServeError(
                504, f"no answer within the server's {self.settings.timeout_s:g} s limit"
            ) from None
        except asyncio.CancelledError:
            cancel.set()  # the client went away: the worker drops the job at its next step
            raise

    # -- the worker ------------------------------------------------------------------------------------
    def _run(self, job: Job, on_text, cancel: threading.Event, queued: float) -> dict:
        import torch

        try:
            if cancel.is_set():
                raise Cancelled("request cancelled before it started")
            return self.answer(job, on_text, cancel, time.perf_counter() - queued)
        except Cancelled:
            raise
        except VideoXL2Error as err:
            raise from_library_error(err) from err
        except (torch.OutOfMemoryError, MemoryError) as err:
            raise self._out_of_memory() from err
        finally:
            self._release()

    def _out_of_memory(self) -> ServeError:
        """Free what the server holds (cached sessions, the allocator's cache) so the next request can run."""
        import gc

        import torch

        self.cache.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return ServeError(
            503, "out of memory answering this request; the video cache was emptied: retry, or ask for "
            "fewer frames (max_frames)",
        )  # fmt: skip

    def answer(
        self, job: Job, on_text=None, cancel: threading.Event | None = None, queue_s: float = 0.0
    ) -> dict:
        """Answer `job` now, in this thread (the worker, or a caller that owns the model)."""
        import torch

        from ..engine.session import VideoSession
        from ..engine.settings import EngineSettings

        if job.stream_id is not None:
            return self.answer_stream(job, on_text, cancel, queue_s)
        start = time.perf_counter()
        if job.local_path is not None:
            path = Path(job.local_path)
        else:
            path = resolve_media(job.media_url, job.media_kind, self.policy, self.scratch)
        try:
            if job.max_frames > self.settings.max_frames_limit:
                raise ServeError(400, f"max_frames {job.max_frames} is over this server's limit of "
                                      f"{self.settings.max_frames_limit}")  # fmt: skip
            engine = EngineSettings.from_config(self.model.config, **job.engine)
            sampling = (job.max_frames, job.sample_fps, job.max_sample_fps)
            key = (file_digest(path), job.media_kind, sampling, dataclasses.astuple(engine), self.model_id)
            session = self.cache.get(key)
            hit = session is not None
            with torch.inference_mode():
                if not hit:
                    session = VideoSession.from_path(
                        self.model, self.tokenizer, path, job.max_frames, job.sample_fps, job.max_sample_fps,
                        settings=engine, progress=False, decode_threads=self.settings.decode_threads,
                        decode_workers=self.settings.decode_workers,
                    )  # fmt: skip
                    session.prefill(cancel=cancel)
                    self.cache.put(key, session)
                prepared = time.perf_counter()
                on_token = self._streamer(on_text, cancel, job.generation)
                answer = session.ask(job.question, job.history, job.generation, on_token=on_token)
        except VideoXL2Error as err:
            # Never tell a client where the server keeps its files: an upload is "the uploaded video", a
            # file:// path is the one the client sent, not what it resolved to (symlinks, `..`).
            if path.is_relative_to(self.scratch):
                err.args = (str(err).replace(str(path), f"the uploaded {job.media_kind}"),)
            elif job.local_path is None and urlparse(job.media_url).scheme.lower() == "file":
                err.args = (str(err).replace(str(path), unquote(urlparse(job.media_url).path)),)
            raise
        finally:
            if path.is_relative_to(self.scratch):
                path.unlink(missing_ok=True)
        stats = answer.stats
        timings = dict(queue_s=queue_s, prepare_s=prepared - start)
        extra = dict(cache_hit=hit, frames=stats["frames"], groups=stats["groups"])
        return _result(answer, job, session.layout.video_end, extra, timings, start)

    def answer_stream(
        self, job: Job, on_text=None, cancel: threading.Event | None = None, queue_s: float = 0.0
    ) -> dict:
        """Answer `job` from what its live stream has seen so far; the reader keeps appending meanwhile
        (the session answers from a consistent snapshot)."""
        import torch

        start = time.perf_counter()
        stream = self.streams.acquire(job.stream_id)
        try:
            status = stream.ingest.status()
            on_token = self._streamer(on_text, cancel, job.generation)
            with torch.inference_mode():
                answer = stream.session.ask(job.question, job.history, job.generation, on_token=on_token)
        except VideoXL2Error as err:
            err.args = (stream.scrub(str(err)),)
            raise
        finally:
            stream.release()
        stats = answer.stats
        extra = dict(
            stream_id=stream.id,
            seconds_seen=float(stats["seconds_seen"]),
            frames_seen=int(stats["frames_seen"]),
            lag_s=status.get("lag_s"),
            state=status.get("state"),
            frames=stats.get("frames", stats["frames_seen"]),
            groups=stats.get("groups"),
        )
        video_tokens = stats.get("video_tokens", stats["kv_tokens"])
        return _result(answer, job, video_tokens, extra, dict(queue_s=queue_s), start)

    def _streamer(self, on_text, cancel: threading.Event | None, generation: dict):
        """An `on_token` hook: stops on cancel and passes text deltas on. Each text is the answer so far as
        `decode_answer` will give it at the end, so the deltas always join to exactly the answer's text."""
        from ..generation import GenerationSettings, decode_answer

        settings = GenerationSettings.from_dict(generation)
        generated: list[int] = []
        sent = ""

        def on_token(token: int) -> None:
            nonlocal sent
            if cancel is not None and cancel.is_set():
                raise Cancelled("request cancelled while answering")
            if on_text is None:
                return
            generated.append(token)
            text = decode_answer(self.tokenizer, generated, settings, partial=True)
            if text.startswith(sent) and len(text) > len(sent):
                on_text(text[len(sent) :])
                sent = text

        return on_token


def _result(answer, job: Job, video_tokens: int, extra: dict, timings: dict, start: float) -> dict:
    """What an answer returns to the API: text, finish reason, token counts and the `videoxl2` stats
    (`extra`: what a file video or a live stream adds; `timings`: seconds before the answer began)."""
    stats = answer.stats
    max_new = int(job.generation.get("max_new_tokens", 256))
    units = [
        {k: u.get(k) for k in ("index", "start_seconds", "end_seconds", "dense", "score")}
        for u in stats.get("units", [])
    ]
    seconds = {**timings, "answer_s": stats["answer_s"], "total_s": time.perf_counter() - start}
    return dict(
        text=answer.text,
        finish_reason="length" if stats["new_tokens"] >= max_new else "stop",
        prompt_tokens=int(video_tokens + stats["question_tokens"]),
        completion_tokens=int(stats["new_tokens"]),
        stats=dict(
            **extra,
            mode=stats["mode"],
            kv_tokens=stats["kv_tokens"],
            kv_bytes=stats["kv_bytes"],
            dense_kv_bytes=stats.get("dense_kv_bytes"),
            selected_units=[u for u in units if u["dense"]] if stats["mode"] == "bilevel" else [],
            units=units,
            timings={key: round(value, 4) for key, value in seconds.items()},
        ),
    )
