"""Synthetic long-video data: needle videos and question families with exact answers."""

from .synthetic import (
    COLOURS,
    FAMILIES,
    SHAPES,
    Needle,
    Question,
    VideoSpec,
    make_dataset,
    needle_haystack_spec,
    questions,
    random_spec,
    render_frame,
    write_video,
)

__all__ = [
    "COLOURS",
    "FAMILIES",
    "SHAPES",
    "Needle",
    "Question",
    "VideoSpec",
    "make_dataset",
    "needle_haystack_spec",
    "questions",
    "random_spec",
    "render_frame",
    "write_video",
]
