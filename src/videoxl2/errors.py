"""Typed errors: every failure a user can cause maps to one of these, so the CLI can print one line and
the server can answer with a 4xx instead of a stack trace."""


class VideoXL2Error(Exception):
    """Base class of every error this package raises on purpose."""


class InputError(VideoXL2Error, ValueError):
    """A request the model cannot serve: empty question, prompt over the context, bad settings."""


class MediaNotFoundError(InputError, FileNotFoundError):
    """A video or image path that does not exist (or is not a file)."""


class VideoDecodeError(InputError):
    """A file that exists but is not a decodable video: wrong format, corrupt, truncated, no frames."""


class CheckpointError(VideoXL2Error):
    """A model directory that cannot be loaded: missing files, missing/unexpected/mis-shaped weights."""


class ConfigError(VideoXL2Error, ValueError):
    """An inconsistent model or engine configuration."""


class MemoryBudgetError(InputError):
    """A session whose estimated peak memory is over what the device has free: raised before any frame is
    decoded, naming how many frames would fit. `needed`/`available` are bytes, `frames_that_fit` a frame
    count (0 when even the smallest video does not fit)."""

    def __init__(self, message: str, needed: int = 0, available: int = 0, frames_that_fit: int = 0):
        super().__init__(message)
        self.needed = needed
        self.available = available
        self.frames_that_fit = frames_that_fit


class Cancelled(VideoXL2Error):
    """The caller stopped the work (a client went away, Ctrl-C, a timeout): nothing was kept."""
