"""Streaming pre-fill: the video enters the LLM block by block, into a preallocated KV store.

We run transformers' own Qwen2 modules (norms, projections, rotary tables, MLP) layer by layer and supply
only the attention, because chunk-based pre-filling needs different key sets for different queries of the
same block (spec §4):

* a visual query of block b sees the prefix, every earlier time token, blocks b-P..b-1 and its own block
  causally: it attends to the *gathered* keys [prefix + old time tokens] + [contiguous window] only, so the
  work per block stays constant as the video grows;
* a time-token query sees everything before it: it attends to the whole store (a few tokens per group).

`dense` mode uses the same loop with plain causal attention, so both modes share one store and one memory
format. Positions are the original 0..L-1 (the release rotates at original positions while pre-filling).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..prompt import TokenLayout


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (heads, n, D) by per-token (n, D) tables, computing in fp32 (Qwen2's formula)."""
    return (x.float() * cos + rotate_half(x.float()) * sin).to(x.dtype)


class LayerRunner:
    """Qwen2 decoder stack with pluggable attention: `attend(layer, q, k, v) -> (heads, n, D)` gets the
    slice's rotated queries and keys and its values, and may read or write any KV it keeps itself."""

    def __init__(self, model):
        self.llm = model.llm
        config = model.config.text_config
        if getattr(config, "use_sliding_window", False):
            raise NotImplementedError("sliding-window Qwen2 configs are not supported by the engine")
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_layers = config.num_hidden_layers

    def rope_tables(self, positions: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (n, D) in fp32 for float or integer positions (negative ones rotate backwards)."""
        cos, sin = self.llm.rotary_emb(like.float(), positions.to(like.device)[None].float())
        return cos[0].float(), sin[0].float()

    def project(self, layer, x: torch.Tensor):
        attn = layer.self_attn
        n = x.shape[0]
        q = attn.q_proj(x).view(n, self.heads, self.head_dim).transpose(0, 1)
        k = attn.k_proj(x).view(n, self.kv_heads, self.head_dim).transpose(0, 1)
        v = attn.v_proj(x).view(n, self.kv_heads, self.head_dim).transpose(0, 1)
        return q, k, v

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor, attend: Callable) -> torch.Tensor:
        """(n, H) embeddings at `positions` -> (n, H) last-layer hidden states (before the final norm)."""
        cos, sin = self.rope_tables(positions, hidden)
        for index, layer in enumerate(self.llm.layers):
            x = layer.input_layernorm(hidden)
            q, k, v = self.project(layer, x)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            out = attend(index, q, k, v)
            hidden = hidden + layer.self_attn.o_proj(out.transpose(0, 1).reshape(hidden.shape[0], -1))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return hidden


def attention(q, k, v, mask=None, causal=False) -> torch.Tensor:
    """SDPA over (heads, n, D) queries and (kv_heads, m, D) keys/values (grouped-query attention)."""
    out = F.scaled_dot_product_attention(
        q[None],
        k[None],
        v[None],
        attn_mask=None if mask is None else mask[None, None],
        is_causal=causal,
        enable_gqa=True,
    )
    return out[0]


@dataclass
class KVStore:
    """Per-layer K (rotated at original positions) and V of prefix + video, preallocated to full length,
    plus a compact copy of the 'global' tokens (prefix and time tokens) that every visual query sees."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    global_keys: list[torch.Tensor]
    global_values: list[torch.Tensor]
    global_positions: torch.Tensor
    filled: int = 0
    global_filled: int = 0

    @classmethod
    def allocate(cls, runner: LayerRunner, layout: TokenLayout, dtype, device) -> KVStore:
        length = layout.video_end
        time_mask = layout.time_mask()[:length]
        time_mask[: layout.video_start] = True
        global_positions = time_mask.nonzero().flatten()
        shape = (runner.kv_heads, length, runner.head_dim)
        gshape = (runner.kv_heads, global_positions.numel(), runner.head_dim)

        def empty(s):
            return [torch.empty(s, dtype=dtype, device=device) for _ in range(runner.num_layers)]

        return cls(empty(shape), empty(shape), empty(gshape), empty(gshape), global_positions.to(device))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


@dataclass
class PrefillStats:
    attention_pairs: int = 0  # (query, key) pairs handed to attention kernels, per layer
    dense_pairs: int = 0  # pairs plain causal attention would compute over the same tokens, per layer

    def flops(self, runner: LayerRunner) -> tuple[float, float]:
        """Attention FLOPs (QK^T and PV, 2 per multiply-add) actual vs dense, all layers."""
        per_pair = 4 * runner.head_dim * runner.heads * runner.num_layers
        return self.attention_pairs * per_pair, self.dense_pairs * per_pair


class StreamingPrefill:
    """Feeds prefix and group embeddings into a KVStore; `chunked=False` gives plain causal attention."""

    def __init__(self, model, layout: TokenLayout, chunked: bool, block_size: int, prev_blocks: int):
        self.model = model
        self.layout = layout
        self.runner = LayerRunner(model)
        self.chunked = chunked
        self.block_size = block_size
        self.prev_blocks = prev_blocks
        weight = model.get_input_embeddings().weight
        self.device = weight.device
        self.store = KVStore.allocate(self.runner, layout, weight.dtype, weight.device)
        self.stats = PrefillStats()
        self.groups_done = 0

    def _write(
        self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor, global_rows: torch.Tensor
    ) -> None:
        store = self.store
        end = start + k.shape[1]
        store.keys[layer][:, start:end] = k
        store.values[layer][:, start:end] = v
        count = global_rows.numel()
        if count:
            g0 = store.global_filled
            store.global_keys[layer][:, g0 : g0 + count] = k[:, global_rows]
            store.global_values[layer][:, g0 : g0 + count] = v[:, global_rows]

    def run_prefix(self) -> None:
        ids = self.layout.input_ids[: self.layout.video_start].to(self.device)
        self._run_causal(
            self.model.get_input_embeddings()(ids), 0, torch.arange(ids.numel(), device=self.device)
        )

    def _run_causal(self, embeds: torch.Tensor, start: int, global_rows: torch.Tensor) -> None:
        n = embeds.shape[0]
        end = start + n
        store = self.store

        def attend(layer, q, k, v):
            self._write(layer, start, k, v, global_rows)
            keys, values = store.keys[layer][:, :end], store.values[layer][:, :end]
            if start == 0:
                return attention(q, keys, values, causal=True)
            mask = (
                torch.arange(end, device=self.device)[None]
                <= torch.arange(start, end, device=self.device)[:, None]
            )
            return attention(q, keys, values, mask)

        self.runner.forward(embeds, torch.arange(start, end, device=self.device), attend)
        pairs = n * start + n * (n + 1) // 2
        self.stats.attention_pairs += pairs
        self.stats.dense_pairs += pairs
        self._advance(end, global_rows.numel())

    def _advance(self, end: int, global_count: int) -> None:
        self.store.filled = end
        self.store.global_filled += global_count

    def add_groups(self, embeds: torch.Tensor) -> None:
        """Append the next groups' visual embeddings (G, T, H), block by block."""
        first = self.groups_done
        step = self.block_size
        for offset in range(0, embeds.shape[0], step):
            chunk = embeds[offset : offset + step]
            self._run_block(first + offset, chunk)
        self.groups_done += embeds.shape[0]

    def _run_block(self, first_group: int, embeds: torch.Tensor) -> None:
        layout = self.layout
        groups = layout.groups[first_group : first_group + embeds.shape[0]]
        start, end = groups[0].time_start, groups[-1].end
        ids = layout.input_ids[start:end].to(self.device)
        hidden = self.model.embed_inputs(ids, embeds)
        is_time = torch.zeros(end - start, dtype=torch.bool)
        for g in groups:
            is_time[g.time_start - start : g.visual_start - start] = True
        time_rows = is_time.nonzero().flatten().to(self.device)
        if not self.chunked:
            self._run_causal(hidden, start, time_rows)
            return
        block = first_group // self.block_size
        if first_group % self.block_size:
            raise ValueError("chunked pre-fill blocks must start at a block boundary")
        window_group = max(0, block - self.prev_blocks) * self.block_size
        window_start = layout.groups[window_group].time_start
        store = self.store
        old_global = int((store.global_positions[: store.global_filled] < window_start).sum())
        visual_rows = (~is_time).nonzero().flatten().to(self.device)
        positions = torch.arange(start, end, device=self.device)
        key_positions = torch.cat(
            [store.global_positions[:old_global], torch.arange(window_start, end, device=self.device)]
        )
        visual_mask = key_positions[None] <= positions[visual_rows][:, None]
        time_mask = torch.arange(end, device=self.device)[None] <= positions[time_rows][:, None]

        def attend(layer, q, k, v):
            self._write(layer, start, k, v, time_rows)
            out = torch.empty_like(q)
            keys = torch.cat(
                [store.global_keys[layer][:, :old_global], store.keys[layer][:, window_start:end]], 1
            )
            values = torch.cat(
                [store.global_values[layer][:, :old_global], store.values[layer][:, window_start:end]], 1
            )
            out[:, visual_rows] = attention(q[:, visual_rows], keys, values, visual_mask)
            if time_rows.numel():
                keys, values = store.keys[layer][:, :end], store.values[layer][:, :end]
                out[:, time_rows] = attention(q[:, time_rows], keys, values, time_mask)
            return out

        self.runner.forward(hidden, positions, attend)
        n = end - start
        self.stats.attention_pairs += visual_rows.numel() * key_positions.numel() + time_rows.numel() * end
        self.stats.dense_pairs += n * start + n * (n + 1) // 2
        self._advance(end, time_rows.numel())


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
