"""Inputs shared by the engine's tests: exactness cases and live MPEG-TS streams."""

from __future__ import annotations

import torch


def engine_case(tiny, question: str, seconds_per_group: float, seed: int, groups: int = 13):
    """A tiny model, its tokenizer, the token layout of `groups` video groups and random visual embeddings:
    the input of the engine's exactness tests."""
    from videoxl2.prompt import build_layout, build_prompt

    model, tokenizer = tiny
    config = model.config
    layout = build_layout(
        tokenizer,
        build_prompt(question),
        [i * seconds_per_group for i in range(groups)],
        config.tokens_per_group,
        config.video_token_id,
    )
    embeds = torch.randn(
        groups, config.tokens_per_group, config.hidden_size, generator=torch.Generator().manual_seed(seed)
    )
    return model, tokenizer, layout, embeds


def mpegts_bytes(seconds: float, fps: int, size: int, picture) -> bytes:
    """An MPEG-TS stream (what `ffmpeg ... -f mpegts -` sends): `picture(i)` is frame i, (size, size, 3)
    uint8 RGB, at i / fps seconds (millisecond time base)."""
    import io
    from fractions import Fraction

    import av

    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mpegts") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        for index in range(int(seconds * fps)):
            frame = av.VideoFrame.from_ndarray(picture(index), format="rgb24")
            frame.pts, frame.time_base = round(index * 1000 / fps), Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


# 18 groups: 5 units of 4 (the last short), so a bi-level cache mixes dense and pooled units
BUDGET_FRAMES = 72


def tiny_session(tiny, settings, frames: int = BUDGET_FRAMES):
    """A `VideoSession` of the tiny model over `frames` random frames two per second (byte-count tests)."""
    import numpy as np

    from videoxl2.engine.session import VideoSession

    model, tokenizer = tiny
    size = model.config.vision_config.image_size
    pixels = np.random.default_rng(0).integers(0, 256, (frames, size, size, 3), dtype=np.uint8)
    seconds = [i * 0.5 for i in range(frames)]
    return VideoSession.from_frames(model, tokenizer, pixels, seconds, settings=settings, progress=False)
