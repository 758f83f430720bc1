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

With `kv_dtype="int8"` the store holds `Int8Rows` (int8 elements, one scale per token and KV head, the layout
`budget.py` states) and every block's K/V are quantized as they are written. The block being computed
attends to its own K/V exactly (they are at hand in the layer) and to everything stored before it read back
from int8: the visual rows of a chunked block, and every row of a dense block, through one dequantized copy
of their key set for the layer (compute dtype, then SDPA as in full precision); the few time-token rows
through `stored_attention`, which dequantizes `INT8_CHUNK` keys at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..errors import InputError
from ..prompt import TokenLayout
from .budget import KV_INT8_SCALE_DTYPE
from .runner import LayerRunner, apply_rope, attention, upload  # noqa: F401  (re-exported for callers)
from .settings import KV_DTYPES

SPARE_TOKENS = 1024  # store capacity past the video, for a question and its answer (see VideoMemory)
INT8_CHUNK = 4096  # int8 keys dequantized at a time by `stored_attention`
INT8_SDPA_QUERIES = 64  # above this many queries `stored_attention` dequantizes the layer's set and runs SDPA
INT8_MAX = 127
EXP_FLOOR = -80.0  # softmax exponents are clamped here: exp below it is < 2e-35 and, under -87, a denormal,
# which x86 CPUs compute ~40x slower (the small-shape pre-fill of 1,024 frames spent 16.6 s in exp, now 1.1 s)


