"""Live streams behind the API: POST /v1/streams starts watching a source in the background (a `LiveIngest`
feeding a `LiveSession`), chat completions that name the stream answer from what it has seen so far, and
DELETE stops it, joins its thread and frees its memory.

Sources are held to the same rules as media, and stricter: a path (or file:// URL) must resolve inside a
media root; a URL only when both its scheme and its host were allowed when the server started (none are by
default); standard input never. No message a client gets names a path the server resolved: a source is
always called by the text the client sent.
"""

from __future__ import annotations

import functools
import logging
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

from ..errors import InputError, MemoryBudgetError, VideoXL2Error
from .errors import ServeError, from_library_error
from .media import size_text

log = logging.getLogger("videoxl2.serve")

JOIN_S = 30.0  # how long DELETE / shutdown wait for an ingest thread to let go (one block's pre-fill at most)
UNSAFE = set("\\\r\n\t ")  # characters FFmpeg and Python may split a URL on differently


@dataclass
class StreamPolicy:
    """What POST /v1/streams may open: files inside `roots`, URLs whose scheme is in `schemes` and whose
    host is in `hosts` (both empty by default: no remote streams)."""

    roots: list[Path] = field(default_factory=list)
    schemes: frozenset[str] = frozenset()
    hosts: frozenset[str] = frozenset()

    def __post_init__(self):
        from ..video.live import URL_SCHEMES

        self.roots = [Path(r).resolve() for r in self.roots]
        self.schemes = frozenset(s.strip().lower() for s in self.schemes if s.strip())
        self.hosts = frozenset(h.strip().lower() for h in self.hosts if h.strip())
        unknown = sorted(self.schemes - URL_SCHEMES)
        if unknown:
            raise InputError(
                f"--stream-url-schemes: unknown scheme {unknown[0]!r}; use {', '.join(sorted(URL_SCHEMES))}"
            )


def resolve_source(source: str, policy: StreamPolicy) -> str:
    """What the reader opens for `source` (a resolved local path, or the URL itself); a ServeError in one
    line otherwise, naming the rule but never a server path."""
    from ..video.live import URL_SCHEMES

    if source.strip() == "-":
        raise ServeError(400, "source: standard input cannot be streamed over HTTP")
    if any(ch in UNSAFE or ord(ch) < 32 for ch in source):
        raise ServeError(400, "source: whitespace, control characters and backslashes are not allowed")
    parsed = urlparse(source)
    scheme = parsed.scheme.lower()
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ServeError(400, "source: a file:// URL cannot name another host")
        return _local_source(unquote(parsed.path), policy)
    if not scheme:
        return _local_source(source, policy)
    if scheme not in URL_SCHEMES:
        raise ServeError(
            400,
            f"source: unsupported scheme {scheme!r}; use a path or file:// URL inside the media roots, or "
            f"one of {', '.join(sorted(URL_SCHEMES))}",
        )
    if scheme not in policy.schemes:
        allowed = ", ".join(sorted(policy.schemes)) or "none"
        raise ServeError(
            403, f"source: {scheme}:// streams are not allowed on this server (allowed: {allowed}; "
            "--stream-url-schemes)",
        )  # fmt: skip
    try:
        host = (parsed.hostname or "").lower()
    except ValueError:
        host = ""
    if not host:
        raise ServeError(400, "source: the URL names no host")
    if host not in policy.hosts:
        raise ServeError(403, f"source: host {host!r} is not on this server's --stream-hosts list")
    return source


def _local_source(path: str, policy: StreamPolicy) -> str:
    if not policy.roots:
        raise ServeError(403, "source: local files are disabled: the server has no --media-root")
    if not Path(path).is_absolute():
        raise ServeError(400, "source: a local source must be an absolute path or a file:// URL")
    real = Path(path).resolve()
    if not any(real.is_relative_to(root) for root in policy.roots):
        raise ServeError(403, "source: outside the server's media roots")
    if not real.is_file():
        raise ServeError(404, "source: no such file in the server's media roots")
    return str(real)


