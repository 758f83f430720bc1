"""Request bodies: POST /v1/chat/completions (OpenAI's chat format, plus our sampling and engine fields, sent
with the openai client's `extra_body`) and POST /v1/streams (a live source to watch)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class MediaUrl(BaseModel):
    url: str = Field(min_length=1)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class VideoPart(BaseModel):
    type: Literal["video_url"]
    video_url: MediaUrl


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: MediaUrl


class StreamPart(BaseModel):
    """A live stream started with POST /v1/streams: the answer comes from what it has seen so far."""

    type: Literal["video_stream"]
    stream_id: str = Field(min_length=1, max_length=200)


Part = Annotated[TextPart | VideoPart | ImagePart | StreamPart, Field(discriminator="type")]


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[Part]


class StreamOptions(BaseModel):
    include_usage: bool = False


ENGINE_FIELDS = ("mode", "block_size", "prev_blocks", "unit_size", "topk", "compression", "rerotate")
ENGINE_FIELDS += ("kv_dtype",)
SAMPLING_FIELDS = ("max_frames", "sample_fps", "max_sample_fps")


class EngineFields(BaseModel):
    """The engine's settings (EngineSettings); unset fields keep the model config's values."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["dense", "chunked", "bilevel"] | None = None
    block_size: int | None = Field(default=None, ge=1)
    prev_blocks: int | None = Field(default=None, ge=0)
    unit_size: int | None = Field(default=None, ge=1)
    topk: int | None = Field(default=None, ge=0)
    compression: int | None = Field(default=None, ge=1)
    rerotate: bool | None = None
    kv_dtype: Literal["auto", "int8"] | None = None

    def engine(self) -> dict:
        return {name: getattr(self, name) for name in ENGINE_FIELDS if getattr(self, name) is not None}


class ChatRequest(EngineFields):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=4096)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=4096)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=1)
    user: str | None = None
    # Sampling of the video (as `videoxl2 chat`).
    max_frames: int = Field(default=512, ge=1)
    sample_fps: float | None = Field(default=1.0, gt=0)
    max_sample_fps: float | None = Field(default=None, gt=0)

    def generation(self) -> dict:
        out: dict = {"max_new_tokens": self.max_completion_tokens or self.max_tokens or 256}
        if self.temperature:
            out.update(do_sample=True, temperature=self.temperature)
            if self.top_p is not None:
                out["top_p"] = self.top_p
            if self.seed is not None:
                out["seed"] = self.seed
        return out

    def video_fields_set(self) -> list[str]:
        """Engine and sampling fields the client sent: a stream has its own (fixed when it was created)."""
        return [name for name in ENGINE_FIELDS + SAMPLING_FIELDS if name in self.model_fields_set]


class StreamRequest(EngineFields):
    """POST /v1/streams: a source (a path or file:// URL inside the media roots, or an allowed URL), the
    frames sampled per stream second, and the engine settings every question about it will use."""

    source: str = Field(min_length=1, max_length=4096)
    fps: float = Field(default=1.0, gt=0)
    model: str | None = None
