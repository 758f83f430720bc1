"""VideoMemory: what pre-filling leaves behind, from which every question is answered.

Per layer it keeps the dense KV of prefix + video (keys rotated at their original positions, as the
pre-fill computed them) and a sparse KV per group: the group's time tokens plus its visual KV average-pooled
along the sequence with step `compression` (144 -> 36 released). Sparse keys are stored *before* RoPE
(spec quirk 5), so pooling averages un-rotated keys and any assembled cache can place them anywhere.

`assemble` builds the cache a question runs on: prefix dense, then per selection unit (`unit_size` groups)
either its dense KV or its sparse KV. With `rerotate` (the release's bi-level way) the assembled keys sit at
contiguous positions 0..M-1; otherwise each key keeps its original position (pooled keys: the mean of
theirs) and the question continues at the original length.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import ConfigError, InputError
from ..prompt import GroupSpan, TokenLayout
from .prefill import KVStore, LayerRunner, apply_rope

FORMAT_VERSION = 1


@dataclass
class UnitInfo:
    index: int
    first_group: int
    last_group: int
    start_seconds: float
    end_seconds: float
    dense: bool = False
    score: float | None = None


@dataclass
class MixedCache:
    """A question's KV cache. `keys`/`values` are per-layer buffers (kv_heads, capacity, D) whose first
    `length` entries are filled (keys rotated at the positions the question expects); the spare capacity
    takes the question and answer tokens without reallocating."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int
    next_position: int  # position of the first question token
    unit_slices: list[tuple[int, int]]  # [start, end) of each unit inside the assembled cache
    dense_units: list[int] = field(default_factory=list)

    @property
    def capacity(self) -> int:
        return int(self.keys[0].shape[1])

    def nbytes(self) -> int:
        """Bytes of the filled part (what the video costs the question)."""
        return sum(t[:, : self.length].numel() * t.element_size() for t in (*self.keys, *self.values))

    def reserve(self, extra: int) -> None:
        """Make room for `extra` more tokens (one copy, only if the spare capacity is short)."""
        need = self.length + extra
        if need <= self.capacity:
            return
        grow = lambda t: torch.cat(
            [t[:, : self.length], t.new_empty(t.shape[0], need - self.length, t.shape[2])], 1
        )  # noqa: E731
        self.keys = [grow(t) for t in self.keys]
        self.values = [grow(t) for t in self.values]