class LiveStream:
    """One stream the server watches: its session, the ingest thread feeding it, and who is using it.

    An answer in progress holds the stream (`users`); DELETE takes it out of the table at once, stops and
    joins the reader, and the memory is freed when the last answer using it ends."""

    def __init__(self, ident: str, source: str, opened: str, fps: float, session, ingest, spill_dir: Path):
        self.id, self.source, self.opened, self.fps = ident, source, opened, fps
        self.session, self.ingest, self.spill_dir = session, ingest, spill_dir
        self.created = int(time.time())
        self.users = 0
        self.retired = False
        self._lock = threading.Lock()

    def scrub(self, text: str | None) -> str | None:
        """`text` with the server's own names for this source replaced by the client's."""
        if text is None:
            return None
        if self.opened != self.source:
            text = text.replace(self.opened, self.source)
        return text.replace(str(self.spill_dir), "the stream's spill folder")

    def status(self) -> dict:
        status = dict(self.ingest.status())
        limit = self.session.memory_limit or getattr(self.session, "max_memory", None)
        return {
            "id": self.id,
            "object": "stream",
            "created": self.created,
            "source": self.source,
            "fps": self.fps,
            "mode": self.session.settings.mode,
            "state": status.get("state"),
            "seconds_seen": status.get("seconds_seen"),
            "frames_seen": status.get("frames_seen"),
            "lag_s": status.get("lag_s"),
            "lag_p50_s": status.get("lag_p50_s"),
            "lag_p95_s": status.get("lag_p95_s"),
            "memory_bytes": status.get("memory_bytes"),
            "memory_limit_bytes": limit,
            "ended": self.scrub(status.get("ended") or None),
            "error": self.scrub(status.get("error")),
        }

    def acquire(self) -> bool:
        with self._lock:
            if self.retired:
                return False
            self.users += 1
            return True

    def release(self) -> None:
        with self._lock:
            self.users -= 1
            last = self.retired and self.users == 0
        if last:
            self._free()

    def retire(self) -> None:
        """Stop reading, wait for the reader, and free the memory (now, or when the last answer ends)."""
        self.ingest.stop()
        self.ingest.join(timeout=JOIN_S)
        if not self.ingest.done.is_set():
            log.warning("stream %s: the reader did not stop within %.0f s", self.id, JOIN_S)
        for thread in (getattr(self.ingest, "_appender", None), getattr(self.ingest, "_reader", None)):
            if isinstance(thread, threading.Thread) and thread is not threading.current_thread():
                thread.join(timeout=1.0)  # `done` is set just before the thread returns: let it return
        with self._lock:
            self.retired = True
            idle = self.users == 0
        if idle:
            self._free()

    def _free(self) -> None:
        try:
            self.session.close()
        finally:
            shutil.rmtree(self.spill_dir, ignore_errors=True)


@functools.cache
def limited_session_class():
    """LiveSession that, given a `memory_limit` (where the engine could not take the limit as its own
    bound), stops taking frames once its memory is over it: the append that crosses it is kept, the reader
    fails with "memory limit", and what was seen still answers."""
    from ..engine.live import LiveSession

    class LimitedLiveSession(LiveSession):
        memory_limit: int | None = None

        def append(self, frames, timestamps):
            result = super().append(frames, timestamps)
            limit = self.memory_limit
            if limit is not None:
                held = self.memory_bytes()
                if held > limit:
                    raise MemoryBudgetError(
                        f"memory limit: the stream holds {size_text(held)} of KV, over this server's "
                        f"{size_text(limit)} per stream (--stream-max-memory); it stopped reading",
                        needed=held,
                        available=limit,
                    )
            return result

    return LimitedLiveSession


