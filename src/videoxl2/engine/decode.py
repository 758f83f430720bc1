"""Answering from an assembled cache: the question runs on it, then tokens are generated one by one.

From here on attention is plain causal over whatever cache was assembled (dense, or bi-level mixed), so this
stage uses transformers' own Qwen2 forward and DynamicCache.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from ..generation import GenerationSettings, generate_tokens
from .memory import MixedCache


def to_dynamic_cache(mixed: MixedCache, text_config) -> DynamicCache:
    cache = DynamicCache(config=text_config)
    for layer, (keys, values) in enumerate(zip(mixed.keys, mixed.values)):
        cache.update(keys[None], values[None], layer)
    return cache


@torch.inference_mode()
def question_logits(model, cache: DynamicCache, question_ids: torch.Tensor, start: int) -> torch.Tensor:
    """Run the question tokens at positions start.. on `cache`; logits of its last token."""
    device = model.get_input_embeddings().weight.device
    positions = torch.arange(start, start + question_ids.numel(), device=device)[None]
    out = model.llm(input_ids=question_ids.to(device)[None], position_ids=positions, cache=cache, use_cache=True)
    return model.get_output_embeddings()(out.last_hidden_state[0, -1])


@torch.inference_mode()
def answer_from_cache(
    model, tokenizer, mixed: MixedCache, question_ids: torch.Tensor, settings: GenerationSettings
) -> list[int]:
    """Generate the answer to `question_ids` (the text after the video) from an assembled cache."""
    cache = to_dynamic_cache(mixed, model.config.text_config)
    position = mixed.next_position + question_ids.numel()
    first = question_logits(model, cache, question_ids, mixed.next_position)

    def step(token: int) -> torch.Tensor:
        nonlocal position
        logits = question_logits(model, cache, torch.tensor([token]), position)
        position += 1
        return logits

    return generate_tokens(first, step, tokenizer, settings)
