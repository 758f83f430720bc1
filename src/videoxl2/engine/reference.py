"""The plain dense-mask reference: one full forward with spec §4's visibility as an explicit L x L mask.

Slow and simple on purpose (this is what the release did): every fast path is tested against it.
"""

from __future__ import annotations

import torch

from ..prompt import TokenLayout


def token_blocks(layout: TokenLayout, block_size: int) -> torch.Tensor:
    """Block index of every token: -1 for the prefix, a large number for the text after the video."""
    blocks = torch.full((layout.length,), -1, dtype=torch.long)
    blocks[layout.video_end :] = 1 << 40
    for index, group in enumerate(layout.groups):
        blocks[group.time_start : group.end] = index // block_size
    return blocks


def chunk_visibility(layout: TokenLayout, block_size: int, prev_blocks: int) -> torch.Tensor:
    """(L, L) bool: may token i attend to token j (spec §4)?

    Everyone sees the prefix; text after the video sees everything; time tokens see everything before
    them and are seen by everything after them; a visual token sees its own block causally and the
    `prev_blocks` blocks before it. All of it AND causal.
    """
    length = layout.length
    blocks = token_blocks(layout, block_size)
    time = layout.time_mask()
    in_window = (blocks[None, :] <= blocks[:, None]) & (blocks[None, :] >= blocks[:, None] - prev_blocks)
    allowed = in_window.clone()
    allowed[:, : layout.video_start] = True
    allowed[layout.video_end :, :] = True
    allowed[time, :] = True
    allowed[:, time] = True
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    return allowed & causal


@torch.inference_mode()
def reference_forward(
    model, layout: TokenLayout, video_embeds: torch.Tensor, mask: torch.Tensor | None = None
):
    """Full forward of the whole prompt with `mask` (None: plain causal). Returns (logits, cache)."""
    from transformers import DynamicCache

    embeds = model.embed_inputs(layout.input_ids.to(model.device), video_embeds)
    cache = DynamicCache(config=model.config.text_config)
    positions = torch.arange(layout.length, device=model.device)[None]
    attention_mask = None if mask is None else mask[None, None].to(model.device)
    out = model.language_model(
        inputs_embeds=embeds[None],
        attention_mask=attention_mask,
        position_ids=positions,
        cache=cache,
        use_cache=True,
    )
    return out.logits[0], cache
