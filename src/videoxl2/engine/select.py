"""Task-aware unit selection: which parts of the video a question needs at full resolution.

The release read this from files made offline by another model (LanguageBind). We ask the model itself: the
question runs once over the all-sparse cache (prefix dense, every unit pooled) with every key at the
position pre-fill gave it, and a unit's relevance is, per layer, the largest attention mass any head's
question token puts on the unit's visual keys, averaged over layers. That costs one extra pass of a few dozen
tokens over a cache ~4x smaller than the dense one.

Why this aggregation (`benchmarks/selection.py`: the demo model on 10 V-NIAH haystacks each of 1,024 and
4,096 frames, 128/512 units, `topk` 4): time tokens are the same text in every unit, so counting them ranks
units by position, not content (visual keys only); a few heads retrieve while most look elsewhere, so a mean
over heads and tokens drowns them (max per layer); contiguous re-rotated positions favour the last units
(original positions). The first version, a mean over everything on the re-rotated cache, kept the needle's
unit dense in 80% / 30% of the haystacks; this one in 90% / 90%.
External selections (unit lists, or the release's `selected_infos` JSON) are accepted too.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import InputError
from .memory import MixedCache, VideoMemory
from .prefill import LayerRunner


def visual_key_units(memory: VideoMemory, cache: MixedCache) -> torch.Tensor:
    """(M,) unit index of each key of an all-sparse cache that is a pooled visual key, -1 for the prefix and
    time-token keys."""
    owner = torch.full((cache.length,), -1, dtype=torch.long)
    cursor = memory.layout.video_start
    for group_index, group in enumerate(memory.layout.groups):
        time_count = group.visual_start - group.time_start
        pooled = (group.end - group.visual_start) // memory.compression
        owner[cursor + time_count : cursor + time_count + pooled] = group_index // memory.unit_size
        cursor += time_count + pooled
    if cursor != cache.length:
        raise ValueError(
            f"cache of {cache.length} keys is not the all-sparse cache of this memory ({cursor})"
        )
    return owner


@torch.inference_mode()
def unit_relevance(
    runner: LayerRunner, cache: MixedCache, question_embeds: torch.Tensor, key_units: torch.Tensor
) -> torch.Tensor:
    """(U,) relevance of each unit: at every layer, the softmax mass (fp32, over the cache plus the question's
    own causal keys) of each head's question token on the unit's keys, summed over the unit's keys where
    `key_units` >= 0, maxed over heads and question tokens; then averaged over layers."""
    n, m = question_embeds.shape[0], cache.length
    device = question_embeds.device
    positions = torch.arange(cache.next_position, cache.next_position + n, device=device)
    causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    scale = runner.head_dim**-0.5
    group = runner.heads // runner.kv_heads
    counted = (key_units >= 0).nonzero().squeeze(1).to(device)
    owner = key_units.to(device)[counted]
    num_units = int(key_units.max()) + 1
    total = torch.zeros(num_units, dtype=torch.float32, device=device)

    def attend(layer, q, k, v):
        nonlocal total
        keys = torch.cat([cache.keys[layer], k], 1).repeat_interleave(group, 0)
        values = torch.cat([cache.values[layer], v], 1).repeat_interleave(group, 0)
        logits = (q.float() @ keys.float().transpose(1, 2)) * scale
        logits[:, :, m:].masked_fill_(~causal, float("-inf"))
        weights = logits.softmax(-1)
        per_unit = torch.zeros(*weights.shape[:2], num_units, dtype=torch.float32, device=device)
        per_unit.index_add_(2, owner, weights[:, :, counted])
        total += per_unit.amax((0, 1))
        return (weights.to(values.dtype) @ values).to(q.dtype)

    runner.forward(question_embeds, positions, attend)
    return (total / runner.num_layers).cpu()


def choose_units(scores: torch.Tensor, topk: int) -> list[int]:
    """The first and last unit (always dense, as in the release) plus the `topk` best-scoring others."""
    count = scores.numel()
    always = {0, count - 1}
    ranked = [int(u) for u in torch.argsort(scores, descending=True, stable=True) if int(u) not in always]
    return sorted(always | set(ranked[:topk]))


def score_units(model, memory: VideoMemory, question_ids: torch.Tensor) -> torch.Tensor:
    """Relevance of every unit of `memory` to the question tokens (the text after the video)."""
    runner = LayerRunner(model)
    device = model.get_input_embeddings().weight.device
    cache = memory.assemble(runner, dense_units=(), rerotate=False, device=device)
    embeds = model.get_input_embeddings()(question_ids.to(device))
    return unit_relevance(runner, cache, embeds, visual_key_units(memory, cache))


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
