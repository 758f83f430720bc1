"""The request body of POST /v1/chat/completions: OpenAI's chat format, plus our sampling and engine fields
(send them with the openai client's `extra_body`)."""

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


Part = Annotated[TextPart | VideoPart | ImagePart, Field(discriminator="type")]


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[Part]


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

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
    # Engine (EngineSettings); unset fields keep the model config's values.
    mode: Literal["dense", "chunked", "bilevel"] | None = None
    block_size: int | None = Field(default=None, ge=1)
    prev_blocks: int | None = Field(default=None, ge=0)
    unit_size: int | None = Field(default=None, ge=1)
    topk: int | None = Field(default=None, ge=0)
    compression: int | None = Field(default=None, ge=1)
    rerotate: bool | None = None
    kv_dtype: Literal["auto", "int8"] | None = None

    def engine(self) -> dict:
        names = ("mode", "block_size", "prev_blocks", "unit_size", "topk", "compression", "rerotate")
        names += ("kv_dtype",)
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def generation(self) -> dict:
        out: dict = {"max_new_tokens": self.max_completion_tokens or self.max_tokens or 256}
        if self.temperature:
            out.update(do_sample=True, temperature=self.temperature)
            if self.top_p is not None:
                out["top_p"] = self.top_p
            if self.seed is not None:
                out["seed"] = self.seed
        return out
