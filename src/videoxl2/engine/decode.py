"""Answering from a question's cache: the question runs on it, then tokens are generated one by one.

Attention is causal over whatever cache the question got (the pre-fill store itself for dense and chunked
questions, an assembled bi-level cache otherwise). New keys and values are written into the cache's spare
capacity, so a token costs one read of the cache, not a copy of it (transformers' DynamicCache concatenates
on every step), and grouped-query attention never expands the KV. The question's tokens attend to the cache
and to each other with one lower-right causal call, a generated token with one unmasked call.

Host-device synchronisation: a generated token costs one — its logits are copied to the host, where the
next token is chosen; the token then goes back up without blocking.

An int8 cache (`Int8Rows`, from an int8 video memory) takes the new tokens' K/V quantized, and each call
attends to what was there before read back from int8 (`prefill.stored_attention`: a chunk of keys
dequantized at a time, or for a long question one dequantized copy of the layer) and to its own K/V exact.
"""

from __future__ import annotations

import torch

from ..generation import GenerationSettings, generate_tokens
from .memory import MixedCache
from .prefill import stored_attention
from .runner import LayerRunner, attention, upload


@torch.inference_mode()
def run_on_cache(runner: LayerRunner, model, cache: MixedCache, token_ids: torch.Tensor) -> torch.Tensor:
    """Append `token_ids` (positions continue from the cache) and return the last token's logits."""
    device = cache.keys[0].device
    n, start = token_ids.numel(), cache.length
    end = start + n
    cache.reserve(n)
    offset = cache.next_position - start  # cache slot -> RoPE position
    int8 = cache.int8

    def attend(layer, q, k, v):
        cache.keys[layer][:, start:end] = k
        cache.values[layer][:, start:end] = v
        if int8:
            return stored_attention(q, cache.keys[layer], cache.values[layer], start, k, v)
        return attention(q, cache.keys[layer][:, :end], cache.values[layer][:, :end], causal=True)

    embeds = model.get_input_embeddings()(upload(token_ids, device))
    hidden = runner.forward(embeds, torch.arange(start, end, device=device) + offset, attend)
    cache.length = end
    cache.next_position += n
    return model.get_output_embeddings()(runner.llm.norm(hidden[-1:]))[0]


@torch.inference_mode()
def answer_from_cache(
    model,
    tokenizer,
    mixed: MixedCache,
    question_ids: torch.Tensor,
    settings: GenerationSettings,
    on_token=None,
) -> list[int]:
    """Generate the answer to `question_ids` (the text after the video); fills `mixed`'s spare capacity.
    Logits are brought to the host once per token (the one synchronisation), so choosing the token there
    makes no further transfer."""
    runner = LayerRunner(model)
    mixed.reserve(question_ids.numel() + int(settings.max_new_tokens))
    first = run_on_cache(runner, model, mixed, question_ids).cpu()
    return generate_tokens(
        first,
        lambda token: run_on_cache(runner, model, mixed, torch.tensor([token])).cpu(),
        tokenizer,
        settings,
        on_token,
    )