class StreamManager:
    """The streams of one server: created, listed, answered from and deleted by id, at most `max_streams`
    at once (any state counts until it is deleted: an ended stream still holds its memory)."""

    def __init__(self, service):
        settings = service.settings
        self.service = service
        self.policy = StreamPolicy(
            [Path(r) for r in settings.media_roots],
            frozenset(settings.stream_url_schemes),
            frozenset(settings.stream_hosts),
        )
        self.max_streams = settings.max_streams
        self._streams: dict[str, LiveStream] = {}
        self._reserved = 0
        self._lock = threading.Lock()
        self._closed = False

    def __len__(self) -> int:
        return len(self._streams)

    def create(self, source: str, fps: float, engine: dict) -> LiveStream:
        from ..engine.live import LiveIngest

        settings = self.service.settings
        if fps > settings.stream_max_fps:
            raise ServeError(400, f"fps {fps:g} is over this server's limit of {settings.stream_max_fps:g}")
        opened = resolve_source(source, self.policy)
        with self._lock:
            if self._closed:
                raise ServeError(503, "server is shutting down")
            if len(self._streams) + self._reserved >= self.max_streams:
                raise ServeError(
                    429, f"this server watches at most {self.max_streams} streams at once; delete one "
                    "(DELETE /v1/streams/ID) or retry later",
                )  # fmt: skip
            self._reserved += 1
        ident = f"stream-{uuid.uuid4().hex[:24]}"
        spill_dir = self.service.scratch / "streams" / ident
        session = None
        try:
            spill_dir.mkdir(parents=True, mode=0o700)
            session = self._session(source, engine, spill_dir)
            ingest = LiveIngest(
                session, opened, fps=fps, follow_idle_s=settings.stream_follow_idle_s,
                threads=settings.decode_threads,
            )  # fmt: skip
            stream = LiveStream(ident, source, opened, fps, session, ingest, spill_dir)
            ingest.start()
        except VideoXL2Error as err:
            if session is not None:
                session.close()
            shutil.rmtree(spill_dir, ignore_errors=True)
            raise from_library_error(err) from err
        except BaseException:
            if session is not None:
                session.close()
            shutil.rmtree(spill_dir, ignore_errors=True)
            raise
        finally:
            with self._lock:
                self._reserved -= 1
        with self._lock:
            self._streams[ident] = stream
        return stream

    def _session(self, source: str, engine: dict, spill_dir: Path):
        """A LiveSession in bounded mode when the server asked for it. Where the engine cannot bound its
        memory to --stream-max-memory (no spilling), the limit is still enforced: the stream stops reading
        once it is over it (LimitedLiveSession)."""
        from ..engine.settings import EngineSettings

        settings, model = self.service.settings, self.service.model
        make = limited_session_class()
        kwargs = dict(
            settings=EngineSettings.from_config(model.config, **engine), source=source, progress=False,
            dense_horizon=settings.stream_dense_horizon, spill_dir=spill_dir,
        )  # fmt: skip
        limit = settings.stream_max_memory
        try:
            return make(model, self.service.tokenizer, max_memory=limit, **kwargs)
        except InputError as err:
            if limit is None or settings.stream_dense_horizon is not None:
                raise
            log.info("streams: max_memory not taken by the live engine (%s); enforcing it by stopping", err)
        session = make(model, self.service.tokenizer, **kwargs)
        session.memory_limit = limit  # the engine keeps everything: stop reading once over the limit
        return session

    def get(self, ident: str) -> LiveStream:
        stream = self._streams.get(ident)
        if stream is None:
            raise ServeError(404, f"no stream {ident!r} (it never existed or was deleted)")
        return stream

    def list(self) -> list[LiveStream]:
        with self._lock:
            return list(self._streams.values())

    def check_answerable(self, ident: str) -> LiveStream:
        """404 for an unknown stream, 409 for one that has seen no frame yet (nothing to answer from)."""
        stream = self.get(ident)
        if stream.session.frames_seen == 0:
            status = stream.status()
            why = f"; its reader failed: {status['error']}" if status["state"] == "failed" else ""
            raise ServeError(
                409, f"stream {ident!r} has seen no frames yet (state {status['state']}){why}; retry shortly",
                code="stream_not_ready",
            )  # fmt: skip
        return stream

    def acquire(self, ident: str) -> LiveStream:
        stream = self.check_answerable(ident)
        if not stream.acquire():
            raise ServeError(404, f"no stream {ident!r} (it was deleted)")
        return stream

    def delete(self, ident: str) -> None:
        with self._lock:
            stream = self._streams.pop(ident, None)
        if stream is None:
            raise ServeError(404, f"no stream {ident!r} (it never existed or was deleted)")
        stream.retire()

    def close(self) -> None:
        """Stop every stream and join its reader (server shutdown); idempotent."""
        with self._lock:
            self._closed = True
            streams = list(self._streams.values())
            self._streams.clear()
        for stream in streams:
            stream.ingest.stop()  # all of them first, so their readers wind down together
        for stream in streams:
            try:
                stream.retire()
            except Exception:  # one stream that fails to close must not keep the others open
                log.exception("stream %s: error while closing", stream.id)
