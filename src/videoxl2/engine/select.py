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
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from ..errors import InputError
from .memory import MixedCache, VideoMemory
from .prefill import read_kv
from .runner import LayerRunner, apply_rope, upload

SCORE_CHUNK = 8192  # cache keys scored at a time (bounds the fp32 logits and key temporaries)

# A layer's cache keys in chunks: (keys, values, index of the first key in the cache).
KeyChunks = Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor, int]]]


def sparse_visual_units(memory: VideoMemory) -> torch.Tensor:
    """(M,) over the all-sparse cache (prefix, then per group its time tokens and pooled visual tokens):
    the unit of each pooled visual key, -1 for the prefix and time-token keys."""
    owner = [torch.full((memory.layout.video_start,), -1, dtype=torch.long)]
    for group_index, group in enumerate(memory.layout.groups):
        pooled = (group.end - group.visual_start) // memory.compression
        owner.append(torch.full((group.visual_start - group.time_start,), -1, dtype=torch.long))
        owner.append(torch.full((pooled,), group_index // memory.unit_size, dtype=torch.long))
    return torch.cat(owner)


def visual_key_units(memory: VideoMemory, cache: MixedCache) -> torch.Tensor:
    """(M,) unit index of each key of an all-sparse cache that is a pooled visual key, -1 for the prefix and
    time-token keys."""
    owner = sparse_visual_units(memory)
    if owner.numel() != cache.length:
        raise ValueError(
            f"cache of {cache.length} keys is not the all-sparse cache of this memory ({owner.numel()})"
        )
    return owner


def relevance(
    runner: LayerRunner, chunks: KeyChunks, position: int, question_embeds: torch.Tensor, key_units
) -> torch.Tensor:
    """(U,) relevance of each unit: at every layer, the softmax mass (fp32, over the cache plus the question's
    own causal keys) of each head's question token on the unit's keys, summed over the unit's keys where
    `key_units` >= 0, maxed over heads and question tokens; then averaged over layers.

    The question's queries are grouped by K/V head, so keys are never expanded to every head; the cache is
    read in chunks twice per layer (log-sum-exp, then weights, mass and output), only a chunk at a time
    upcast to fp32. No SDPA call: the weights themselves are the result."""
    n = question_embeds.shape[0]
    device = question_embeds.device
    kv, group, dim = runner.kv_heads, runner.heads // runner.kv_heads, runner.head_dim
    scale = dim**-0.5
    num_units = int(key_units.max()) + 1
    bucket = upload(torch.where(key_units >= 0, key_units, num_units), device)  # -1 -> an extra bucket
    own_mask = torch.ones(n, n, dtype=torch.bool, device=device).tril().repeat(group, 1)  # row j*n + i
    total = torch.zeros(num_units, dtype=torch.float32, device=device)

    def attend(layer, q, k, v):
        nonlocal total
        qg = q.reshape(kv, group * n, dim).float()  # heads h = i * group + j share K/V head i

        def logits(keys):
            return (qg @ keys.float().transpose(1, 2)) * scale

        own = logits(k).masked_fill_(~own_mask, float("-inf"))
        lse = own.logsumexp(-1)
        for keys, _, _ in chunks(layer):
            lse = torch.logaddexp(lse, logits(keys).logsumexp(-1))
        lse = lse[..., None]
        mass = torch.zeros(kv, group * n, num_units + 1, dtype=torch.float32, device=device)
        out = ((own - lse).exp_().to(v.dtype) @ v).float()
        for keys, values, first in chunks(layer):
            weights = (logits(keys) - lse).exp_()
            mass.index_add_(2, bucket[first : first + keys.shape[1]], weights)
            out += (weights.to(values.dtype) @ values).float()
        total += mass[..., :num_units].amax((0, 1))
        return out.view(kv, group, n, dim).reshape(kv * group, n, dim).to(q.dtype)

    positions = torch.arange(position, position + n, device=device)
    runner.forward(question_embeds, positions, attend)
    return (total / runner.num_layers).cpu()


@torch.inference_mode()
def unit_relevance(
    runner: LayerRunner, cache: MixedCache, question_embeds: torch.Tensor, key_units: torch.Tensor
) -> torch.Tensor:
    """`relevance` of the question over an assembled cache (its keys at the positions they carry; an int8
    cache is dequantized a chunk at a time)."""
    dtype = runner.dtype

    def chunks(layer):
        for a in range(0, cache.length, SCORE_CHUNK):
            b = min(a + SCORE_CHUNK, cache.length)
            yield read_kv(cache.keys[layer][:, a:b], dtype), read_kv(cache.values[layer][:, a:b], dtype), a

    return relevance(runner, chunks, cache.next_position, question_embeds, key_units)


def choose_units(scores: torch.Tensor, topk: int) -> list[int]:
    """The first and last unit (always dense, as in the release) plus the `topk` best-scoring others."""
    count = scores.numel()
    always = {0, count - 1}
    ranked = [int(u) for u in torch.argsort(scores, descending=True, stable=True) if int(u) not in always]
    return sorted(always | set(ranked[:topk]))


@torch.inference_mode()
def score_units(model, memory: VideoMemory, question_ids: torch.Tensor) -> torch.Tensor:
    """Relevance of every unit of `memory` to the question tokens (the text after the video), over the
    all-sparse cache at the pre-fill's positions: the memory's prefix keys and its sparse keys rotated chunk
    by chunk as they are read (an int8 memory's dequantized as they are read), so no all-sparse cache is
    assembled."""
    runner = LayerRunner(model)
    memory.check_model(runner)
    memory.build_sparse(runner)
    device, start, dtype = runner.device, memory.layout.video_start, runner.dtype
    positions = memory.sparse_positions
    total = positions.numel()

    def chunks(layer):
        prefix_k, prefix_v = memory.keys[layer][:, :start], memory.values[layer][:, :start]
        yield read_kv(prefix_k, dtype, device), read_kv(prefix_v, dtype, device), 0
        keys, values = memory.sparse_keys[layer], memory.sparse_values[layer]
        for a in range(0, total, SCORE_CHUNK):
            b = min(a + SCORE_CHUNK, total)
            cos, sin = runner.rope_tables(positions[a:b], device)
            rotated = apply_rope(read_kv(keys[:, a:b], dtype), cos, sin)
            yield rotated, read_kv(values[:, a:b], dtype), start + a

    embeds = model.get_input_embeddings()(upload(question_ids, device))
    return relevance(runner, chunks, memory.layout.video_end, embeds, sparse_visual_units(memory))


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