class VideoMemory:
    def __init__(
        self,
        layout: TokenLayout,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        sparse_keys: list[torch.Tensor],
        sparse_values: list[torch.Tensor],
        sparse_offsets: list[int],
        sparse_positions: torch.Tensor,
        unit_size: int,
        compression: int,
    ):
        self.layout = layout
        self.keys, self.values = keys, values
        self.sparse_keys, self.sparse_values = sparse_keys, sparse_values
        self.sparse_offsets = sparse_offsets
        self.sparse_positions = sparse_positions
        self.unit_size = unit_size
        self.compression = compression

    # -- construction ----------------------------------------------------------------------------------
    @classmethod
    def from_store(
        cls, store: KVStore, layout: TokenLayout, runner: LayerRunner, unit_size: int, compression: int
    ) -> VideoMemory:
        """Take the dense KV from a finished pre-fill and derive the sparse KV of every group."""
        per_group = layout.groups[0].end - layout.groups[0].visual_start
        if per_group % compression:
            raise ConfigError(
                f"compression {compression} must divide the {per_group} visual tokens of a group"
            )
        device = store.keys[0].device
        time_rows, pooled_rows, offsets, positions = [], [], [0], []
        pooled_per_group = per_group // compression
        for group in layout.groups:
            count = group.visual_start - group.time_start
            time_rows.append(torch.arange(group.time_start, group.visual_start))
            positions.append(torch.arange(group.time_start, group.visual_start, dtype=torch.float64))
            visual = torch.arange(group.visual_start, group.end, dtype=torch.float64)
            positions.append(visual.view(pooled_per_group, compression).mean(1))
            pooled_rows.append(torch.arange(group.visual_start, group.end))
            offsets.append(offsets[-1] + count + pooled_per_group)
        time_index = torch.cat(time_rows).to(device)
        visual_index = torch.cat(pooled_rows).to(device)
        # Where each piece lands in the sparse sequence: per group, its time tokens then its pooled tokens.
        is_time = torch.cat(
            [
                torch.cat(
                    [torch.ones(len(t), dtype=torch.bool), torch.zeros(pooled_per_group, dtype=torch.bool)]
                )
                for t in time_rows
            ]
        ).to(device)
        sparse_keys, sparse_values = [], []
        time_tables = runner.rope_tables(-time_index.double(), store.keys[0])
        visual_tables = runner.rope_tables(-visual_index.double(), store.keys[0])
        for keys, values in zip(store.keys, store.values):
            pre_time = apply_rope(keys[:, time_index], *time_tables)  # undo RoPE: rotate back
            pre_visual = apply_rope(keys[:, visual_index], *visual_tables)
            pooled_k = pool(pre_visual, compression)
            pooled_v = pool(values[:, visual_index], compression)
            k = keys.new_empty(keys.shape[0], offsets[-1], keys.shape[2])
            v = torch.empty_like(k)
            k[:, is_time], v[:, is_time] = pre_time, values[:, time_index]
            k[:, ~is_time], v[:, ~is_time] = pooled_k, pooled_v
            sparse_keys.append(k)
            sparse_values.append(v)
        return cls(
            layout,
            store.keys,
            store.values,
            sparse_keys,
            sparse_values,
            offsets,
            torch.cat(positions),
            unit_size,
            compression,
        )

    # -- geometry -----------------------------------------------------------------------------------------
    @property
    def num_units(self) -> int:
        return -(-self.layout.num_groups // self.unit_size)

    def unit_groups(self, unit: int) -> tuple[int, int]:
        first = unit * self.unit_size
        return first, min(first + self.unit_size, self.layout.num_groups) - 1

    def units(self) -> list[UnitInfo]:
        groups = self.layout.groups
        infos = []
        for u in range(self.num_units):
            first, last = self.unit_groups(u)
            end = groups[last + 1].seconds if last + 1 < len(groups) else None
            infos.append(
                UnitInfo(
                    u, first, last, groups[first].seconds, end if end is not None else groups[last].seconds
                )
            )
        return infos

    @property
    def device(self) -> torch.device:
        return self.keys[0].device

    def dense_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def sparse_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.sparse_keys, *self.sparse_values))

    def to(self, device) -> VideoMemory:
        """Move the dense KV (the bulk) to `device`, e.g. "cpu" to offload while the model stays on GPU;
        `assemble` gathers what a question needs back onto the compute device."""
        self.keys = [t.to(device) for t in self.keys]
        self.values = [t.to(device) for t in self.values]
        return self

    # -- assembling a question's cache --------------------------------------------------------------------
    def assemble(
        self, runner: LayerRunner, dense_units=None, rerotate: bool = True, device=None, reserve: int = 0
    ) -> MixedCache:
        """Cache for a question: prefix dense, each unit dense if in `dense_units` (None: all) else sparse;
        `reserve` spare slots for the question and answer."""
        layout = self.layout
        device = torch.device(device) if device is not None else self.sparse_keys[0].device
        dense = set(range(self.num_units)) if dense_units is None else {int(u) for u in dense_units}
        bad = sorted(u for u in dense if not 0 <= u < self.num_units)
        if bad:
            raise InputError(f"selected units {bad} out of range: the video has {self.num_units} units")
        dense_src = [torch.arange(0, layout.video_start)]
        dense_dst = [torch.arange(0, layout.video_start)]
        sparse_src, sparse_dst, slices = [], [], []
        cursor = layout.video_start
        for u in range(self.num_units):
            first, last = self.unit_groups(u)
            if u in dense:
                start, end = layout.groups[first].time_start, layout.groups[last].end
                dense_src.append(torch.arange(start, end))
                dense_dst.append(torch.arange(cursor, cursor + end - start))
            else:
                start, end = self.sparse_offsets[first], self.sparse_offsets[last + 1]
                sparse_src.append(torch.arange(start, end))
                sparse_dst.append(torch.arange(cursor, cursor + end - start))
            slices.append((cursor, cursor + end - start))
            cursor += end - start
        dense_src, dense_dst = torch.cat(dense_src), torch.cat(dense_dst)
        sparse_src = torch.cat(sparse_src) if sparse_src else torch.zeros(0, dtype=torch.long)
        sparse_dst = torch.cat(sparse_dst) if sparse_dst else torch.zeros(0, dtype=torch.long)
        # Rotation each key still needs: dense keys carry their original angle, sparse keys none.
        if rerotate:
            dense_turn = (dense_dst - dense_src).double()
            sparse_turn = sparse_dst.double()
            next_position = cursor
        else:
            dense_turn = torch.zeros(dense_src.numel(), dtype=torch.float64)
            sparse_turn = self.sparse_positions[sparse_src]
            next_position = layout.video_end
        keys, values = [], []
        for layer in range(len(self.keys)):
            shape = (self.keys[layer].shape[0], cursor + reserve, self.keys[layer].shape[2])
            k = torch.empty(shape, dtype=self.keys[layer].dtype, device=device)
            v = torch.empty_like(k)
            k[:, dense_dst.to(device)] = self.keys[layer][:, dense_src.to(self.device)].to(device)
            v[:, dense_dst.to(device)] = self.values[layer][:, dense_src.to(self.device)].to(device)
            if sparse_src.numel():
                k[:, sparse_dst.to(device)] = self.sparse_keys[layer][:, sparse_src.to(device)]
                v[:, sparse_dst.to(device)] = self.sparse_values[layer][:, sparse_src.to(device)]
            keys.append(k)
            values.append(v)
        turns = torch.empty(cursor, dtype=torch.float64)
        turns[dense_dst], turns[sparse_dst] = dense_turn, sparse_turn
        if turns.abs().max() > 0:
            cos, sin = runner.rope_tables(turns.to(device), keys[0])
            for k in keys:
                k[:, :cursor] = apply_rope(k[:, :cursor], cos, sin)
        return MixedCache(keys, values, cursor, next_position, slices, sorted(dense))

    # -- persistence ----------------------------------------------------------------------------------------
    def save(self, path, metadata: dict | None = None) -> Path:
        """Write to one safetensors file (atomically: a temp file renamed into place)."""
        path = Path(path)
        tensors = {"input_ids": self.layout.input_ids.contiguous(), "sparse_positions": self.sparse_positions}
        for i in range(len(self.keys)):
            tensors[f"keys.{i}"] = self.keys[i].contiguous().cpu()
            tensors[f"values.{i}"] = self.values[i].contiguous().cpu()
            tensors[f"sparse_keys.{i}"] = self.sparse_keys[i].contiguous().cpu()
            tensors[f"sparse_values.{i}"] = self.sparse_values[i].contiguous().cpu()
        header = dict(
            format=FORMAT_VERSION,
            groups=[[g.time_start, g.visual_start, g.end, g.seconds] for g in self.layout.groups],
            video_start=self.layout.video_start,
            video_end=self.layout.video_end,
            video_token_id=self.layout.video_token_id,
            sparse_offsets=self.sparse_offsets,
            unit_size=self.unit_size,
            compression=self.compression,
            extra=metadata or {},
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"videoxl2": json.dumps(header)})
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path, device="cpu") -> tuple[VideoMemory, dict]:
        """Read a file written by `save`; returns the memory and the caller's metadata."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: no such memory file")
        try:
            with safe_open(path, framework="pt", device=str(device)) as handle:
                header = json.loads((handle.metadata() or {})["videoxl2"])
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        except Exception as err:
            raise InputError(f"{path}: not a videoxl2 memory file ({err})") from err
        if header.get("format") != FORMAT_VERSION:
            raise InputError(f"{path}: memory format {header.get('format')}, expected {FORMAT_VERSION}")
        layers = sum(1 for name in tensors if name.startswith("keys."))
        layout = TokenLayout(
            input_ids=tensors["input_ids"].cpu(),
            groups=[GroupSpan(int(a), int(b), int(c), float(s)) for a, b, c, s in header["groups"]],
            video_start=header["video_start"],
            video_end=header["video_end"],
            video_token_id=header["video_token_id"],
        )
        memory = cls(
            layout,
            [tensors[f"keys.{i}"] for i in range(layers)],
            [tensors[f"values.{i}"] for i in range(layers)],
            [tensors[f"sparse_keys.{i}"] for i in range(layers)],
            [tensors[f"sparse_values.{i}"] for i in range(layers)],
            header["sparse_offsets"],
            tensors["sparse_positions"].cpu(),
            header["unit_size"],
            header["compression"],
        )
        return memory, header.get("extra", {})


def pool(x: torch.Tensor, step: int) -> torch.Tensor:
    """(heads, G*T, D) -> (heads, G*T/step, D): mean of each `step` consecutive tokens (within groups,
    since T is a multiple of `step`)."""
    heads, n, dim = x.shape
    return x.view(heads, n // step, step, dim).float().mean(2).to(x.dtype)
