"""Inputs shared by the engine's exactness tests."""

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
