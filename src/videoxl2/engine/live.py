"""Live sessions: a video that arrives while it is being answered (a stream, a webcam, a growing file).

Chunk-based pre-filling is causal, so a stream can be pre-filled as it arrives and end up exactly where a
one-shot pre-fill of the same frames would (`VideoSession.from_frames(...).prefill()`), bit for bit. What
makes it exact:

* frames are encoded in the batches one-shot uses (`FRAME_BATCH`: one or more whole pre-fill blocks,
  counted from the stream's first frame), so SigLIP, DTS and the projector see the same inputs; a batch is
  committed (encoded and pre-filled) as soon as its last frame arrives, the frames after it wait;
* the token layout only grows: the layout of the first n groups is a prefix of that of n + k groups (each
  group's time text is tokenized on its own), so the pre-fill's layout and store are extended in place
  (`StreamingPrefill.extend`, the store doubling its capacity when short);
* a question asked with frames pending computes them as a temporary tail, exactly as one-shot computes a
  video's last, shorter batch (its last group padded by the model): the tail is pre-filled into the store
  past the committed part, the question answered, and the tail forgotten (`StreamingPrefill.rewind`), to be
  overwritten when its batch completes. It is kept until the next append, so more questions about the same
  frames reuse it.

Threads: `append` (an ingest thread) and `ask` (another) may run at once. Every change to the session's
state (pending frames, layout, store) and every answer take one lock; an answer holds it from the snapshot
to its last token. It has to: a dense or chunked question runs on the pre-fill store itself, writing its
tokens into the spare slots past the video, which are the slots the next committed block goes to. Vision
encoding of a complete batch runs outside the lock (it touches no shared state), so a question waits at
most for one block's LLM pre-fill, and a slow question delays ingestion only by its own length (`LiveIngest`
keeps reading meanwhile).

Bounded memory (`dense_horizon` seconds and/or `max_memory` bytes, bilevel mode): every group's sparse KV
stays in memory, and the dense KV of a unit older than the horizon (or, while the KV in use is over
`max_memory`, of the oldest units) goes to a safetensors file of its own under `spill_dir` and leaves the
store (`KVStore.compact`), and its time tokens leave the global copy chunked pre-fill reads
(`KVStore.compact_globals`), so both stop growing; what still grows is the sparse KV (time tokens and pooled
visual tokens: about 28% of the dense KV per group with the release's 144 + ~6 tokens and compression 4; 48%
for the demo model's 16 + ~8). Only units before the next block's window can go: the window's visual tokens
attend to its dense KV. A question scores units on the sparse KV as usual and reads back the spilled units it
selects (`SpilledMemory`). A spilled unit's sparse keys are held once, rotated at their positions for later
blocks; their position-0 copies, which only questions read, go to disk (`_spilled_keys`). The release lets
time tokens see every earlier key, which a bounded store cannot keep: once units are spilled, later time
tokens see their sparse KV (keys at their original positions) instead, and later visual tokens see the spilled
time tokens through the sparse KV too (their keys rotated back and forth: equal to the dropped global rows up
to rounding), so a bounded session is exact up to its first spill and an approximation after it. Freed memory
is handed back to the system after each spill (`budget.malloc_trim`). Exact mode (the default) keeps
everything and is never changed by any of this.

`LiveIngest` runs a source (`video.live.iter_live_frames`: standard input, a followed file, a URL) into a
session in the background and reports how far ingestion is behind the stream's clock.
"""

from __future__ import annotations

import contextlib
import math
import queue
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..errors import InputError
from ..prompt import GroupSpan, TokenLayout, time_text, video_prefix_text
from ..video.live import LiveStats, iter_live_frames
from ..video.preprocess import preprocess_frames
from .budget import malloc_trim
from .memory import SPARSE_CHUNK_GROUPS, MixedCache, VideoMemory, pool, sparse_rows
from .prefill import SPARE_TOKENS, StreamingPrefill, empty_kv, kv_nbytes, regrown
from .runner import apply_rope, upload
from .session import FRAME_BATCH, Answer, StageClock, VideoSession
from .settings import EngineSettings

LAG_SAMPLES = 100_000  # lag samples kept for the percentiles (a day at 1 fps); older ones are dropped
POLL_S = 0.1  # how often the appender, waiting for frames, looks at the stop event
QUEUE_BATCHES = 4  # decoded frames the reader may hold ahead of the session, in batches: past it the reader
# waits and the source backs up (a pipe or socket fills; lag shows it), so a stream faster than the model
# cannot grow memory without end (an hour written at full speed queued ~50 MB of frames)


class LayoutBuilder:
    """The token layout of a growing video, built group by group exactly as `prompt.build_layout` builds
    it for the whole video at once (prefix text, then per group its own time text and visual placeholders)."""

    def __init__(self, tokenizer, tokens_per_group: int, video_token_id: int):
        self.tokenizer = tokenizer
        self.tokens_per_group = tokens_per_group
        self.video_token_id = video_token_id
        self.ids: list[int] = self._encode(video_prefix_text())
        self.video_start = len(self.ids)
        self.groups: list[GroupSpan] = []

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def add(self, seconds: float) -> None:
        time_start = len(self.ids)
        self.ids += self._encode(time_text(seconds))
        visual_start = len(self.ids)
        self.ids += [self.video_token_id] * self.tokens_per_group
        self.groups.append(GroupSpan(time_start, visual_start, len(self.ids), round(float(seconds), 1)))

    def layout(self, groups: int | None = None) -> TokenLayout:
        """The layout of the first `groups` groups (None: all), with no text after the video."""
        groups = len(self.groups) if groups is None else groups
        end = self.groups[groups - 1].end if groups else self.video_start
        return TokenLayout(
            input_ids=torch.tensor(self.ids[:end], dtype=torch.long),
            groups=list(self.groups[:groups]),
            video_start=self.video_start,
            video_end=end,
            video_token_id=self.video_token_id,
            suffix_ids=torch.zeros(0, dtype=torch.long),
        )


