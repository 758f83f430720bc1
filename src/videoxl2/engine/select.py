"""Task-aware unit selection: which parts of the video a question needs at full resolution.

The release read this from files made offline by another model (LanguageBind). We ask the model itself: the
question runs once over the all-sparse cache (prefix dense, every unit pooled), and a unit's relevance is the
attention mass the question's tokens put on the unit's keys, averaged over query heads, question tokens and
layers. That costs one extra pass of a few dozen tokens over a cache ~4x smaller than the dense one.
External selections (unit lists, or the release's `selected_infos` JSON) are accepted too.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import InputError
from .memory import MixedCache, VideoMemory
from .prefill import LayerRunner


@torch.inference_mode()
def attention_mass(runner: LayerRunner, cache: MixedCache, question_embeds: torch.Tensor) -> torch.Tensor:
    """(M,) attention mass on each cached key: softmax weights of every question token at every layer
    and head, averaged (fp32 softmax over the cache plus the question's own causal keys)."""
    n, m = question_embeds.shape[0], cache.length
    device = question_embeds.device
    positions = torch.arange(cache.next_position, cache.next_position + n, device=device)
    causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    scale = runner.head_dim**-0.5
    group = runner.heads // runner.kv_heads
    total = torch.zeros(m, dtype=torch.float32, device=device)

    def attend(layer, q, k, v):
        nonlocal total
        keys = torch.cat([cache.keys[layer], k], 1).repeat_interleave(group, 0)
        values = torch.cat([cache.values[layer], v], 1).repeat_interleave(group, 0)
        logits = (q.float() @ keys.float().transpose(1, 2)) * scale
        logits[:, :, m:].masked_fill_(~causal, float("-inf"))
        weights = logits.softmax(-1)
        total += weights[:, :, :m].mean((0, 1))
        return (weights.to(values.dtype) @ values).to(q.dtype)

    runner.forward(question_embeds, positions, attend)
    return total / runner.num_layers


def unit_scores(mass: torch.Tensor, cache: MixedCache) -> torch.Tensor:
    """Sum of key mass inside each unit's slice of the cache."""
    return torch.stack([mass[start:end].sum() for start, end in cache.unit_slices]).cpu()


def choose_units(scores: torch.Tensor, topk: int) -> list[int]:
    """The first and last unit (always dense, as in the release) plus the `topk` best-scoring others."""
    count = scores.numel()
    always = {0, count - 1}
    ranked = [int(u) for u in torch.argsort(scores, descending=True, stable=True) if int(u) not in always]
    return sorted(always | set(ranked[:topk]))


def score_units(
    model, memory: VideoMemory, question_ids: torch.Tensor, rerotate: bool = True
) -> torch.Tensor:
    """Relevance of every unit of `memory` to the question tokens (the text after the video)."""
    runner = LayerRunner(model)
    device = model.get_input_embeddings().weight.device
    cache = memory.assemble(runner, dense_units=(), rerotate=rerotate, device=device)
    embeds = model.get_input_embeddings()(question_ids.to(device))
    return unit_scores(attention_mass(runner, cache, embeds), cache)


def read_selection_file(path, video: str, question: str, unit_size: int) -> list[int] | None:
    """Units chosen offline, in the release's `selected_infos` JSON format.

    The file maps question categories to {"config": {...}, "selected_unit_indices": {id: [units]}}, with
    ids "<video file name>_<question line>" and units of 8 frames (2 groups); they are converted to our
    units of `unit_size` groups. Returns None when the question is not in the file.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: unreadable selection file ({err})") from err
    name = Path(video).name
    stem = Path(video).stem
    line = question.strip().split("\n")[0].strip()
    for category in data.values():
        if not category:
            continue
        table = category.get("selected_unit_indices") or {}
        for key in (f"{name}_{line}", f"{stem}_{line}"):
            if key in table:
                # An 8-frame unit u covers groups 2u and 2u+1: keep every unit of ours they fall in.
                return sorted({(2 * int(u) + half) // unit_size for u in table[key] for half in (0, 1)})
    return None
