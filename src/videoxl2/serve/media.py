"""Turning a request's media URL into a local file, without letting a client read what it should not.

- `file://` paths must resolve (symlinks and `..` followed) inside one of the configured media roots;
  with no root configured, `file://` is refused.
- `data:<mime>;base64,...` uploads are size-capped before decoding and written to a private scratch folder.
- `http(s)://` is refused unless the server was started with remote URLs allowed (then size-capped too).
"""

from __future__ import annotations

import base64
import binascii
import os
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

from .errors import ServeError

SUFFIXES = {
    "video/mp4": ".mp4", "video/webm": ".webm", "video/quicktime": ".mov", "video/x-matroska": ".mkv",
    "video/x-msvideo": ".avi", "video/mpeg": ".mpg", "image/png": ".png", "image/jpeg": ".jpg",
    "image/jpg": ".jpg", "image/webp": ".webp", "image/gif": ".gif", "image/bmp": ".bmp",
}  # fmt: skip


def size_text(count: int) -> str:
    """Bytes as people read them in an error message: 64 MiB, 29.3 KiB."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.3g} {unit}"
    return f"{count} bytes"


@dataclass
class MediaPolicy:
    roots: list[Path] = field(default_factory=list)
    allow_remote: bool = False
    max_upload_bytes: int = 64 * 2**20

    def __post_init__(self):
        self.roots = [Path(r).resolve() for r in self.roots]


def resolve_media(url: str, kind: str, policy: MediaPolicy, scratch: Path) -> Path:
    """A local file for `url` (`kind` is "video" or "image"); uploads and downloads land in `scratch`."""
    scheme = urlparse(url).scheme.lower()
    if scheme == "file":
        return _local_file(unquote(urlparse(url).path), policy)
    if scheme == "data":
        return _data_url(url, kind, policy, scratch)
    if scheme in ("http", "https"):
        if not policy.allow_remote:
            raise ServeError(
                403, f"{kind}_url: http(s) URLs are disabled on this server (--allow-remote-urls)"
            )
        return _download(url, kind, policy, scratch)
    raise ServeError(
        400, f"{kind}_url: unsupported URL scheme {scheme or '(none)'!r}; use file://, data: or https://"
    )


def _local_file(path: str, policy: MediaPolicy) -> Path:
    if not policy.roots:
        raise ServeError(403, "file:// URLs are disabled: the server has no --media-root")
    real = Path(path).resolve()
    if not any(real.is_relative_to(root) for root in policy.roots):
        raise ServeError(403, f"file://{path} is outside the server's media roots")
    if not real.is_file():
        raise ServeError(404, f"file://{path}: no such file")
    return real


def _data_url(url: str, kind: str, policy: MediaPolicy, scratch: Path) -> Path:
    header, _, payload = url.partition(",")
    mime = header[5:].split(";")[0].strip().lower()
    if not header.endswith(";base64") or not mime.startswith(kind + "/"):
        raise ServeError(400, f"{kind}_url: expected data:{kind}/<type>;base64,<data>, got {header[:40]!r}")
    if len(payload) * 3 // 4 > policy.max_upload_bytes:
        raise ServeError(413, f"upload over the server's {size_text(policy.max_upload_bytes)} limit")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ServeError(400, f"{kind}_url: invalid base64 data ({err})") from err
    return _write(scratch, data, SUFFIXES.get(mime, ".bin"))


def _download(url: str, kind: str, policy: MediaPolicy, scratch: Path) -> Path:
    suffix = Path(urlparse(url).path).suffix or ".bin"
    try:
        with urllib.request.urlopen(url, timeout=30) as response:  # noqa: S310 (scheme checked above)
            data = response.read(policy.max_upload_bytes + 1)
    except OSError as err:
        raise ServeError(400, f"{kind}_url: could not download {url}: {err}") from err
    if len(data) > policy.max_upload_bytes:
        raise ServeError(413, f"{url}: over the server's {size_text(policy.max_upload_bytes)} limit")
    return _write(scratch, data, suffix)


def _write(scratch: Path, data: bytes, suffix: str) -> Path:
    scratch.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, name = tempfile.mkstemp(dir=scratch, suffix=suffix)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    return Path(name)
