"""Streaming pre-fill: the video enters the LLM block by block, into a preallocated KV store.

Chunk-based pre-filling gives different queries of one block different key sets (spec §4), and every
attention call here is mask-free (`runner.attention`: no mask, or lower-right causal), so the key sets are
laid out such that lower-right causality *is* the release's rule:

* the visual tokens of group g (in block b) attend to [prefix + time tokens before the window] followed by
  the contiguous store slice [window start, end of group g), lower-right causal: the 144 queries are the
  last 144 keys of that set, so each sees the gathered tokens, the window and its own group up to itself;
* the time tokens of group g (a few per group) attend to the store [0, their own end), lower-right causal.

One gathered key set per block and layer ([prefix + old time tokens] + [window .. block end]) serves all
its groups as nested prefixes, so the work per block does not grow with the video apart from the old time
tokens. `dense` mode runs the same loop with one lower-right causal call per block over the store.
Positions are the original 0..L-1 (the release rotates at original positions while pre-filling).

Everything a block needs to know about rows (which are time tokens, where the window starts, how many
gathered tokens precede it) comes from the layout on the host as plain slices, and the prompt's token ids
are uploaded once, without blocking: the engine makes no host-device synchronisation per block.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..errors import InputError
from ..prompt import TokenLayout
from .runner import LayerRunner, apply_rope, attention, upload  # noqa: F401  (re-exported for callers)

SPARE_TOKENS = 1024  # store capacity past the video, for a question and its answer (see VideoMemory)


@dataclass
class KVStore:
    """Per-layer K (rotated at original positions) and V of prefix + video, in buffers preallocated to the
    video's length plus `spare` slots (`keys`/`values` are views of the video part), and, for chunked
    pre-fill, a compact copy of the 'global' tokens (prefix and time tokens) every visual query sees."""

    key_buffers: list[torch.Tensor]
    value_buffers: list[torch.Tensor]
    global_keys: list[torch.Tensor]
    global_values: list[torch.Tensor]
    length: int
    keys: list[torch.Tensor] = field(init=False)
    values: list[torch.Tensor] = field(init=False)
    filled: int = 0
    global_filled: int = 0

    def __post_init__(self):
        self.keys = [t[:, : self.length] for t in self.key_buffers]
        self.values = [t[:, : self.length] for t in self.value_buffers]

    @classmethod
    def allocate(
        cls, runner: LayerRunner, layout: TokenLayout, dtype, device, spare: int = SPARE_TOKENS, chunked=True
    ) -> KVStore:
        length = layout.video_end
        shape = (runner.kv_heads, length + spare, runner.head_dim)
        count = layout.video_start + sum(g.visual_start - g.time_start for g in layout.groups)
        gshape = (runner.kv_heads, count, runner.head_dim)

        def empty(s):
            return [torch.empty(s, dtype=dtype, device=device) for _ in range(runner.num_layers)]

        glob = (empty(gshape), empty(gshape)) if chunked else ([], [])
        return cls(empty(shape), empty(shape), *glob, length)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


@dataclass
class PrefillStats:
    attention_pairs: int = 0  # (query, key) pairs the attention calls compute (causal halves skipped)
    dense_pairs: int = 0  # pairs plain causal attention would compute over the same tokens, per layer

    def flops(self, runner: LayerRunner) -> tuple[float, float]:
        """Attention FLOPs (QK^T and PV, 2 per multiply-add) actual vs dense, all layers."""
        per_pair = 4 * runner.head_dim * runner.heads * runner.num_layers
        return self.attention_pairs * per_pair, self.dense_pairs * per_pair


def causal_pairs(queries: int, keys: int) -> int:
    """Pairs of a lower-right causal call: query i of n sees keys 0 .. m-n+i."""
    return queries * (keys - queries) + queries * (queries + 1) // 2


class StreamingPrefill:
    """Feeds prefix and group embeddings into a KVStore; `chunked=False` gives plain causal attention."""

    def __init__(
        self,
        model,
        layout: TokenLayout,
        chunked: bool,
        block_size: int,
        prev_blocks: int,
        spare: int = SPARE_TOKENS,
    ):
        self.model = model
        self.layout = layout
        self.runner = LayerRunner(model)
        self.chunked = chunked
        self.block_size = block_size
        self.prev_blocks = prev_blocks
        self.device = self.runner.device
        self.store = KVStore.allocate(self.runner, layout, self.runner.dtype, self.device, spare, chunked)
        self.stats = PrefillStats()
        self.groups_done = 0
        # Host-side geometry: where each group's time tokens go in the compact global store.
        self.global_start, count = [], layout.video_start
        for g in layout.groups:
            self.global_start.append(count)
            count += g.visual_start - g.time_start
        self.input_ids = upload(layout.input_ids, self.device)  # once, without blocking

    def _write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor, spans) -> None:
        """Store the slice's K/V at [start, start + n), and its global rows (local [a, b) -> global g0)."""
        store = self.store
        end = start + k.shape[1]
        store.key_buffers[layer][:, start:end] = k
        store.value_buffers[layer][:, start:end] = v
        for a, b, g0 in spans:
            store.global_keys[layer][:, g0 : g0 + b - a] = k[:, a:b]
            store.global_values[layer][:, g0 : g0 + b - a] = v[:, a:b]

    def run_prefix(self) -> None:
        n = self.layout.video_start
        embeds = self.model.get_input_embeddings()(self.input_ids[:n])
        self._run_causal(embeds, 0, [(0, n, 0)] if self.chunked else [])
        self.store.global_filled = n if self.chunked else 0

    def _run_causal(self, embeds: torch.Tensor, start: int, spans) -> None:
        n = embeds.shape[0]
        end = start + n
        store = self.store

        def attend(layer, q, k, v):
            self._write(layer, start, k, v, spans)
            keys, values = store.key_buffers[layer][:, :end], store.value_buffers[layer][:, :end]
            return attention(q, keys, values, causal=True)

        self.runner.forward(embeds, torch.arange(start, end, device=self.device), attend)
        pairs = causal_pairs(n, end)
        self.stats.attention_pairs += pairs
        self.stats.dense_pairs += pairs
        store.filled = end

    def add_groups(self, embeds: torch.Tensor) -> None:
        """Append the next groups' visual embeddings (G, T, H), block by block."""
        first = self.groups_done
        step = self.block_size
        for offset in range(0, embeds.shape[0], step):
            chunk = embeds[offset : offset + step]
            self._run_block(first + offset, chunk)
        self.groups_done += embeds.shape[0]

    def _embed(self, groups, start: int, end: int, embeds: torch.Tensor) -> torch.Tensor:
        """Token embeddings of [start, end) with each group's visual rows replaced by its embeddings (the
        rows come from the layout: no search for placeholder ids on the device)."""
        hidden = self.model.get_input_embeddings()(self.input_ids[start:end])
        for i, g in enumerate(groups):
            if embeds.shape[1] != g.end - g.visual_start:
                raise InputError(
                    f"group {self.groups_done + i} has {g.end - g.visual_start} visual placeholder tokens "
                    f"but {embeds.shape[1]} visual embeddings were given"
                )
            hidden[g.visual_start - start : g.end - start] = embeds[i].to(hidden.device, hidden.dtype)
        return hidden

    def _run_block(self, first_group: int, embeds: torch.Tensor) -> None:
        layout = self.layout
        groups = layout.groups[first_group : first_group + embeds.shape[0]]
        start, end = groups[0].time_start, groups[-1].end
        hidden = self._embed(groups, start, end, embeds)
        if not self.chunked:
            self._run_causal(hidden, start, [])
            return
        if first_group % self.block_size:
            raise ValueError("chunked pre-fill blocks must start at a block boundary")
        block = first_group // self.block_size
        window_group = max(0, block - self.prev_blocks) * self.block_size
        window_start = layout.groups[window_group].time_start
        old = self.global_start[window_group]  # prefix + time tokens before the window
        spans = [
            (g.time_start - start, g.visual_start - start, self.global_start[first_group + i])
            for i, g in enumerate(groups)
        ]
        store = self.store

        def attend(layer, q, k, v):
            self._write(layer, start, k, v, spans)
            keys, values = store.key_buffers[layer], store.value_buffers[layer]
            if old == window_start:  # the window reaches back to the prefix: the store itself is the set
                gathered_k, gathered_v = keys[:, :end], values[:, :end]
            else:
                gathered_k = torch.cat([store.global_keys[layer][:, :old], keys[:, window_start:end]], 1)
                gathered_v = torch.cat([store.global_values[layer][:, :old], values[:, window_start:end]], 1)
            out = torch.empty_like(q)
            for g in groups:
                t0, v0, e0 = g.time_start - start, g.visual_start - start, g.end - start
                if v0 > t0:
                    out[:, t0:v0] = attention(
                        q[:, t0:v0], keys[:, : g.visual_start], values[:, : g.visual_start], causal=True
                    )
                m = old + g.end - window_start
                out[:, v0:e0] = attention(q[:, v0:e0], gathered_k[:, :m], gathered_v[:, :m], causal=True)
            return out

        self.runner.forward(hidden, torch.arange(start, end, device=self.device), attend)
        n = end - start
        for g in groups:
            self.stats.attention_pairs += causal_pairs(g.visual_start - g.time_start, g.visual_start)
            self.stats.attention_pairs += causal_pairs(g.end - g.visual_start, old + g.end - window_start)
        self.stats.dense_pairs += n * start + n * (n + 1) // 2
        store.filled = end
        store.global_filled = spans[-1][2] + spans[-1][1] - spans[-1][0]


def prefill_video(
    model,
    layout: TokenLayout,
    group_batches: Iterator[torch.Tensor],
    chunked: bool,
    block_size: int,
    prev_blocks: int,
) -> StreamingPrefill:
    """Run prefix and all group batches (each a whole number of blocks, except the last)."""
    prefill = StreamingPrefill(model, layout, chunked, block_size, prev_blocks)
    prefill.run_prefix()
    for embeds in group_batches:
        prefill.add_groups(embeds)
    return prefill
