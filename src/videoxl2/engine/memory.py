"""VideoMemory: what pre-filling leaves behind, from which every question is answered.

Per layer it keeps the dense KV of prefix + video (keys rotated at their original positions, as the
pre-fill computed them), in the pre-fill store's own buffers: they have spare capacity past the video, so a
question asked with every unit dense (dense and chunked modes) runs on the store itself — its tokens and the
answer's go into the spare slots, the video part is never written, and nothing is copied.

For bi-level questions there is also a sparse KV per group: the group's time tokens plus its visual KV
average-pooled along the sequence with step `compression` (144 -> 36 released). It is built from the dense
KV the first time a question needs it (`build_sparse`), never in dense or chunked sessions. Sparse keys are
stored *before* RoPE (spec quirk 5), so pooling averages un-rotated keys and any assembled cache can place
them anywhere.

`assemble` builds a separate cache: prefix dense, then per selection unit (`unit_size` groups) either its
dense KV or its sparse KV. With `rerotate` (the release's bi-level way) the assembled keys sit at contiguous
positions 0..M-1; otherwise each key keeps its original position (pooled keys: the mean of theirs) and the
question continues at the original length. `question_cache` picks the store itself or `assemble`.

An int8 memory (`kv_dtype="int8"` pre-fill) holds `Int8Rows` everywhere: the dense store, the sparse KV
(built from the dense KV dequantized a chunk at a time: keys un-rotated, visual tokens pooled, then
quantized; time-token values copied as they are) and an assembled cache (rows copied as int8; keys that must
turn are dequantized, rotated and quantized again, `ROPE_CHUNK` at a time). Such a memory works with a model
computing in any floating dtype: attention dequantizes into it.

A saved memory says where it came from (header fields beside the caller's `extra`): the model's identity
(`model_identity`: the architecture fields that shape the KV and a fingerprint of the weights), the engine
settings it was pre-filled with, the compute dtype, and, when a session wrote it, the frame times and the
source's name. `VideoSession.from_memory` reads them to refuse a memory from another model.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import ConfigError, InputError
from ..prompt import GroupSpan, TokenLayout
from .prefill import SPARE_TOKENS, Int8Rows, KVStore, empty_kv, kv_nbytes, read_kv
from .runner import ROPE_CHUNK, LayerRunner, apply_rope, upload

FORMAT_VERSION = 1  # identity fields were added without a new version: older readers ignore them
SPARSE_CHUNK_GROUPS = 64  # groups turned into sparse KV at a time (bounds the fp32 temporaries)


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

    @property
    def int8(self) -> bool:
        return isinstance(self.keys[0], Int8Rows)

    def nbytes(self) -> int:
        """Bytes of the filled part (what the video costs the question), int8 scales included."""
        return sum(kv_nbytes(t[:, : self.length]) for t in (*self.keys, *self.values))

    def reserve(self, extra: int) -> None:
        """Make room for `extra` more tokens (one copy, only if the spare capacity is short)."""
        need = self.length + extra
        if need <= self.capacity:
            return

        def grow(t):
            new = empty_kv((t.shape[0], need, t.shape[2]), t.dtype, t.device, isinstance(t, Int8Rows))
            new[:, : self.length] = t[:, : self.length]
            return new

        self.keys = [grow(t) for t in self.keys]
        self.values = [grow(t) for t in self.values]


def _same_device(a: torch.device, b: torch.device) -> bool:
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.type == "cuda":
        current = torch.cuda.current_device() if torch.cuda.is_available() else 0
        return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)
    return True


class VideoMemory:
    def __init__(
        self,
        layout: TokenLayout,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        unit_size: int,
        compression: int,
        sparse_keys: list[torch.Tensor] | None = None,
        sparse_values: list[torch.Tensor] | None = None,
    ):
        """`keys`/`values`: per layer (kv_heads, capacity, D) with capacity >= the video's length; the part
        past the video is spare room for question caches."""
        self.layout = layout
        self._key_buffers, self._value_buffers = list(keys), list(values)
        self._set_views()
        self.unit_size = unit_size
        self.compression = compression
        self.sparse_keys, self.sparse_values = sparse_keys, sparse_values
        self._lent = False  # the spare capacity is in use by a question cache
        per_group = [g.end - g.visual_start for g in layout.groups]
        if any(count % compression for count in per_group):
            raise ConfigError(
                f"compression {compression} must divide the {per_group[0]} visual tokens of a group"
            )
        self.sparse_offsets = [0]
        for g, count in zip(layout.groups, per_group):
            tokens = g.visual_start - g.time_start + count // compression
            self.sparse_offsets.append(self.sparse_offsets[-1] + tokens)

    def _set_views(self) -> None:
        length = self.layout.video_end
        self.keys = [t[:, :length] for t in self._key_buffers]
        self.values = [t[:, :length] for t in self._value_buffers]

    # -- construction ----------------------------------------------------------------------------------
    @classmethod
    def from_store(
        cls, store: KVStore, layout: TokenLayout, runner: LayerRunner, unit_size: int, compression: int
    ) -> VideoMemory:
        """Take a finished pre-fill's store (its buffers, not a copy). The sparse KV comes later, if a
        bi-level question needs it (`build_sparse`)."""
        return cls(layout, store.key_buffers, store.value_buffers, unit_size, compression)

    @property
    def has_sparse(self) -> bool:
        return self.sparse_keys is not None

    @property
    def sparse_positions(self) -> torch.Tensor:
        """(S,) float64: the original position of each sparse token (pooled ones: the mean of theirs)."""
        positions = []
        for group in self.layout.groups:
            positions.append(torch.arange(group.time_start, group.visual_start, dtype=torch.float64))
            visual = torch.arange(group.visual_start, group.end, dtype=torch.float64)
            positions.append(visual.view(-1, self.compression).mean(1))
        return torch.cat(positions)

    @torch.inference_mode()
    def build_sparse(self, runner: LayerRunner) -> None:
        """Derive every group's sparse KV from the dense KV (once), on the model's device.

        Groups are processed `SPARSE_CHUNK_GROUPS` at a time: the chunk's dense keys are rotated back to
        position 0 (RoPE undone), its time tokens kept and its visual tokens pooled, then written into the
        sparse buffers; temporaries stay the size of one chunk of one layer. An int8 memory reads the chunk
        dequantized into the compute dtype and writes int8 (time-token values are copied as they are)."""
        if self.sparse_keys is not None:
            return
        self.check_model(runner)
        device, layout, step = runner.device, self.layout, self.compression
        shape = (self.keys[0].shape[0], self.sparse_offsets[-1], self.keys[0].shape[2])
        int8 = self.int8
        sparse_keys = [empty_kv(shape, self.dtype, device, int8) for _ in self.keys]
        sparse_values = [empty_kv(shape, self.dtype, device, int8) for _ in self.keys]
        groups = layout.groups
        for first in range(0, len(groups), SPARSE_CHUNK_GROUPS):
            chunk = groups[first : first + SPARSE_CHUNK_GROUPS]
            a, b = chunk[0].time_start, chunk[-1].end
            time_rows, visual_rows, time_dst, pooled_dst = sparse_rows(chunk, step, device)
            cos, sin = runner.rope_tables(-torch.arange(a, b, dtype=torch.float64), device)
            s0, s1 = self.sparse_offsets[first], self.sparse_offsets[first + len(chunk)]
            for layer in range(len(self.keys)):
                keys = read_kv(self.keys[layer][:, a:b], runner.dtype, device, non_blocking=True)
                stored_values = self.values[layer][:, a:b].to(device, non_blocking=True)
                values = read_kv(stored_values, runner.dtype)
                pre = apply_rope(keys, cos, sin)  # undo RoPE: rotate back
                out_k, out_v = sparse_keys[layer][:, s0:s1], sparse_values[layer][:, s0:s1]
                out_k.index_copy_(1, time_dst, pre.index_select(1, time_rows))
                out_v.index_copy_(1, time_dst, stored_values.index_select(1, time_rows))
                out_k.index_copy_(1, pooled_dst, pool(pre.index_select(1, visual_rows), step))
                out_v.index_copy_(1, pooled_dst, pool(values.index_select(1, visual_rows), step))
        self.sparse_keys, self.sparse_values = sparse_keys, sparse_values

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

    @property
    def dtype(self) -> torch.dtype:
        """The stored element type: the model's compute dtype, or torch.int8."""
        return self.keys[0].dtype

    @property
    def int8(self) -> bool:
        return isinstance(self.keys[0], Int8Rows)

    @property
    def spare(self) -> int:
        """Slots past the video in the dense buffers (room for a question and its answer)."""
        return int(self._key_buffers[0].shape[1]) - self.layout.video_end

    def dense_bytes(self) -> int:
        """Bytes of the video's dense KV (int8 scales included)."""
        return sum(kv_nbytes(t) for t in (*self.keys, *self.values))

    def sparse_bytes(self) -> int:
        """Bytes the sparse KV holds now (0 until a bi-level question built it)."""
        if self.sparse_keys is None:
            return 0
        return sum(kv_nbytes(t) for t in (*self.sparse_keys, *self.sparse_values))

    def sparse_size_bytes(self) -> int:
        """Bytes the sparse KV takes once built."""
        per_token = kv_nbytes(self.keys[0][:, :1])  # one token of one layer's K, every KV head
        return 2 * len(self.keys) * self.sparse_offsets[-1] * per_token

    def to(self, device) -> VideoMemory:
        """Move the dense KV (the bulk) to `device`, e.g. "cpu" to offload while the model stays on GPU;
        `assemble` gathers what a question needs back onto the compute device. The spare room is dropped."""
        if _same_device(device, self.device):
            return self
        self._key_buffers = [t.to(device) for t in self.keys]
        self._value_buffers = [t.to(device) for t in self.values]
        self._set_views()
        return self

    def check_model(self, runner: LayerRunner) -> None:
        """Refuse (one line) a model computing in another dtype than the memory holds (an int8 memory
        dequantizes into whatever the model computes in)."""
        if runner.dtype != self.dtype and not self.int8:
            raise InputError(
                f"this video memory holds {str(self.dtype).removeprefix('torch.')} KV but the model computes "
                f"in {str(runner.dtype).removeprefix('torch.')}: load it with VideoMemory.load(..., "
                f"dtype=torch.{str(runner.dtype).removeprefix('torch.')})"
            )

    # -- a question's cache -------------------------------------------------------------------------------
    def _check_units(self, dense_units) -> set[int]:
        dense = set(range(self.num_units)) if dense_units is None else {int(u) for u in dense_units}
        bad = sorted(u for u in dense if not 0 <= u < self.num_units)
        if bad:
            raise InputError(f"selected units {bad} out of range: the video has {self.num_units} units")
        return dense

    def _grow(self, spare: int) -> None:
        """Re-allocate the dense buffers with `spare` slots past the video (one layer at a time)."""
        length = self.layout.video_end
        for buffers in (self._key_buffers, self._value_buffers):
            for i, old in enumerate(buffers):
                new = empty_kv((old.shape[0], length + spare, old.shape[2]), old.dtype, old.device, self.int8)
                new[:, :length] = old[:, :length]
                buffers[i] = new
        self._set_views()

    @contextmanager
    def question_cache(self, runner: LayerRunner, dense_units=None, rerotate=True, device=None, reserve=0):
        """The cache a question runs on, with room for `reserve` more tokens.

        Every unit dense, on the compute device: the memory's own buffers — the question and answer go into
        the spare slots past the video (grown once, for good, if they are short) and the video part is never
        written, so nothing is copied; the slots are free again when the block ends. Otherwise (a bi-level
        selection, an offloaded memory, or the spare slots already lent to another question): `assemble`."""
        self.check_model(runner)
        device = runner.device if device is None else torch.device(device)
        dense = self._check_units(dense_units)
        if len(dense) < self.num_units or self._lent or not _same_device(device, self.device):
            yield self.assemble(runner, dense_units, rerotate=rerotate, device=device, reserve=reserve)
            return
        if reserve > self.spare:
            self._grow(max(reserve, SPARE_TOKENS))
        length = self.layout.video_end
        slices, cursor = [], self.layout.video_start
        for u in range(self.num_units):
            first, last = self.unit_groups(u)
            end = self.layout.groups[last].end
            slices.append((cursor, end))
            cursor = end
        self._lent = True
        try:
            yield MixedCache(
                list(self._key_buffers), list(self._value_buffers), length, length, slices, sorted(dense)
            )
        finally:
            self._lent = False

    def assemble(
        self, runner: LayerRunner, dense_units=None, rerotate: bool = True, device=None, reserve: int = 0
    ) -> MixedCache:
        """A new cache for a question: prefix dense, each unit dense if in `dense_units` (None: all) else
        sparse; `reserve` spare slots for the question and answer. (`question_cache` avoids the copy when
        every unit is dense.)"""
        self.check_model(runner)
        layout = self.layout
        device = torch.device(device) if device is not None else runner.device
        dense = self._check_units(dense_units)
        if len(dense) < self.num_units:
            self.build_sparse(runner)
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
        # Index tensors are made on the host and uploaded once, not per layer.
        d_src, d_dst = upload(dense_src, self.device), upload(dense_dst, device)
        s_src, s_dst = upload(sparse_src, device), upload(sparse_dst, device)
        keys, values = [], []
        for layer in range(len(self.keys)):
            shape = (self.keys[layer].shape[0], cursor + reserve, self.keys[layer].shape[2])
            k = empty_kv(shape, self.dtype, device, self.int8)
            v = empty_kv(shape, self.dtype, device, self.int8)
            k.index_copy_(1, d_dst, self.keys[layer].index_select(1, d_src).to(device))
            v.index_copy_(1, d_dst, self.values[layer].index_select(1, d_src).to(device))
            if sparse_src.numel():
                k.index_copy_(1, s_dst, self.sparse_keys[layer].index_select(1, s_src))
                v.index_copy_(1, s_dst, self.sparse_values[layer].index_select(1, s_src))
            keys.append(k)
            values.append(v)
        turns = torch.empty(cursor, dtype=torch.float64)
        turns[dense_dst], turns[sparse_dst] = dense_turn, sparse_turn
        if self.int8:
            rotate_int8_(runner, keys, turns)
        else:
            runner.rotate_(keys, turns)
        return MixedCache(keys, values, cursor, next_position, slices, sorted(dense))

    # -- persistence ----------------------------------------------------------------------------------------
    def save(
        self,
        path,
        metadata: dict | None = None,
        *,
        model=None,
        settings=None,
        timestamps=None,
        source: str | None = None,
    ) -> Path:
        """Write to one safetensors file (atomically: a temp file renamed into place). The sparse KV is
        written only if it was built.

        `metadata` is the caller's own (returned by `load`). The rest goes into the header's own fields so
        that the file can be reopened without the video: `model` (the model that pre-filled it: its
        `model_identity` and compute dtype), `settings` (the `EngineSettings` it was pre-filled with; those
        the memory itself fixes must agree with it), `timestamps` (frame times) and `source` (a name for
        the video). `VideoSession.save_memory` passes them all."""
        path = Path(path)
        tensors = {"input_ids": self.layout.input_ids.contiguous()}
        kinds = {"keys": self.keys, "values": self.values}
        if self.sparse_keys is not None:
            kinds.update(sparse_keys=self.sparse_keys, sparse_values=self.sparse_values)
        for i in range(len(self.keys)):
            for kind, layers in kinds.items():
                t = layers[i]
                if isinstance(t, Int8Rows):  # int8 codes, and a (kv_heads, tokens) scale tensor beside them
                    tensors[f"scales.{kind}.{i}"] = t.scale[..., 0].contiguous().cpu()
                    t = t.data
                tensors[f"{kind}.{i}"] = t.contiguous().cpu()
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
        if self.int8:
            header["kv_dtype"] = "int8"
        header.update(self._origin(model, settings, timestamps, source))
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

    def _origin(self, model, settings, timestamps, source) -> dict:
        """The header fields saying where this memory came from (see `save`)."""
        origin = {}
        if model is not None:
            dtype = model.get_input_embeddings().weight.dtype
            if dtype != self.dtype and not self.int8:
                held, computes = dtype_name(self.dtype), dtype_name(dtype)
                raise ConfigError(f"this memory holds {held} KV, the model computes in {computes}")
            origin["model"] = model_identity(model)
            origin["compute_dtype"] = dtype_name(dtype)
        elif not self.int8:
            origin["compute_dtype"] = dtype_name(self.dtype)
        if settings is not None:
            record = engine_record(settings)
            held = dict(unit_size=self.unit_size, compression=self.compression, kv_dtype=self.kv_dtype)
            wrong = [f"{k} {record[k]!r} (the memory: {v!r})" for k, v in held.items() if record[k] != v]
            if wrong:
                raise ConfigError(f"the settings do not describe this memory: {', '.join(wrong)}")
            origin["engine"] = record
        if timestamps is not None:
            origin["timestamps"] = [float(t) for t in timestamps]
        if source is not None:
            origin["source"] = str(source)
        return origin

    @property
    def kv_dtype(self) -> str:
        """The `EngineSettings.kv_dtype` that made this memory."""
        return "int8" if self.int8 else "auto"

    @classmethod
    def load(cls, path, device="cpu", dtype: torch.dtype | None = None) -> tuple[VideoMemory, dict]:
        """Read a file written by `save` onto `device`, converted to `dtype` (None: as stored); returns the
        memory and the caller's metadata. A memory used with a model of another dtype is refused
        (`check_model`), so load it in the dtype the model computes in. An int8 memory (int8 codes and
        their scales) stays int8 whatever `dtype` says: it serves a model of any floating dtype."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: no such memory file")
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as err:
            raise InputError(f"{path}: cannot load onto device {device!r} ({err})") from err
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise InputError(f"{path}: a video memory holds floating-point KV, cannot convert it to {dtype}")
        try:
            with safe_open(path, framework="pt", device="cpu") as handle:
                header = json.loads((handle.metadata() or {})["videoxl2"])
                names = set(handle.keys())
                if header.get("format") != FORMAT_VERSION:
                    raise InputError(
                        f"{path}: memory format {header.get('format')}, expected {FORMAT_VERSION}"
                    )
                layout = TokenLayout(
                    input_ids=handle.get_tensor("input_ids"),
                    groups=[GroupSpan(int(a), int(b), int(c), float(s)) for a, b, c, s in header["groups"]],
                    video_start=header["video_start"],
                    video_end=header["video_end"],
                    video_token_id=header["video_token_id"],
                )
                layers = sum(1 for name in names if name.startswith("keys."))
                has_sparse = f"sparse_keys.{layers - 1}" in names
                int8 = header.get("kv_dtype") == "int8"
                tensors = {"keys": [], "values": [], "sparse_keys": [], "sparse_values": []}
                for kind, tensor_list in tensors.items():
                    if kind.startswith("sparse") and not has_sparse:
                        continue
                    spare = 0 if kind.startswith("sparse") else SPARE_TOKENS
                    for i in range(layers):
                        read = _read_int8_layer if int8 else _read_layer
                        tensor_list.append(read(handle, f"{kind}.{i}", spare, device, dtype))
        except InputError:
            raise
        except Exception as err:
            raise InputError(f"{path}: not a videoxl2 memory file ({err})") from err
        shapes = {t.shape[::2] for t in (*tensors["keys"], *tensors["values"])}
        dtypes = {t.dtype for group in tensors.values() for t in group}
        if not layers or len(shapes) != 1 or len(dtypes) != 1:
            raise InputError(f"{path}: inconsistent KV tensors (shapes {sorted(shapes)}, dtypes {dtypes})")
        if any(t.shape[1] < layout.video_end for t in tensors["keys"]):
            raise InputError(f"{path}: KV shorter than the video's {layout.video_end} tokens")
        memory = cls(
            layout,
            tensors["keys"],
            tensors["values"],
            header["unit_size"],
            header["compression"],
            tensors["sparse_keys"] or None,
            tensors["sparse_values"] or None,
        )
        if memory.sparse_offsets != header["sparse_offsets"]:
            raise InputError(f"{path}: sparse offsets do not match the layout")
        return memory, header.get("extra", {})


def _read_int8_layer(handle, name: str, spare: int, device: torch.device, dtype=None) -> Int8Rows:
    """One stored int8 (kv_heads, n, D) tensor and its (kv_heads, n) scales as `Int8Rows` on `device`, with
    `spare` empty slots after them (`dtype` does not apply: the rows stay int8)."""
    data, scale = handle.get_tensor(name), handle.get_tensor(f"scales.{name}")
    if data.dim() != 3 or data.dtype != torch.int8 or scale.shape != data.shape[:2]:
        raise InputError(f"{name}: expected int8 (kv_heads, tokens, head_dim) with one scale per row")
    heads, length, dim = data.shape
    out = Int8Rows.empty((heads, length + spare, dim), device)
    out[:, :length] = Int8Rows(data, scale[..., None])
    return out


def rotate_int8_(runner: LayerRunner, keys: list[Int8Rows], turns: torch.Tensor) -> None:
    """`LayerRunner.rotate_` for int8 keys: only the rows whose turn is not zero are dequantized (compute
    dtype), rotated and quantized again, `ROPE_CHUNK` rows at a time; the others keep their codes."""
    for a in range(0, turns.numel(), ROPE_CHUNK):
        part = turns[a : a + ROPE_CHUNK]
        moved = part.nonzero()[:, 0]  # host tensor: no device sync
        if not moved.numel():
            continue
        cos, sin = runner.rope_tables(part[moved], keys[0].device)
        rows = upload(moved + a, keys[0].device)
        for k in keys:
            turned = apply_rope(k.index_select(1, rows).dequantize(runner.dtype), cos, sin)
            k.index_copy_(1, rows, turned)


def _read_layer(handle, name: str, spare: int, device: torch.device, dtype) -> torch.Tensor:
    """One stored (kv_heads, n, D) tensor on `device` in `dtype`, with `spare` empty slots after it."""
    stored = handle.get_tensor(name)
    if stored.dim() != 3 or not stored.dtype.is_floating_point:
        raise InputError(f"{name}: expected floating-point (kv_heads, tokens, head_dim), got {stored.dtype}")
    heads, length, dim = stored.shape
    out = torch.empty(heads, length + spare, dim, dtype=dtype or stored.dtype, device=device)
    out[:, :length] = stored
    return out


def sparse_rows(chunk, step: int, device) -> tuple[torch.Tensor, ...]:
    """Where a run of groups' sparse KV comes from and goes, on `device`: (time-token rows, visual rows) in
    the run's dense KV (counted from its first group's start), and (time-token slots, pooled slots) in its
    sparse KV (from the run's first sparse slot): time tokens kept, visual tokens pooled `step` to one."""
    a = chunk[0].time_start
    time_rows, visual_rows, time_dst, pooled_dst = [], [], [], []
    cursor = 0
    for g in chunk:
        count, pooled = g.visual_start - g.time_start, (g.end - g.visual_start) // step
        time_rows.append(torch.arange(g.time_start - a, g.visual_start - a))
        visual_rows.append(torch.arange(g.visual_start - a, g.end - a))
        time_dst.append(torch.arange(cursor, cursor + count))
        pooled_dst.append(torch.arange(cursor + count, cursor + count + pooled))
        cursor += count + pooled
    return tuple(upload(torch.cat(x), device) for x in (time_rows, visual_rows, time_dst, pooled_dst))


def pool(x: torch.Tensor, step: int) -> torch.Tensor:
    """(heads, G*T, D) -> (heads, G*T/step, D): mean of each `step` consecutive tokens (within groups,
    since T is a multiple of `step`)."""
    heads, n, dim = x.shape
    return x.view(heads, n // step, step, dim).float().mean(2).to(x.dtype)


# -- where a memory came from ------------------------------------------------------------------------------
ENGINE_FIELDS = tuple("mode block_size prev_blocks unit_size compression kv_dtype rerotate topk".split())
FINGERPRINT_SAMPLES = 64  # elements read from each weight tensor for the fingerprint
HEADER_LIMIT = 1 << 27  # a safetensors header longer than this is not one of ours


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def engine_record(settings) -> dict:
    """The `EngineSettings` fields a memory records (`offload` is where it is kept, not how it was made)."""
    return {name: getattr(settings, name) for name in ENGINE_FIELDS}


def model_architecture(model) -> dict:
    """The configuration fields that decide the shape and meaning of a memory's KV (JSON values)."""
    config, text = model.config, model.config.text_config
    heads = text.num_attention_heads
    rope = getattr(text, "rope_parameters", None) or {"rope_theta": getattr(text, "rope_theta", None)}
    values = dict(
        layers=text.num_hidden_layers,
        heads=heads,
        kv_heads=text.num_key_value_heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        hidden=text.hidden_size,
        intermediate=text.intermediate_size,
        vocab=text.vocab_size,
        rope=dict(rope),
        tokens_per_group=config.tokens_per_group,
        frames_per_group=config.frames_per_group,
        video_token_id=config.video_token_id,
        image_size=config.vision_config.image_size,
        vision_grid=config.vision_grid,
    )
    return json.loads(json.dumps(values, sort_keys=True, default=str))


def model_identity(model) -> dict:
    """What a memory records of the model that made it: `architecture` (`model_architecture`), `weights`
    (`weights_fingerprint`) and `quantize` (the weight quantization, None for float weights)."""
    report = getattr(model, "quantization", None)
    return dict(
        architecture=model_architecture(model),
        weights=weights_fingerprint(model),
        quantize=getattr(report, "quantize", None),
    )


def identity_mismatch(recorded: dict, model) -> str | None:
    """How the model in `recorded` (a memory's `model` field) differs from `model`; None if it does not."""
    here = model_identity(model)
    theirs, ours = recorded.get("architecture") or {}, here["architecture"]
    fields = [k for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)]
    if fields:
        return "architecture differs: " + ", ".join(
            f"{k} {theirs.get(k)!r} vs this model's {ours.get(k)!r}" for k in fields
        )
    if recorded.get("quantize") != here["quantize"]:
        theirs, ours = recorded.get("quantize") or "none", here["quantize"] or "none"
        return f"weight quantization {theirs} vs this model's {ours}"
    if recorded.get("weights") != here["weights"]:
        return f"weights fingerprint {recorded.get('weights')} vs this model's {here['weights']}"
    return None


def weights_fingerprint(model) -> str:
    """A short hash of the model's weights, cheap on a 7B: every weight tensor's name and shape, and
    `FINGERPRINT_SAMPLES` of its elements at evenly spaced flat indices (a few hundred thousand elements in
    all, gathered on the weights' device and copied to the host once per device).

    Elements are rounded to bfloat16 first, so one checkpoint loaded in float32 or bfloat16 has one
    fingerprint (its memories differ only by the compute dtype, which the memory records apart). A
    quantized weight (a torchao tensor subclass) is hashed through its inner tensors (codes, scales).
    Weights offloaded by accelerate are read from the hook's weights map."""
    digest = hashlib.sha256()
    samples: list[torch.Tensor] = []
    for name, tensor in _named_weights(model):
        for part, t in _stored_parts(name, tensor):
            kind = "float" if t.dtype.is_floating_point else dtype_name(t.dtype)
            digest.update(f"{part}:{tuple(t.shape)}:{kind};".encode())
            n = t.numel()
            if n == 0 or t.device.type == "meta":
                continue
            flat = torch.linspace(0, n - 1, min(n, FINGERPRINT_SAMPLES), dtype=torch.float64).round().long()
            index = torch.unravel_index(flat, tuple(t.shape)) if t.dim() else ()
            picked = t.detach()[tuple(i.to(t.device) for i in index)] if t.dim() else t.detach().reshape(1)
            samples.append(picked.reshape(-1).to(torch.bfloat16))
    by_device: dict[torch.device, list[int]] = {}
    for i, s in enumerate(samples):
        by_device.setdefault(s.device, []).append(i)
    host: list[torch.Tensor | None] = [None] * len(samples)
    for indices in by_device.values():
        joined = torch.cat([samples[i] for i in indices]).cpu()
        for i, part in zip(indices, joined.split([samples[i].numel() for i in indices])):
            host[i] = part
    if host:
        digest.update(torch.cat(host).view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:32]


def _named_weights(model):
    """(name, tensor) of every parameter once (tied ones once); an accelerate-offloaded parameter (on the
    meta device) is read from its hook's weights map."""
    seen = set()
    for module_name, module in model.named_modules():
        hooks = [getattr(module, "_hf_hook", None)]
        hooks += list(getattr(hooks[0], "hooks", ()) or ())
        maps = [m for h in hooks if (m := getattr(h, "weights_map", None)) is not None]
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            if param.device.type == "meta":
                for weights in maps:
                    try:
                        param = weights[name]
                        break
                    except KeyError:
                        continue
            yield (f"{module_name}.{name}" if module_name else name), param


def _stored_parts(name: str, tensor: torch.Tensor):
    """The plain tensors a weight is stored as: itself, or a tensor subclass's inner tensors."""
    if type(tensor) in (torch.Tensor, torch.nn.Parameter) or not hasattr(tensor, "__tensor_flatten__"):
        yield name, tensor
        return
    inner, _ = tensor.__tensor_flatten__()
    for part in inner:
        value = getattr(tensor, part, None)
        if isinstance(value, torch.Tensor):
            yield from _stored_parts(f"{name}[{type(tensor).__name__}].{part}", value)


def memory_header(path) -> dict | None:
    """The videoxl2 header of a memory file, read without its tensors; None for any other file (a video,
    another safetensors file). Cheap enough to decide what a path is."""
    try:
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                return None
            (size,) = struct.unpack("<Q", prefix)
            if not 2 <= size <= HEADER_LIMIT:
                return None
            raw = handle.read(size)
        if len(raw) < size or raw[:1] != b"{":
            return None
        text = json.loads(raw).get("__metadata__", {}).get("videoxl2")
        header = json.loads(text) if isinstance(text, str) else None
    except (OSError, ValueError, AttributeError, UnicodeDecodeError):
        return None
    return header if isinstance(header, dict) else None
