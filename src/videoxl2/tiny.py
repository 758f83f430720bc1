"""Tiny Video-XL-2 models: the released architecture at toy width, for tests, benchmarks and demos.

Same modules, same token layout (time text + visual tokens per 4-frame group, ChatML), only smaller: SigLIP
sees 63x63 frames as 9x9 patches resized to an 8x8 grid (the release: 27x27 -> 24x24), so each group gives
16 visual tokens (release: 144).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import VideoXL2Config
from .tokenizer import build_tiny_tokenizer


def tiny_config(tokenizer=None, **overrides) -> VideoXL2Config:
    tokenizer = tokenizer or build_tiny_tokenizer()
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16384,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    text.update(overrides.pop("text", {}))
    vision = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=63,
        patch_size=7,
        vision_use_head=False,
    )
    vision.update(overrides.pop("vision", {}))
    values = dict(
        text_config=text,
        vision_config=vision,
        vision_grid=8,
        video_token_id=tokenizer.convert_tokens_to_ids("<|vision_pad|>"),
        vision_batch_size=16,
        dts_batch_size=8,
    )
    values.update(overrides)
    return VideoXL2Config(**values)


def build_tiny_model(seed: int = 0, tokenizer=None, init_std: float | None = 0.2, **overrides):
    """A randomly initialised tiny model (fp32, eval mode) and its tokenizer.

    `init_std` 0.2 (tests, demos of the machinery) gives well-separated random logits, so greedy decoding
    of an untrained model is stable; `None` keeps transformers' standard init, the one to train from.
    """
    from .modeling.videoxl2 import VideoXL2ForCausalLM

    tokenizer = tokenizer or build_tiny_tokenizer()
    torch.manual_seed(seed)
    model = VideoXL2ForCausalLM(tiny_config(tokenizer, **overrides))
    if init_std is None:
        return model.eval(), tokenizer
    with torch.no_grad():
        for param in model.language_model.parameters():
            if param.ndim == 2:
                param.normal_(0.0, init_std)
        for param in model.dts.parameters():
            if param.ndim > 1 and not param.any():
                param.normal_(0.0, 0.05)
    return model.eval(), tokenizer


def save_tiny_checkpoint(path, seed: int = 0, **overrides) -> Path:
    """Write a random tiny model and its tokenizer as a checkpoint folder `load_model` reads."""
    path = Path(path)
    model, tokenizer = build_tiny_model(seed, **overrides)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
