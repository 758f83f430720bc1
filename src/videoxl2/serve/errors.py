"""HTTP-facing errors: a status, an OpenAI-style error type and a message a client can act on."""

from __future__ import annotations

from ..errors import InputError, MediaNotFoundError, VideoDecodeError, VideoXL2Error


class ServeError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code or {
            400: "invalid_request",
            401: "invalid_api_key",
            403: "forbidden",
            404: "not_found",
            413: "payload_too_large",
            422: "unprocessable_media",
            429: "queue_full",
            503: "unavailable",
            504: "timeout",
        }.get(status, "error")

    @property
    def type(self) -> str:
        if self.status == 401:
            return "authentication_error"
        if self.status == 429:
            return "rate_limit_error"
        return "invalid_request_error" if self.status < 500 else "server_error"

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "code": self.code}}


def from_library_error(err: VideoXL2Error) -> ServeError:
    """Our typed errors mapped to statuses: bad input 400, missing media 404, undecodable media 422."""
    if isinstance(err, MediaNotFoundError):
        return ServeError(404, str(err))
    if isinstance(err, VideoDecodeError):
        return ServeError(422, str(err))
    if isinstance(err, InputError):
        return ServeError(400, str(err))
    return ServeError(400, str(err))