class SpilledMemory(VideoMemory):
    """A bounded live session's memory for one question: the prefix's dense KV, every group's sparse KV, and
    each unit's dense KV where `unit_rows(unit)` finds it (the store, or the unit's file on disk, read back
    only if the question selects the unit). Questions always get an assembled cache, as `VideoMemory.assemble`
    builds it (same rows, same rotations), from these parts."""

    def __init__(
        self,
        layout,
        prefix_keys,
        prefix_values,
        unit_size,
        compression,
        sparse_keys,
        sparse_values,
        unit_rows,
    ):
        super().__init__(
            layout, prefix_keys, prefix_values, unit_size, compression, sparse_keys, sparse_values
        )
        self.unit_rows = unit_rows
        self.reloaded: list[int] = []

    def build_sparse(self, runner) -> None:
        """The sparse KV is kept as the stream is pre-filled."""

    @contextmanager
    def question_cache(self, runner, dense_units=None, rerotate=True, device=None, reserve=0):
        yield self.assemble(runner, dense_units, rerotate=rerotate, device=device, reserve=reserve)

    def assemble(
        self, runner, dense_units=None, rerotate: bool = True, device=None, reserve: int = 0
    ) -> MixedCache:
        self.check_model(runner)
        layout = self.layout
        device = torch.device(device) if device is not None else runner.device
        dense = self._check_units(dense_units)
        start = layout.video_start
        pieces, turns, slices, cursor = [], [torch.zeros(start, dtype=torch.float64)], [], start
        positions = None if rerotate else self.sparse_positions
        for u in range(self.num_units):
            first, last = self.unit_groups(u)
            if u in dense:
                a, b = layout.groups[first].time_start, layout.groups[last].end
                turn = torch.full((b - a,), float(cursor - a) if rerotate else 0.0, dtype=torch.float64)
            else:
                a, b = self.sparse_offsets[first], self.sparse_offsets[last + 1]
                turn = (
                    torch.arange(cursor, cursor + b - a, dtype=torch.float64) if rerotate else positions[a:b]
                )
            pieces.append((u, u in dense, a, b, cursor))
            turns.append(turn)
            slices.append((cursor, cursor + b - a))
            cursor += b - a
        keys, values = [], []
        for layer in range(len(self.keys)):
            shape = (self.keys[layer].shape[0], cursor + reserve, self.keys[layer].shape[2])
            k, v = empty_kv(shape, self.dtype, device, False), empty_kv(shape, self.dtype, device, False)
            k[:, :start], v[:, :start] = self.keys[layer][:, :start], self.values[layer][:, :start]
            keys.append(k)
            values.append(v)
        self.reloaded = []
        for u, is_dense, a, b, at in pieces:
            if is_dense:
                unit_keys, unit_values, reloaded = self.unit_rows(u)
                if reloaded:
                    self.reloaded.append(u)
            else:
                unit_keys = [t[:, a:b] for t in self.sparse_keys]
                unit_values = [t[:, a:b] for t in self.sparse_values]
            for layer in range(len(keys)):
                keys[layer][:, at : at + b - a] = unit_keys[layer].to(device)
                values[layer][:, at : at + b - a] = unit_values[layer].to(device)
        runner.rotate_(keys, torch.cat(turns))
        next_position = cursor if rerotate else layout.video_end
        return MixedCache(keys, values, cursor, next_position, slices, sorted(dense))


