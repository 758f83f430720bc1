"""Token generation settings and the sampling step shared by every engine mode.

The engine owns the KV cache (dense, chunked or bi-level), so generation is a small loop around a
`step(token) -> logits` callable rather than transformers' `generate`; the logits processors are
transformers' own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from .errors import InputError

DEFAULT_STOP_STRINGS = ("<|im_end|>", "<|endoftext|>")


@dataclass
class GenerationSettings:
    """Seed README defaults are do_sample=True, temperature=0.01, top_p=0.001: greedy in practice."""

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    num_beams: int = 1
    seed: int | None = None
    stop_strings: Sequence[str] = DEFAULT_STOP_STRINGS

    @classmethod
    def from_dict(cls, options: dict | None) -> GenerationSettings:
        """Take a seed-style `generation_config` dict; unknown keys such as `use_cache` are ignored."""
        options = dict(options or {})
        if "stop" in options:
            options["stop_strings"] = options.pop("stop")
        known = {f.name for f in fields(cls)}
        settings = cls(**{k: v for k, v in options.items() if k in known and v is not None})
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.num_beams != 1:
            raise InputError(f"generation_config.num_beams={self.num_beams}: only num_beams=1 is supported")
        if int(self.max_new_tokens) < 1:
            raise InputError(f"generation_config.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and not float(self.temperature) > 0:
            raise InputError(
                f"generation_config.temperature must be > 0 when sampling, got {self.temperature}"
            )
        if not 0 < float(self.top_p) <= 1:
            raise InputError(f"generation_config.top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.stop_strings, str):
            self.stop_strings = (self.stop_strings,)

    def processors(self) -> LogitsProcessorList:
        warpers = LogitsProcessorList()
        if self.do_sample:
            if self.temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(float(self.temperature)))
            if self.top_k:
                warpers.append(TopKLogitsWarper(int(self.top_k)))
            if self.top_p < 1.0:
                warpers.append(TopPLogitsWarper(float(self.top_p)))
        return warpers


def stop_token_ids(tokenizer, settings: GenerationSettings) -> set[int]:
    """Ids of stop strings that are single tokens, plus the tokenizer's EOS."""
    ids = set()
    for text in settings.stop_strings:
        token = tokenizer.convert_tokens_to_ids(text)
        if isinstance(token, int) and token != tokenizer.unk_token_id:
            ids.add(token)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


@torch.inference_mode()
def generate_tokens(
    first_logits: torch.Tensor,
    step: Callable[[int], torch.Tensor],
    tokenizer,
    settings: GenerationSettings,
    on_token: Callable[[int], None] | None = None,
) -> list[int]:
    """Pick tokens from `first_logits`, feeding each to `step` for the next logits, until a stop.

    Returns the generated ids without the stop token. Multi-token stop strings are cut from the text.
    `on_token` sees each kept id as it is chosen (streaming); an exception it raises stops generation.
    """
    stops = stop_token_ids(tokenizer, settings)
    processors = settings.processors()
    generator = None
    if settings.do_sample and settings.seed is not None:
        generator = torch.Generator(device=first_logits.device).manual_seed(int(settings.seed))
    generated: list[int] = []
    logits = first_logits
    for _ in range(int(settings.max_new_tokens)):
        history = torch.tensor([generated], dtype=torch.long, device=logits.device)
        scores = processors(history, logits.float().view(1, -1))
        if settings.do_sample:
            token = int(torch.multinomial(scores.softmax(-1), 1, generator=generator))
        else:
            token = int(scores.argmax(-1))
        if token in stops:
            break
        generated.append(token)
        if on_token is not None:
            on_token(token)
        text = tokenizer.decode(generated[-8:])
        if any(s in text for s in settings.stop_strings):
            break
        if len(generated) == int(settings.max_new_tokens):
            break
        logits = step(token)
    return generated


def decode_answer(tokenizer, token_ids, settings: GenerationSettings, partial: bool = False) -> str:
    """The answer's text: special tokens dropped (as chat APIs return it), cut at the first stop string,
    stripped. `partial` is for text shown while tokens still come: it also holds back a trailing
    half of a multi-byte character and an ending that may still grow into a stop string, so what is
    streamed is always a prefix of the final answer."""
    text = tokenizer.decode(token_ids, skip_special_tokens=True)
    stopped = False
    for stop in settings.stop_strings:
        if stop and stop in text:
            text, stopped = text.split(stop)[0], True
    if partial and not stopped:
        text = text.rstrip("\ufffd")
        growing = [k for s in settings.stop_strings for k in range(1, len(s)) if text.endswith(s[:k])]
        text = text[: len(text) - max(growing, default=0)]
    return text.strip()