class Int8Rows:
    """Rows of int8 with one scale per row: `data` (kv_heads, n, D) int8 and `scale` (kv_heads, n, 1) in
    `KV_INT8_SCALE_DTYPE`, symmetric (x ~ data * scale, scale = max |x| of the row / 127). One row is one
    token of one KV head, so a store of these is the int8 layout of `budget.py`. Indexing, assignment
    (a float tensor is quantized), `index_select` / `index_copy_` and `to` act on both parts alike."""

    __slots__ = ("data", "scale")

    def __init__(self, data: torch.Tensor, scale: torch.Tensor):
        self.data, self.scale = data, scale

    @classmethod
    def empty(cls, shape, device) -> Int8Rows:
        heads, n, dim = shape
        return cls(
            torch.empty(heads, n, dim, dtype=torch.int8, device=device),
            torch.empty(heads, n, 1, dtype=KV_INT8_SCALE_DTYPE, device=device),
        )

    @classmethod
    def quantize(cls, x: torch.Tensor) -> Int8Rows:
        """Symmetric per-row quantization of a (kv_heads, n, D) float tensor. The codes are computed with the
        scale as stored (rounded to its dtype), so `dequantize` reproduces x to half a step."""
        x = x.float()
        limit = torch.finfo(KV_INT8_SCALE_DTYPE).max
        scale = (x.abs().amax(-1, keepdim=True) / INT8_MAX).clamp_(max=limit).to(KV_INT8_SCALE_DTYPE)
        step = scale.float().clamp_(min=torch.finfo(torch.float32).tiny)  # a zero row stays zero
        data = (x / step).round_().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
        return cls(data, scale)

    def dequantize(self, dtype=torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
        """x ~ data * scale in `dtype`, into `out` if given. The codes are copied in exactly, then scaled in
        place; the product is formed in fp32 (fp16 scale against a bf16, fp16 or fp32 `out`) and rounded
        once. (Twice as fast on CPU as one mixed int8 x float multiply.)"""
        if out is None:
            out = torch.empty(self.data.shape, dtype=dtype, device=self.data.device)
        return out.copy_(self.data).mul_(self.scale)

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def dtype(self) -> torch.dtype:
        return torch.int8

    def _index(self, index):
        if not isinstance(index, tuple):
            index = (index,)
        if len(index) > 2:
            raise IndexError("Int8Rows are indexed along heads and tokens only")
        return index

    def __getitem__(self, index) -> Int8Rows:
        index = self._index(index)
        return Int8Rows(self.data[index], self.scale[index])

    def __setitem__(self, index, value) -> None:
        index = self._index(index)
        if not isinstance(value, Int8Rows):
            value = Int8Rows.quantize(value)
        self.data[index] = value.data
        self.scale[index] = value.scale

    def index_select(self, dim: int, index: torch.Tensor) -> Int8Rows:
        return Int8Rows(self.data.index_select(dim, index), self.scale.index_select(dim, index))

    def index_copy_(self, dim: int, index: torch.Tensor, source) -> Int8Rows:
        if not isinstance(source, Int8Rows):
            source = Int8Rows.quantize(source)
        self.data.index_copy_(dim, index, source.data)
        self.scale.index_copy_(dim, index, source.scale)
        return self

    def to(self, device, non_blocking: bool = False) -> Int8Rows:
        return Int8Rows(
            self.data.to(device, non_blocking=non_blocking), self.scale.to(device, non_blocking=non_blocking)
        )

    def contiguous(self) -> Int8Rows:
        return Int8Rows(self.data.contiguous(), self.scale.contiguous())

    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()


def kv_nbytes(t) -> int:
    """Bytes of a K or V tensor, int8 rows with their scales included."""
    return t.nbytes() if isinstance(t, Int8Rows) else t.numel() * t.element_size()


def empty_kv(shape, dtype, device, int8: bool):
    """An uninitialised (kv_heads, n, D) K or V buffer: `Int8Rows` or a tensor of `dtype`."""
    return Int8Rows.empty(shape, device) if int8 else torch.empty(shape, dtype=dtype, device=device)


def read_kv(t, dtype, device=None, non_blocking: bool = False) -> torch.Tensor:
    """A K or V slice on `device` (moved first, so int8 rows travel as int8), dequantized into `dtype` if
    int8 (a float slice is returned as it is)."""
    if device is not None:
        t = t.to(device, non_blocking=non_blocking)
    return t.dequantize(dtype) if isinstance(t, Int8Rows) else t


def check_kv_dtype(kv_dtype) -> bool:
    """Whether `kv_dtype` ("auto" or "int8") asks for the int8 store."""
    if kv_dtype not in KV_DTYPES:
        raise InputError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, got {kv_dtype!r}")
    return kv_dtype == "int8"


def dequantized_set(parts, k: torch.Tensor | None, dtype) -> torch.Tensor:
    """One layer's key (or value) set in `dtype`: the int8 slices `parts` one after another, then the exact
    `k` (the rows being computed), in a single buffer."""
    heads, dim = (k if k is not None else parts[0]).shape[0], (k if k is not None else parts[0]).shape[2]
    length = sum(p.shape[1] for p in parts) + (k.shape[1] if k is not None else 0)
    device = k.device if k is not None else parts[0].device
    out = torch.empty(heads, length, dim, dtype=dtype, device=device)
    cursor = 0
    for part in parts:
        part.dequantize(out=out[:, cursor : cursor + part.shape[1]])
        cursor += part.shape[1]
    if k is not None:
        out[:, cursor:] = k
    return out


def stored_attention(
    q: torch.Tensor,
    keys: Int8Rows,
    values: Int8Rows,
    length: int,
    k: torch.Tensor,
    v: torch.Tensor,
    rows: list[int] | None = None,
) -> torch.Tensor:
    """Attention of `q` (heads, n, D) over the int8 keys/values [0, length) followed by the exact `k`/`v`
    (kv_heads, t, D) of the rows being computed, grouped K/V heads never expanded. Every query sees all
    stored keys; of the exact ones, query i sees 0 .. rows[i] (None: lower-right causal, the queries being
    the last n of the t).

    Few queries (time tokens, a question, a generated token): an online softmax in fp32 over the exact keys,
    then over the stored ones `INT8_CHUNK` at a time, each chunk dequantized as it is read. Many queries
    (a pre-fill block): one dequantized copy of the layer's set and SDPA."""
    heads, n, dim = q.shape
    t = k.shape[1]
    if rows is None and n > INT8_SDPA_QUERIES:
        key_set = dequantized_set([keys[:, :length]], k, q.dtype)
        value_set = dequantized_set([values[:, :length]], v, q.dtype)
        return attention(q, key_set, value_set, causal=True)
    kv = k.shape[0]
    group = heads // kv
    qg = q.reshape(kv, group * n, dim).float() * dim**-0.5  # heads h = i * group + j share K/V head i
    if rows is None:
        visible = torch.ones(n, t, dtype=torch.bool, device=q.device).tril_(t - n)
    else:
        row = upload(torch.tensor(rows, dtype=torch.long), q.device)
        visible = torch.arange(t, device=q.device)[None] <= row[:, None]
    hidden = ~visible.repeat(group, 1)
    scores = (qg @ k.float().transpose(1, 2)).masked_fill_(hidden, float("-inf"))
    top = scores.amax(-1, keepdim=True)  # finite: every query sees at least itself
    weights = scores.sub_(top).clamp_(min=EXP_FLOOR).exp_().masked_fill_(hidden, 0)
    total = weights.sum(-1, keepdim=True)
    out = weights @ v.float()
    for a in range(0, length, INT8_CHUNK):
        b = min(a + INT8_CHUNK, length)
        scores = qg @ keys[:, a:b].dequantize().transpose(1, 2)
        new_top = torch.maximum(top, scores.amax(-1, keepdim=True))
        keep = (top - new_top).clamp_(min=EXP_FLOOR).exp_()
        weights = scores.sub_(new_top).clamp_(min=EXP_FLOOR).exp_()
        total = total * keep + weights.sum(-1, keepdim=True)
        out = out * keep + weights @ values[:, a:b].dequantize()
        top = new_top
    out = out / total
    return out.view(kv, group, n, dim).reshape(heads, n, dim).to(q.dtype)


@dataclass
class KVStore:
    """Per-layer K (rotated at original positions) and V of prefix + video, in buffers preallocated to the
    video's length plus `spare` slots (`keys`/`values` are views of the video part), and, for chunked
    pre-fill, a compact copy of the 'global' tokens (prefix and time tokens) every visual query sees.
    With int8 every buffer is `Int8Rows`."""

    key_buffers: list[torch.Tensor]
    value_buffers: list[torch.Tensor]
    global_keys: list[torch.Tensor]
    global_values: list[torch.Tensor]
    length: int
    keys: list[torch.Tensor] = field(init=False)
    values: list[torch.Tensor] = field(init=False)
    filled: int = 0
    global_filled: int = 0
    shift: int = 0  # rows removed after the prefix (a bounded live session's spilled units): token i >= the
    # prefix is at row i - shift; 0 everywhere else
    global_shift: int = 0  # the same for the global copy: the spilled units' time tokens (their sparse KV
    # holds them), global row j >= the prefix at j - global_shift

    def __post_init__(self):
        self.keys = [t[:, : self.length - self.shift] for t in self.key_buffers]
        self.values = [t[:, : self.length - self.shift] for t in self.value_buffers]

    @classmethod
    def allocate(
        cls,
        runner: LayerRunner,
        layout: TokenLayout,
        dtype,
        device,
        spare: int = SPARE_TOKENS,
        chunked=True,
        int8: bool = False,
    ) -> KVStore:
        length = layout.video_end
        shape = (runner.kv_heads, length + spare, runner.head_dim)
        count = layout.video_start + sum(g.visual_start - g.time_start for g in layout.groups)
        gshape = (runner.kv_heads, count, runner.head_dim)

        def empty(s):
            return [empty_kv(s, dtype, device, int8) for _ in range(runner.num_layers)]

        glob = (empty(gshape), empty(gshape)) if chunked else ([], [])
        return cls(empty(shape), empty(shape), *glob, length)

    @property
    def int8(self) -> bool:
        return isinstance(self.key_buffers[0], Int8Rows)

    @property
    def capacity(self) -> int:
        return int(self.key_buffers[0].shape[1])

    def nbytes(self) -> int:
        return sum(kv_nbytes(t) for t in (*self.keys, *self.values))

    def allocated_bytes(self) -> int:
        """Bytes of every buffer as allocated (spare slots and the global copy included)."""
        buffers = (*self.key_buffers, *self.value_buffers, *self.global_keys, *self.global_values)
        return sum(kv_nbytes(t) for t in buffers)

    def extend(self, length: int, global_count: int, spare: int = SPARE_TOKENS) -> None:
        """Room for a longer video (a live session's stream grows): `length` video tokens plus `spare`, and
        `global_count` global rows. A buffer that is short is re-allocated at twice its capacity (at least
        what is needed), its filled part copied, so a stream of n tokens costs O(n) copying in all."""
        need, rows = length - self.shift + spare, self.filled - self.shift
        if self.capacity < need:
            size = max(need, 2 * self.capacity)
            self.key_buffers = [regrown(t, size, rows) for t in self.key_buffers]
            self.value_buffers = [regrown(t, size, rows) for t in self.value_buffers]
        global_need, global_rows = global_count - self.global_shift, self.global_filled - self.global_shift
        if self.global_keys and self.global_keys[0].shape[1] < global_need:
            size = max(global_need, 2 * int(self.global_keys[0].shape[1]))
            self.global_keys = [regrown(t, size, global_rows) for t in self.global_keys]
            self.global_values = [regrown(t, size, global_rows) for t in self.global_values]
        self.length = length
        self.__post_init__()

    def compact(self, first_kept: int, video_start: int) -> None:
        """Drop the tokens [video_start, first_kept) (spilled elsewhere): the rows after them move down to
        the end of the prefix, and `shift` says by how much."""
        shift = first_kept - video_start
        if shift < self.shift or first_kept > self.filled:
            raise ValueError(
                f"cannot drop tokens up to {first_kept} (dropped up to {self.shift}, filled to {self.filled})"
            )
        a, b = first_kept - self.shift, self.filled - self.shift
        for t in (*self.key_buffers, *self.value_buffers):
            if isinstance(t, Int8Rows):
                t[:, video_start : video_start + b - a] = Int8Rows(
                    t.data[:, a:b].clone(), t.scale[:, a:b].clone()
                )
            else:
                t[:, video_start : video_start + b - a] = t[:, a:b].clone()
        self.shift = shift
        self.__post_init__()

    def compact_globals(self, first_kept: int, video_start: int) -> None:
        """Drop the global rows [video_start, first_kept) (time tokens of spilled units, which their sparse
        KV keeps): the rows after them move down to the end of the prefix, `global_shift` says by how much."""
        shift = first_kept - video_start
        if shift < self.global_shift or first_kept > self.global_filled:
            raise ValueError(f"cannot drop global rows up to {first_kept} (dropped: {self.global_shift})")
        a, b = first_kept - self.global_shift, self.global_filled - self.global_shift
        for t in (*self.global_keys, *self.global_values):
            t[:, video_start : video_start + b - a] = t[:, a:b].clone()
        self.global_shift = shift


def regrown(t, size: int, filled: int):
    """`t` (kv_heads, n, D) re-allocated with `size` rows, its first `filled` rows copied."""
    new = empty_kv((t.shape[0], size, t.shape[2]), t.dtype, t.device, isinstance(t, Int8Rows))
    new[:, :filled] = t[:, :filled]
    return new


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
    """Feeds prefix and group embeddings into a KVStore; `chunked=False` gives plain causal attention;
    `kv_dtype="int8"` stores int8 K/V (see the module docstring)."""

    def __init__(
        self,
        model,
        layout: TokenLayout,
        chunked: bool,
        block_size: int,
        prev_blocks: int,
        spare: int = SPARE_TOKENS,
        kv_dtype: str = "auto",
    ):
        self.model = model
        self.layout = layout
        self.runner = LayerRunner(model)
        self.chunked = chunked
        self.block_size = block_size
        self.prev_blocks = prev_blocks
        self.device = self.runner.device
        self.spare = spare
        self.int8 = check_kv_dtype(kv_dtype)
        self.store = KVStore.allocate(
            self.runner, layout, self.runner.dtype, self.device, spare, chunked, self.int8
        )
        self.stats = PrefillStats()
        self.groups_done = 0
        # A bounded live session drops old rows from the store (`KVStore.compact`); the time tokens of later
        # groups then see, in their place, what `history(layer)` gives: (keys rotated at their positions,
        # values) in the compute dtype. None: nothing was dropped.
        self.history = None
        # ... and their visual tokens, in place of the dropped global rows (`KVStore.compact_globals`), what
        # `global_history(layer)` gives: those time tokens' (keys rotated at their positions, values).
        self.global_history = None
        # Host-side geometry: where each group's time tokens go in the compact global store.
        self.global_start, count = [], layout.video_start
        for g in layout.groups:
            self.global_start.append(count)
            count += g.visual_start - g.time_start
        self.input_ids = upload(layout.input_ids, self.device)  # once, without blocking

    def extend(self, layout: TokenLayout) -> None:
        """Continue with `layout`, the layout of a longer video whose first groups are this one's (a live
        stream: groups are added as frames arrive). The new groups' token ids are uploaded, their global
        rows placed after the last ones, and the store grown (`KVStore.extend`); what is filled stays."""
        old = self.layout
        n = old.num_groups
        if (
            layout.video_start != old.video_start
            or layout.num_groups < n
            or layout.groups[:n] != old.groups
            or layout.video_token_id != old.video_token_id
            or not torch.equal(layout.input_ids[: old.video_end], old.input_ids[: old.video_end])
        ):
            raise ValueError("the new layout does not extend the pre-fill's layout")
        count = self.global_count()
        for g in layout.groups[n:]:
            self.global_start.append(count)
            count += g.visual_start - g.time_start
        self.store.extend(layout.video_end, count, self.spare)
        self.layout = layout
        self.input_ids = upload(layout.input_ids, self.device)

    def global_count(self) -> int:
        """Rows of the global copy the layout's groups need (prefix and every group's time tokens)."""
        if not self.layout.groups:
            return self.layout.video_start
        last = self.layout.groups[-1]
        return self.global_start[-1] + last.visual_start - last.time_start

    def mark(self) -> tuple:
        """Where the pre-fill stands (groups done, filled rows, counters), for `rewind`."""
        store, stats = self.store, self.stats
        return (self.groups_done, store.filled, store.global_filled, stats.attention_pairs, stats.dense_pairs)

    def rewind(self, mark: tuple) -> None:
        """Forget the groups added since `mark` (a live session's temporary tail): their rows stay in the
        buffers but count as empty, and the next groups overwrite them."""
        store, stats = self.store, self.stats
        self.groups_done, store.filled, store.global_filled, stats.attention_pairs, stats.dense_pairs = mark

    def _write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor, spans) -> None:
        """Store the slice's K/V at [start, start + n), and its global rows (local [a, b) -> global g0)."""
        store = self.store
        start -= store.shift
        end = start + k.shape[1]
        if self.int8:  # quantized once, for the store and the global copy alike
            k, v = Int8Rows.quantize(k), Int8Rows.quantize(v)
        store.key_buffers[layer][:, start:end] = k
        store.value_buffers[layer][:, start:end] = v
        for a, b, g0 in spans:
            g0 -= store.global_shift
            store.global_keys[layer][:, g0 : g0 + b - a] = k[:, a:b]
            store.global_values[layer][:, g0 : g0 + b - a] = v[:, a:b]

    def run_prefix(self) -> None:
        n = self.layout.video_start
        embeds = self.model.get_input_embeddings()(self.input_ids[:n])
        self._run_causal(embeds, 0, [(0, n, 0)] if self.chunked else [])
        self.store.global_filled = n if self.chunked else 0

    def _run_causal(self, embeds: torch.Tensor, start: int, spans) -> None:
        if self.store.shift:
            raise ValueError("plain causal pre-fill needs every earlier row in the store")
        n = embeds.shape[0]
        end = start + n
        store = self.store

        def attend(layer, q, k, v):
            self._write(layer, start, k, v, spans)
            if self.int8:  # the stored part read back from int8, this slice's own K/V exact
                return stored_attention(q, store.key_buffers[layer], store.value_buffers[layer], start, k, v)
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
        shift = store.shift
        if (shift or store.global_shift) and (self.int8 or old == window_start):
            raise ValueError("rows were dropped from the store that this block needs (int8, or its window)")
        if self.int8:
            attend = self._int8_block_attention(groups, start, window_start, old, spans)
            self.runner.forward(hidden, torch.arange(start, end, device=self.device), attend)
            self._count_block(groups, start, end, window_start, old, spans)
            return

        def attend(layer, q, k, v):
            self._write(layer, start, k, v, spans)
            keys, values = store.key_buffers[layer], store.value_buffers[layer]
            if old == window_start:  # the window reaches back to the prefix: the store itself is the set
                gathered_k, gathered_v = keys[:, :end], values[:, :end]
            else:
                window = slice(window_start - shift, end - shift)
                gk, gv = store.global_keys[layer], store.global_values[layer]
                if store.global_shift:  # prefix, the dropped rows' replacement, the rows kept
                    video, kept = self.layout.video_start, old - store.global_shift
                    hist_k, hist_v = self.global_history(layer)
                    gathered_k = torch.cat([gk[:, :video], hist_k, gk[:, video:kept], keys[:, window]], 1)
                    gathered_v = torch.cat([gv[:, :video], hist_v, gv[:, video:kept], values[:, window]], 1)
                else:
                    gathered_k = torch.cat([gk[:, :old], keys[:, window]], 1)
                    gathered_v = torch.cat([gv[:, :old], values[:, window]], 1)
            time_k, time_v, behind = keys, values, 0  # what the time tokens see; rows behind the store
            if shift:  # prefix, then what replaced the dropped rows, then the rows kept
                video = self.layout.video_start
                old_k, old_v = self.history(layer)
                time_k = torch.cat([keys[:, :video], old_k, keys[:, video : end - shift]], 1)
                time_v = torch.cat([values[:, :video], old_v, values[:, video : end - shift]], 1)
                behind = old_k.shape[1] - shift
            out = torch.empty_like(q)
            for g in groups:
                t0, v0, e0 = g.time_start - start, g.visual_start - start, g.end - start
                if v0 > t0:
                    m = g.visual_start + behind
                    out[:, t0:v0] = attention(q[:, t0:v0], time_k[:, :m], time_v[:, :m], causal=True)
                m = old + g.end - window_start
                out[:, v0:e0] = attention(q[:, v0:e0], gathered_k[:, :m], gathered_v[:, :m], causal=True)
            return out

        self.runner.forward(hidden, torch.arange(start, end, device=self.device), attend)
        self._count_block(groups, start, end, window_start, old, spans)

    def _int8_block_attention(self, groups, start: int, window_start: int, old: int, spans):
        """The attention of a chunked block over an int8 store: the same key sets as in full precision
        (`_run_block`), with what was stored before the block dequantized and the block's own K/V exact. The
        visual rows share one dequantized gathered set per layer (nested prefixes, SDPA); the time-token rows
        of all groups attend in one `stored_attention` call over the store [0, block start) and the block's
        own keys up to each row."""
        store = self.store
        time_rows = [(g.time_start - start, g.visual_start - start) for g in groups]
        rows = [r for a, b in time_rows for r in range(a, b)]
        seen = max(b for _, b in time_rows)  # exact keys any time token sees

        def attend(layer, q, k, v):
            self._write(layer, start, k, v, spans)
            keys, values = store.key_buffers[layer], store.value_buffers[layer]
            if old == window_start:  # the window reaches back to the prefix: the store itself is the set
                key_parts, value_parts = [keys[:, :start]], [values[:, :start]]
            else:
                gk, gv = store.global_keys[layer], store.global_values[layer]
                key_parts = [gk[:, :old], keys[:, window_start:start]]
                value_parts = [gv[:, :old], values[:, window_start:start]]
            gathered_k = dequantized_set(key_parts, k, q.dtype)
            gathered_v = dequantized_set(value_parts, v, q.dtype)
            out = torch.empty_like(q)
            for g in groups:
                v0, e0 = g.visual_start - start, g.end - start
                m = old + g.end - window_start
                out[:, v0:e0] = attention(q[:, v0:e0], gathered_k[:, :m], gathered_v[:, :m], causal=True)
            del gathered_k, gathered_v
            if rows:
                queries = torch.cat([q[:, a:b] for a, b in time_rows], 1)
                answers = stored_attention(queries, keys, values, start, k[:, :seen], v[:, :seen], rows=rows)
                cursor = 0
                for a, b in time_rows:
                    out[:, a:b] = answers[:, cursor : cursor + b - a]
                    cursor += b - a
            return out

        return attend

    def _count_block(self, groups, start: int, end: int, window_start: int, old: int, spans) -> None:
        store = self.store
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
    kv_dtype: str = "auto",
) -> StreamingPrefill:
    """Run prefix and all group batches (each a whole number of blocks, except the last)."""
    prefill = StreamingPrefill(model, layout, chunked, block_size, prev_blocks, kv_dtype=kv_dtype)
    prefill.run_prefix()
    for embeds in group_batches:
        prefill.add_groups(embeds)
    return prefill