class GrowingRows:
    """Per-layer (kv_heads, n, D) buffers holding rows [start, start + n) of a sequence that grows at its end
    (a live session's sparse keys or values), and may forget rows at its front (`drop_before`). Re-allocated
    a quarter larger when short: doubling would leave up to half of an endless stream's buffers empty."""

    def __init__(self, layers: int, kv_heads: int, dim: int, dtype, device):
        self.buffers = [torch.empty(kv_heads, 0, dim, dtype=dtype, device=device) for _ in range(layers)]
        self.start = 0  # the sequence row held at index 0

    def rows(self, layer: int, a: int, b: int) -> torch.Tensor:
        """Rows [a, b) of `layer` (a view)."""
        return self.buffers[layer][:, a - self.start : b - self.start]

    def reserve(self, end: int, filled: int) -> None:
        """Room up to row `end`, rows up to `filled` kept."""
        capacity = int(self.buffers[0].shape[1])
        if end - self.start <= capacity:
            return
        size = max(end - self.start, capacity + capacity // 4)
        self.buffers = [regrown(t, size, filled - self.start) for t in self.buffers]

    def drop_before(self, row: int, filled: int) -> None:
        """Forget the rows before `row`; rows [row, filled) move to the front."""
        for t in self.buffers:
            t[:, : filled - row] = t[:, row - self.start : filled - self.start].clone()
        self.start = row

    def nbytes(self) -> int:
        return sum(kv_nbytes(t) for t in self.buffers)


class LiveSession:
    """A video pre-filled as it arrives (`append`), answerable at any moment (`ask`) from everything seen so
    far. See the module docstring for why its memory equals a one-shot pre-fill of the same frames.

    `dense_horizon` (seconds) / `max_memory` (bytes) make it bounded (bilevel mode, float KV; see the
    module docstring). `max_memory` spills the oldest units' dense KV while the KV in use (`_in_use_bytes`:
    `memory_bytes` less the slack of grown buffers) is over it; the sparse KV and the time
    tokens' rows still grow (about a third of the dense KV per group), so a stream long enough for them
    alone to pass it keeps only the pre-fill window dense. `spill_dir`: where spilled units go (a folder of
    their own inside it; default a temporary folder), removed by `close()`. `progress`: a bar of seconds
    seen (None: on a terminal only)."""

    spare_tokens = SPARE_TOKENS  # store slots kept free past the video: a question's room (grown if short)

    def __init__(
        self,
        model,
        tokenizer,
        settings: EngineSettings | None = None,
        source: str = "<stream>",
        progress: bool | None = None,
        dense_horizon: float | None = None,
        max_memory: int | None = None,
        spill_dir=None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings or EngineSettings.from_config(model.config)
        self.bounded = dense_horizon is not None or max_memory is not None
        if self.bounded:
            self._check_bounded(dense_horizon, max_memory)
        self.source = source
        self.progress = progress
        self.dense_horizon, self.max_memory, self.spill_dir = dense_horizon, max_memory, spill_dir
        config = model.config
        self.per_group = config.frames_per_group
        block = self.per_group * self.settings.block_size
        self.batch_frames = max(1, FRAME_BATCH // block) * block  # as VideoSession.frames_per_batch
        self.image_size = config.vision_config.image_size
        self._lock = threading.RLock()  # session state and answers (see the module docstring)
        self._append_lock = threading.Lock()  # one append or finish at a time
        self._builder = LayoutBuilder(tokenizer, config.tokens_per_group, config.video_token_id)
        with torch.inference_mode():  # the store's tensors are made and written in inference mode only
            self.prefill = StreamingPrefill(
                model,
                self._builder.layout(),
                self.settings.mode != "dense",
                self.settings.block_size,
                self.settings.prev_blocks,
                spare=self.spare_tokens,
                kv_dtype=self.settings.kv_dtype,
            )
            self.prefill.run_prefix()
        self.timestamps: list[float] = []
        self._pending: torch.Tensor | None = None  # preprocessed frames not yet committed
        self._committed_frames = 0
        self._tail = None  # (pre-fill mark, groups) of the computed tail, until the pending frames change
        self._finished = False
        self._closed = False
        self._clock = StageClock(torch.device("cpu"))
        self._bar = tqdm(
            total=None, desc="live", unit="s", disable=None if progress is None else not progress
        )
        self._spill_path: Path | None = None
        self._spilled_units = 0  # units whose dense KV is on disk (always the oldest ones)
        # sparse keys at position 0 (as `VideoMemory.build_sparse` makes them) and values
        self._sparse_keys: GrowingRows | None = None
        self._sparse_values: GrowingRows | None = None
        self._sparse_offsets = [0]  # sparse row of each known group's start
        self._sparse_groups = 0  # committed groups whose sparse KV is kept
        # the spilled units' sparse keys rotated at their original positions (pooled: the mean of theirs),
        # rotated once as units spill: what later tokens read in place of their dense KV. Their position-0
        # keys, which only questions read, go to disk (`_spilled_keys`)
        self._rotated_keys: GrowingRows | None = None
        self._rotated_groups = 0
        # A bi-level session keeps every committed group's sparse KV as it goes (what a one-shot session
        # builds at its first question), so a question does not derive it from the whole video again; an
        # int8 one derives it per question (`VideoMemory.build_sparse`).
        if self.settings.mode == "bilevel" and self.settings.kv_dtype == "auto":
            runner = self.prefill.runner
            shape = (runner.num_layers, runner.kv_heads, runner.head_dim, self.dtype, self.device)
            self._sparse_keys, self._sparse_values = GrowingRows(*shape), GrowingRows(*shape)
            if self.bounded:
                self._rotated_keys = GrowingRows(*shape)
        if self.bounded:
            if spill_dir is None:
                self._spill_path = Path(tempfile.mkdtemp(prefix="videoxl2-spill-"))
            else:
                Path(spill_dir).mkdir(parents=True, exist_ok=True)
                self._spill_path = Path(tempfile.mkdtemp(prefix="live-", dir=spill_dir))
            self.prefill.history = self._history
            self.prefill.global_history = self._global_history
            self._time_index: tuple | None = None  # (sparse rows, groups) of `_global_history`

    # -- state -------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    @property
    def frames_seen(self) -> int:
        return len(self.timestamps)

    @property
    def seconds_seen(self) -> float:
        """The timestamp of the last frame appended (0.0 before any): pending frames are answerable."""
        return self.timestamps[-1] if self.timestamps else 0.0

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def pending_frames(self) -> int:
        return 0 if self._pending is None else int(self._pending.shape[0])

    def memory_bytes(self) -> int:
        """Bytes of KV held in memory now: the pre-fill store's buffers as allocated (spare slots and the
        global copy included), and in bounded mode the sparse KV's buffers and the spilled units' rotated
        keys; spilled units' files are not counted. Read without the lock, so a status query never waits for
        an answer."""
        prefill, parts = self.prefill, (self._sparse_keys, self._sparse_values, self._rotated_keys)
        if prefill is None:
            return 0
        return prefill.store.allocated_bytes() + sum(p.nbytes() for p in parts if p is not None)

    @property
    def spilled_units(self) -> int:
        """Units whose dense KV is on disk (bounded mode; the oldest ones)."""
        return self._spilled_units

    def _check_bounded(self, dense_horizon, max_memory) -> None:
        settings, config = self.settings, self.model.config
        if dense_horizon is not None and not (isinstance(dense_horizon, int | float) and dense_horizon >= 0):
            raise InputError(f"dense_horizon must be a number of seconds >= 0, got {dense_horizon!r}")
        if max_memory is not None and not (isinstance(max_memory, int) and max_memory > 0):
            raise InputError(f"max_memory must be a number of bytes > 0, got {max_memory!r}")
        if settings.mode != "bilevel":
            raise InputError(
                f"bounded live memory (dense_horizon, max_memory) answers from selected units: it needs the "
                f"bilevel engine mode, not {settings.mode!r}"
            )
        if settings.kv_dtype != "auto":
            raise InputError(
                "bounded live memory keeps the KV in the model's dtype: kv_dtype int8 is not supported"
            )
        if config.tokens_per_group % settings.compression:
            raise InputError(
                f"compression {settings.compression} must divide the {config.tokens_per_group} visual tokens "
                "of a group"
            )

    def _check_open(self) -> None:
        if self._closed:
            raise InputError(f"{self.source}: the live session is closed")

    # -- frames in -----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def append(self, frames, timestamps) -> None:
        """Add frames (F, H, W, 3) uint8 RGB with their stream times in seconds (non-decreasing, after the
        last ones). Every batch this completes is encoded and pre-filled before returning."""
        frames = np.asarray(frames)
        stamps = [float(t) for t in np.atleast_1d(np.asarray(timestamps, dtype=np.float64))]
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise InputError(
                f"{self.source}: frames must be uint8 (F, H, W, 3), got {frames.dtype} {frames.shape}"
            )
        if len(stamps) != frames.shape[0]:
            raise InputError(
                f"{self.source}: {frames.shape[0]} frames but {len(stamps)} timestamps (one each expected)"
            )
        if not frames.shape[0]:
            return
        if not all(math.isfinite(t) and t >= 0 for t in stamps) or any(
            b < a for a, b in zip(stamps, stamps[1:])
        ):
            raise InputError(
                f"{self.source}: timestamps must be finite, >= 0 and non-decreasing, got {stamps}"
            )
        with self._append_lock:
            with self._lock:
                self._check_open()
                if self._finished:
                    raise InputError(
                        f"{self.source}: the stream has ended (finish() was called), cannot append"
                    )
                if self.timestamps and stamps[0] < self.timestamps[-1]:
                    raise InputError(
                        f"{self.source}: timestamp {stamps[0]} is before the last one appended "
                        f"({self.timestamps[-1]})"
                    )
            pixels = preprocess_frames(frames, image_size=self.image_size)
            with self._lock:
                self._drop_tail()
                self._pending = pixels if self._pending is None else torch.cat([self._pending, pixels])
                known = len(self._builder.groups)
                for i, t in enumerate(stamps, start=len(self.timestamps)):
                    if i % self.per_group == 0:
                        self._builder.add(t)
                        g = self._builder.groups[-1]
                        rows = (
                            g.visual_start
                            - g.time_start
                            + (g.end - g.visual_start) // self.settings.compression
                        )
                        self._sparse_offsets.append(self._sparse_offsets[-1] + rows)
                self.timestamps += stamps
                if len(self._builder.groups) > known:
                    self.prefill.extend(self._builder.layout())
            while self.pending_frames >= self.batch_frames:
                self._commit(self.batch_frames)
            self._bar.set_postfix_str(f"{self.memory_bytes() / 2**20:.1f} MiB KV", refresh=False)
            self._bar.update(self.seconds_seen - self._bar.n)

    @torch.inference_mode()
    def finish(self) -> None:
        """End of stream: the pending frames are committed as the last (shorter) batch, as one-shot pre-fill
        ends a video. Later appends are refused; questions still work. Idempotent."""
        with self._append_lock:
            with self._lock:
                self._check_open()
                if self._finished:
                    return
                self._finished = True
                self._drop_tail()
            if self.pending_frames:
                self._commit(self.pending_frames)
            self._bar.close()

    @torch.inference_mode()
    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        with self._clock("vision_s"):
            return self.model.encode_video(pixels.to(self.device, self.dtype))

    @torch.inference_mode()
    def _prefill_groups(self, embeds: torch.Tensor) -> None:
        """Pre-fill groups block by block, as `VideoSession.prefill` does with a batch."""
        step = self.settings.block_size
        with self._clock("prefill_s"):
            for offset in range(0, embeds.shape[0], step):
                self.prefill.add_groups(embeds[offset : offset + step])

    def _commit(self, count: int) -> None:
        """Encode the first `count` pending frames (outside the lock) and pre-fill them for good."""
        with self._lock:
            pixels = self._pending[:count]
        embeds = self._encode(pixels)
        with self._lock:
            self._drop_tail()
            self._prefill_groups(embeds)
            rest = self._pending[count:]
            self._pending = rest if rest.shape[0] else None
            self._committed_frames += count
            if self._sparse_values is not None:
                self._add_sparse(self._sparse_groups, self.prefill.groups_done)
                self._sparse_groups = self.prefill.groups_done
            if self.bounded:
                self._spill()

    def _drop_tail(self) -> None:
        if self._tail is not None:
            self.prefill.rewind(self._tail[0])
            self._tail = None

    def _ensure_tail(self) -> int:
        """Groups answerable now: the committed ones plus, if frames are pending, a temporary tail computed
        into the store after them (kept until the pending frames change). Call with the lock held."""
        if self._tail is not None:
            return self._tail[1]
        committed = self.prefill.groups_done
        if not self.pending_frames:
            return committed
        mark = self.prefill.mark()
        embeds = self._encode(self._pending)
        try:
            self._prefill_groups(embeds)
            if self._sparse_values is not None:  # the tail's sparse KV (forgotten with it)
                self._add_sparse(committed, self.prefill.groups_done)
        except BaseException:
            self.prefill.rewind(mark)
            raise
        self._tail = (mark, self.prefill.groups_done)
        return self._tail[1]

    # -- bounded memory -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def _add_sparse(self, first: int, end: int) -> None:
        """The sparse KV of groups [first, end), from their dense KV in the store, as
        `VideoMemory.build_sparse` derives it (keys rotated back to position 0, visual tokens pooled)."""
        if end <= first:
            return
        runner, store, step = self.prefill.runner, self.prefill.store, self.settings.compression
        device, shift, offsets = runner.device, store.shift, self._sparse_offsets
        self._sparse_keys.reserve(offsets[end], offsets[first])
        self._sparse_values.reserve(offsets[end], offsets[first])
        groups = self._builder.groups
        for c in range(first, end, SPARSE_CHUNK_GROUPS):
            chunk = groups[c : min(c + SPARSE_CHUNK_GROUPS, end)]
            a, b = chunk[0].time_start, chunk[-1].end
            time_rows, visual_rows, time_dst, pooled_dst = sparse_rows(chunk, step, device)
            cos, sin = runner.rope_tables(-torch.arange(a, b, dtype=torch.float64), device)
            s0, s1 = offsets[c], offsets[c + len(chunk)]
            for layer in range(runner.num_layers):
                keys = store.key_buffers[layer][:, a - shift : b - shift]
                values = store.value_buffers[layer][:, a - shift : b - shift]
                pre = apply_rope(keys, cos, sin)
                out_k = self._sparse_keys.rows(layer, s0, s1)
                out_v = self._sparse_values.rows(layer, s0, s1)
                out_k.index_copy_(1, time_dst, pre.index_select(1, time_rows))
                out_v.index_copy_(1, time_dst, values.index_select(1, time_rows))
                out_k.index_copy_(1, pooled_dst, pool(pre.index_select(1, visual_rows), step))
                out_v.index_copy_(1, pooled_dst, pool(values.index_select(1, visual_rows), step))

    def _unit_file(self, unit: int) -> Path:
        return self._spill_path / f"unit-{unit:07d}.safetensors"

    def _in_use_bytes(self) -> int:
        """KV bytes in use: the store's filled rows and the spare slots a question needs, the global copy's
        rows, the sparse KV's (what `memory_bytes` counts, less the slack of grown buffers)."""
        store = self.prefill.store
        per_row = 2 * self.prefill.runner.num_layers * kv_nbytes(store.key_buffers[0][:, :1])
        sparse = self._sparse_offsets[self._sparse_groups] if self._sparse_values is not None else 0
        globals_ = store.global_filled - store.global_shift
        rows = store.filled - store.shift + self.prefill.spare + globals_ + sparse
        return rows * per_row

    def _spill(self) -> None:
        """Move the dense KV of old units to disk: units older than the horizon, then, while the KV in use is
        over `max_memory`, the oldest others. Only units before the next block's window can go (the window's
        dense rows are what its visual tokens attend to); spilled units are always the oldest, so the store
        keeps one contiguous run of rows after the prefix (`KVStore.compact`)."""
        settings, groups, prefill = self.settings, self._builder.groups, self.prefill
        block = prefill.groups_done // settings.block_size
        window = max(0, block - settings.prev_blocks) * settings.block_size
        movable = window // settings.unit_size  # units entirely before the window
        cutoff = None if self.dense_horizon is None else self.seconds_seen - self.dense_horizon
        unit = self._spilled_units
        per_row = 2 * prefill.runner.num_layers * kv_nbytes(prefill.store.key_buffers[0][:, :1])
        in_use = self._in_use_bytes() if self.max_memory is not None else 0
        while unit < movable:
            first, last = unit * settings.unit_size, (unit + 1) * settings.unit_size - 1
            end_seconds = groups[last + 1].seconds if last + 1 < len(groups) else groups[last].seconds
            old = cutoff is not None and end_seconds <= cutoff
            if not old and not (self.max_memory is not None and in_use > self.max_memory):
                break
            in_use -= (groups[last].end - groups[first].time_start) * per_row
            unit += 1
        if unit == self._spilled_units:
            return
        store, shift = prefill.store, prefill.store.shift
        for u in range(self._spilled_units, unit):
            a, b = groups[u * settings.unit_size].time_start, groups[(u + 1) * settings.unit_size - 1].end
            tensors = {}
            for layer in range(prefill.runner.num_layers):
                tensors[f"keys.{layer}"] = (
                    store.key_buffers[layer][:, a - shift : b - shift].contiguous().cpu()
                )
                tensors[f"values.{layer}"] = (
                    store.value_buffers[layer][:, a - shift : b - shift].contiguous().cpu()
                )
            save_file(tensors, str(self._unit_file(u)))
        store.compact(groups[unit * settings.unit_size].time_start, self._builder.video_start)
        # the spilled units' time tokens leave the global copy too: their sparse KV holds them
        store.compact_globals(prefill.global_start[unit * settings.unit_size], self._builder.video_start)
        self._spilled_units = unit
        # the newly spilled sparse keys, rotated once at their original positions (pooled: the mean of theirs)
        # for later blocks; their position-0 copies, which only questions read, move to disk
        first_group, last_group = self._rotated_groups, unit * settings.unit_size
        positions = []
        for g in groups[first_group:last_group]:
            positions.append(torch.arange(g.time_start, g.visual_start, dtype=torch.float64))
            visual = torch.arange(g.visual_start, g.end, dtype=torch.float64)
            positions.append(visual.view(-1, settings.compression).mean(1))
        cos, sin = prefill.runner.rope_tables(torch.cat(positions), self.device)
        a, b = self._sparse_offsets[first_group], self._sparse_offsets[last_group]
        self._rotated_keys.reserve(b, a)
        for layer in range(prefill.runner.num_layers):
            keys = self._sparse_keys.rows(layer, a, b)
            self._rotated_keys.rows(layer, a, b)[:] = apply_rope(keys, cos, sin)
            with open(self._spilled_keys_file(layer), "ab") as out:  # questions read them back
                out.write(keys.transpose(0, 1).contiguous().cpu().view(torch.uint8).numpy().tobytes())
        self._sparse_keys.drop_before(b, self._sparse_offsets[self._sparse_groups])
        self._rotated_groups = last_group
        malloc_trim()  # the compacted rows and any grown buffers' old copies: back to the system, or an
        # endless stream's resident memory keeps the freed heap (an hour: ~10% of the process more)

    def _spilled_keys_file(self, layer: int) -> Path:
        """Spilled units' position-0 sparse keys of `layer`, appended as they spill (rows, kv_heads, D)."""
        return self._spill_path / f"sparse-keys-{layer}.bin"

    def _spilled_keys(self, layer: int) -> torch.Tensor:
        """(kv_heads, rows, D) position-0 sparse keys of the spilled units (read back from disk)."""
        rows, ref = self._sparse_keys.start, self._sparse_values.buffers[layer]
        data = bytearray(self._spilled_keys_file(layer).read_bytes())
        if len(data) != rows * kv_nbytes(ref[:, :1]):
            raise InputError(f"{self._spilled_keys_file(layer)}: spilled sparse keys damaged or truncated")
        flat = torch.frombuffer(data, dtype=ref.dtype)
        return flat.view(rows, ref.shape[0], ref.shape[2]).transpose(0, 1).to(self.device)

    def _history(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """What later time tokens see in place of the spilled units' dense KV: their sparse KV, keys rotated
        at their original positions (`StreamingPrefill.history`)."""
        rows = self._sparse_offsets[self._rotated_groups]
        return self._rotated_keys.rows(layer, 0, rows), self._sparse_values.rows(layer, 0, rows)

    def _global_history(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """What later visual tokens see in place of the global rows `compact_globals` dropped: the spilled
        units' time tokens from their sparse KV (keys rotated at their original positions)."""
        groups = self._rotated_groups
        if self._time_index is None or self._time_index[1] != groups:
            offsets, spans = self._sparse_offsets, self._builder.groups[:groups]
            rows = [
                torch.arange(offsets[i], offsets[i] + g.visual_start - g.time_start)
                for i, g in enumerate(spans)
            ]
            self._time_index = (upload(torch.cat(rows), self.device), groups)
        index = self._time_index[0]
        keys, values = self._rotated_keys.buffers[layer], self._sparse_values.buffers[layer]
        return keys.index_select(1, index), values.index_select(1, index)

    def _unit_rows(self, unit: int):
        """(keys per layer, values per layer, read from disk?) of a unit's dense KV."""
        settings, groups = self.settings, self._builder.groups
        if unit < self._spilled_units:
            with safe_open(str(self._unit_file(unit)), framework="pt", device="cpu") as handle:
                layers = self.prefill.runner.num_layers
                keys = [handle.get_tensor(f"keys.{i}") for i in range(layers)]
                values = [handle.get_tensor(f"values.{i}") for i in range(layers)]
            return keys, values, True
        first = unit * settings.unit_size
        last = min(first + settings.unit_size, self.prefill.groups_done) - 1
        store = self.prefill.store
        a, b = groups[first].time_start - store.shift, groups[last].end - store.shift
        return [t[:, a:b] for t in store.key_buffers], [t[:, a:b] for t in store.value_buffers], False

    # -- questions -----------------------------------------------------------------------------------------
    def _memory(self, groups: int) -> VideoMemory:
        """A memory over the first `groups` groups of the store (its buffers, not a copy); in bounded mode a
        `SpilledMemory` over the store, the sparse KV and the spilled units' files."""
        store, settings = self.prefill.store, self.settings
        layout = self._builder.layout(groups)
        sparse_keys = sparse_values = None
        if self._sparse_values is not None:
            rows, layers = self._sparse_offsets[groups], range(self.prefill.runner.num_layers)
            sparse_values = [self._sparse_values.rows(layer, 0, rows) for layer in layers]
            keys, spilled = self._sparse_keys, self._sparse_keys.start
            sparse_keys = [keys.rows(layer, spilled, rows) for layer in layers]
            if spilled:  # the spilled units' keys from disk: a copy for this question
                sparse_keys = [torch.cat([self._spilled_keys(i), k], 1) for i, k in zip(layers, sparse_keys)]
        if not self.bounded:
            return VideoMemory(
                layout,
                store.key_buffers,
                store.value_buffers,
                settings.unit_size,
                settings.compression,
                sparse_keys,
                sparse_values,
            )
        start = layout.video_start
        return SpilledMemory(
            layout,
            [t[:, :start] for t in store.key_buffers],
            [t[:, :start] for t in store.value_buffers],
            settings.unit_size,
            settings.compression,
            sparse_keys,
            sparse_values,
            self._unit_rows,
        )

    @contextmanager
    def snapshot(self):
        """A `VideoSession` over everything seen so far (the pending tail included), valid inside the `with`:
        the session's lock is held, so appends wait. It answers like any session (`ask`, or tools taking a
        session such as `eval.lmms_plugin.continuation_logprob`)."""
        with self._lock:
            self._check_open()
            if not self.timestamps:
                raise InputError(f"{self.source}: no frames seen yet, nothing to answer from")
            groups = self._ensure_tail()
            frames = min(len(self.timestamps), groups * self.per_group)
            memory = self._memory(groups)
            actual, dense = self.prefill.stats.flops(self.prefill.runner)
            stats = dict(
                frames=frames,
                groups=groups,
                frames_seen=frames,
                seconds_seen=self.timestamps[frames - 1],
                committed_frames=self._committed_frames,
                pending_frames=frames - self._committed_frames,
                video_tokens=memory.layout.video_end,
                prefill_attention_flops=actual,
                dense_attention_flops=dense,
                dense_kv_bytes=self.prefill.store.nbytes() if self.bounded else memory.dense_bytes(),
                sparse_kv_bytes=memory.sparse_size_bytes(),
                spilled_units=self._spilled_units,
                **self._clock.totals(),
            )
            if self.bounded:
                yield self._bounded_view(memory, stats, frames)
            else:  # the live store stays where it is: no offload copy per question
                settings = replace(self.settings, offload=False)
                yield VideoSession.from_video_memory(
                    self.model, self.tokenizer, memory, settings, self.source, stats, self.timestamps[:frames]
                )

    def _bounded_view(self, memory: SpilledMemory, stats: dict, frames: int) -> VideoSession:
        """A session over a bounded memory. `VideoSession.from_video_memory` refuses a video longer than the
        model's context, which an endless stream is; a bounded question runs on an assembled cache (the
        selected units dense, the others sparse), so with `rerotate` (contiguous positions) what has to fit
        the context is that cache: `layout.video_end` is set to its largest length for the session's check."""
        settings, layout = self.settings, memory.layout
        if settings.rerotate:
            extra = settings.unit_size * (self.model.config.tokens_per_group * (1 - 1 / settings.compression))
            dense = min(memory.num_units, settings.topk + 2)
            longest = layout.video_start + memory.sparse_offsets[-1] + int(dense * extra)
            layout = replace(layout, video_end=min(layout.video_end, longest))
        view = VideoSession.__new__(VideoSession)
        view.model, view.tokenizer, view.settings = self.model, self.tokenizer, settings
        view.source, view.progress, view._frame_batches = self.source, False, None
        view.timestamps = self.timestamps[:frames]
        view.group_seconds = [g.seconds for g in layout.groups]
        view.layout = layout
        view.memory_estimate = view.read_stats = None
        view._clock = StageClock(torch.device("cpu"))
        view.memory, view.runner, view.stats = memory, self.prefill.runner, stats
        return view

    def ask(
        self, question: str, history=None, generation_config: dict | None = None, units=None, on_token=None
    ) -> Answer:
        """Answer from everything seen so far (as `VideoSession.ask`); the stats add `seconds_seen` and
        `frames_seen` (what the answer saw) and the units with their scores."""
        with self.snapshot() as view:
            answer = view.ask(question, history, generation_config, units, on_token)
            if self.bounded:
                answer.stats["reloaded_units"] = list(view.memory.reloaded)
            return answer

    def save_memory(self, path, metadata: dict | None = None) -> Path:
        """Write the memory of everything seen, with what reopening it needs (`VideoMemory.save` with the
        model's identity, the engine settings, the frame times and the source): `VideoSession.from_memory`
        and `videoxl2 chat MEMORY_FILE Q` answer from it. After `finish()` every frame is committed;
        mid-stream the pending frames are in it as the tail a question would see (saving commits nothing).
        A bounded session's file holds every unit's dense KV, spilled ones read back (`_full_memory`)."""
        with self.snapshot() as view:
            memory = self._full_memory(view.memory) if self.bounded else view.memory
            return memory.save(
                path,
                metadata,
                model=self.model,
                settings=self.settings,
                timestamps=view.timestamps,
                source=self.source,
            )

    def _full_memory(self, memory: SpilledMemory) -> VideoMemory:
        """Every unit's dense KV in one memory (spilled units read back): what a saved memory holds. Costs
        the whole video's dense KV in memory while it is written."""
        keys, values = [[t[:, : memory.layout.video_start]] for t in memory.keys], None
        values = [[t[:, : memory.layout.video_start]] for t in memory.values]
        for u in range(memory.num_units):
            unit_keys, unit_values, _ = self._unit_rows(u)
            for layer in range(len(keys)):
                keys[layer].append(unit_keys[layer].to(self.device))
                values[layer].append(unit_values[layer].to(self.device))
        settings = self.settings
        return VideoMemory(
            memory.layout,
            [torch.cat(parts, 1) for parts in keys],
            [torch.cat(parts, 1) for parts in values],
            settings.unit_size,
            settings.compression,
        )

    def close(self) -> None:
        """Free the store and pending frames; later calls refuse. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._bar.close()
            self.prefill = None
            self._pending = None
            self._tail = None
            self._sparse_keys = self._sparse_values = self._rotated_keys = None
            if self._spill_path is not None:
                shutil.rmtree(self._spill_path, ignore_errors=True)

    def __enter__(self) -> LiveSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LiveIngest:
    """A live source read into a session in the background.

    Two threads: a reader (`iter_live_frames` at `fps`) puts frames in a queue as they are decoded, and an
    appender gives the session whatever has arrived (up to one batch) at a time, so a slow model delays
    answerability but never makes the reader miss frames. The queue holds `QUEUE_BATCHES` batches at most:
    past that the reader waits and the source backs up, which the lag reports. At the end of the stream, a
    dropped source or `stop()`, what arrived is appended and the session finished: the memory seen so far
    answers.

    Lag: the stream clock is the first frame's time plus the wall time since it arrived. A frame's lag is
    the stream clock when it became answerable (appended) minus its own time, or, for a source faster than
    real time (a file already written), the wall time from its arrival to answerable if that is longer.
    `status()` gives the lag now (stream clock minus the seconds answerable, or the age of the oldest frame
    waiting to be appended if longer; the last sample once the stream is over) and the percentiles of the
    frames' lags (nearest rank, over the last `LAG_SAMPLES` frames)."""

    def __init__(
        self, session: LiveSession, source, fps: float = 1.0, follow_idle_s: float = 2.0, threads=None
    ):
        if not fps > 0:
            raise InputError(f"fps must be > 0, got {fps}")
        self.session = session
        self.source = str(source)
        self.fps, self.follow_idle_s, self.threads = float(fps), follow_idle_s, threads
        self.stats = LiveStats()
        self.done = threading.Event()
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUE_BATCHES * session.batch_frames)
        self._state = "starting"
        self._error: str | None = None
        self._first: tuple[float, float] | None = None  # (wall clock, stream seconds) of the first frame
        self._lags: list[float] = []
        self._waiting: float | None = None  # arrival (wall clock) of the oldest frame being appended
        self._reader: threading.Thread | None = None
        self._appender: threading.Thread | None = None
        self._status_lock = threading.Lock()

    def start(self) -> LiveIngest:
        if self._reader is not None:
            raise InputError("this ingest was started already")
        self._reader = threading.Thread(target=self._read, name="live-reader", daemon=True)
        self._appender = threading.Thread(target=self._append_loop, name="live-append", daemon=True)
        self._reader.start()
        self._appender.start()
        return self

    def stop(self) -> None:
        """Stop reading; frames already read are appended and the session finished."""
        self._stop.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the ingest to end (`done`: everything read is appended and the session finished), then
        for the reader thread; True if both have ended. A reader blocked on a source that sends nothing
        (standard input, a stalled URL) ends at its next frame or the source's timeout, whichever comes
        first, so after `stop()` it may outlive `done` by that much."""
        start = time.monotonic()
        if not self.done.wait(timeout):
            return False
        threads = [t for t in (self._appender, self._reader) if t is not None]
        for thread in threads:
            thread.join(None if timeout is None else max(0.0, timeout - (time.monotonic() - start)))
        return not any(t.is_alive() for t in threads)

    def _fail(self, err: BaseException) -> None:
        with self._status_lock:
            if self._error is None:
                text = str(err).strip().splitlines()
                self._error = f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")
                self._state = "failed"
        self._stop.set()

    def _read(self) -> None:
        try:
            for frame, seconds in iter_live_frames(
                self.source, self.fps, self._stop, self.stats, self.follow_idle_s, self.threads
            ):
                now = time.monotonic()
                with self._status_lock:
                    if self._first is None:
                        self._first = (now, seconds)
                        if self._state == "starting":
                            self._state = "running"
                self._put((frame, seconds, now))
        except BaseException as err:  # noqa: BLE001 (kept as the one-line error, never lost)
            self._fail(err)
        finally:
            self._put(None)

    def _put(self, item) -> None:
        """Queue `item`, waiting while the queue is full, unless the appender has ended (nothing would take
        it)."""
        while not self.done.is_set():
            try:
                self._queue.put(item, timeout=POLL_S)
                return
            except queue.Full:
                continue

    def _take(self) -> tuple[list, bool]:
        """Frames that have arrived (waiting for at least one), up to one batch; True once there will be no
        more (the reader ended, or `stop()` and nothing is left in the queue)."""
        items, limit = [], self.session.batch_frames
        while not items:
            try:
                item = self._queue.get(timeout=POLL_S)
            except queue.Empty:
                if self._stop.is_set():
                    return items, True
                continue
            if item is None:
                return items, True
            items.append(item)
        while len(items) < limit:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return items, True
            items.append(item)
        return items, False

    def _append_loop(self) -> None:
        session = self.session
        try:
            ended = False
            while not ended:
                items, ended = self._take()
                if items:
                    self._waiting = items[0][2]
                    for run in _same_shape_runs(items):  # a stream may change resolution
                        session.append(np.stack([f for f, _, _ in run]), [s for _, s, _ in run])
                    now = time.monotonic()
                    with self._status_lock:
                        wall, first = self._first
                        for _, seconds, arrived in items:
                            self._lags.append(max(first + now - wall - seconds, now - arrived))
                        del self._lags[:-LAG_SAMPLES]
                        self._waiting = None
            session.finish()
            with self._status_lock:
                if self._state != "failed":
                    self._state = "stopped" if self._stop.is_set() else "ended"
        except BaseException as err:  # noqa: BLE001 (kept as the one-line error, never lost)
            self._fail(err)
            with contextlib.suppress(Exception):
                session.finish()  # what was appended still answers
        finally:
            # The reader is not waited for: blocked on a silent source (standard input) it ends at its next
            # frame or at the source's end, seeing the stop event (a followed file or URL within its timeout).
            self.done.set()

    def _oldest_queued(self) -> float | None:
        """Arrival time of the oldest frame waiting in the queue (a peek at its head)."""
        with self._queue.mutex:
            head = self._queue.queue[0] if self._queue.queue else None
        return None if head is None else head[2]

    @property
    def state(self) -> str:
        return self._state

    def status(self) -> dict:
        session = self.session
        with self._status_lock:
            lags = sorted(self._lags)
            first, state = self._first, self._state
        seen = session.seconds_seen
        if state == "running" and first is not None:
            now, waiting = time.monotonic(), self._waiting
            if waiting is None:
                waiting = self._oldest_queued()
            lag = max(first[1] + now - first[0] - seen, 0.0 if waiting is None else now - waiting)
        else:
            lag = self._lags[-1] if self._lags else 0.0
        return dict(
            state=state,
            seconds_seen=seen,
            frames_seen=session.frames_seen,
            lag_s=max(0.0, lag),
            lag_p50_s=_percentile(lags, 0.5),
            lag_p95_s=_percentile(lags, 0.95),
            memory_bytes=session.memory_bytes(),
            ended=self.stats.ended,
            error=self._error,
        )


def _same_shape_runs(items: list) -> list[list]:
    runs: list[list] = []
    for item in items:
        if runs and runs[-1][-1][0].shape == item[0].shape:
            runs[-1].append(item)
        else:
            runs.append([item])
    return runs


def _percentile(values: list[float], q: float) -> float | None:
    """The q-quantile of sorted `values` (nearest rank), None if there are none."""
    if not values:
        return None
    return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]
