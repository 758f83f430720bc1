"""Live sessions: frames appended as they arrive give the memory a one-shot pre-fill of the same frames
gives, bit for bit, in every engine mode and with int8 KV; a question asked mid-stream (frames pending)
answers as a session over exactly the frames seen; appending and asking in two threads; the background
ingest of a live source."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from engine_helpers import mpegts_bytes
from safetensors import safe_open

from videoxl2.engine.live import LayoutBuilder, LiveIngest, LiveSession
from videoxl2.engine.memory import VideoMemory
from videoxl2.engine.prefill import KVStore, LayerRunner, kv_nbytes
from videoxl2.engine.session import VideoSession
from videoxl2.engine.settings import EngineSettings
from videoxl2.errors import InputError
from videoxl2.eval.lmms_plugin import continuation_logprob
from videoxl2.prompt import IMAGE_MARKER, build_layout, build_prompt
from videoxl2.video.live import iter_live_frames

FRAMES = 37  # two whole batches of 16, then 5 frames: the last group is padded by the model
QUESTION = "What is shown?"
GENERATION = {"max_new_tokens": 4}


def make_frames(count: int = FRAMES, seed: int = 0) -> tuple[np.ndarray, list[float]]:
    frames = np.random.default_rng(seed).integers(0, 256, (count, 40, 40, 3), dtype=np.uint8)
    return frames, [round(i * 0.7, 1) for i in range(count)]


def settings_for(mode: str, kv_dtype: str = "auto") -> EngineSettings:
    # blocks of 2 groups seeing 1 earlier block: the chunked window is shorter than the video
    return EngineSettings(mode=mode, block_size=2, prev_blocks=1, unit_size=2, topk=1, kv_dtype=kv_dtype)


def one_shot(tiny, frames, stamps, settings) -> VideoSession:
    model, tokenizer = tiny
    session = VideoSession.from_frames(model, tokenizer, frames, stamps, settings=settings, progress=False)
    session.prefill()
    return session


def splits(kind: str, count: int, seed: int = 0) -> list[int]:
    """Sizes of consecutive appends covering `count` frames."""
    if kind == "ones":
        return [1] * count
    if kind == "seventeen":
        return [17] * (count // 17) + ([count % 17] if count % 17 else [])
    rng, sizes = np.random.default_rng(seed), []
    while sum(sizes) < count:
        sizes.append(min(int(rng.integers(1, 12)), count - sum(sizes)))
    return sizes


def feed(live: LiveSession, frames, stamps, sizes) -> None:
    start = 0
    for size in sizes:
        live.append(frames[start : start + size], stamps[start : start + size])
        start += size


def assert_same_memory(memory_a: VideoMemory, memory_b: VideoMemory, label: str) -> None:
    a, b = memory_a.layout, memory_b.layout
    assert torch.equal(a.input_ids[: a.video_end], b.input_ids[: b.video_end]), label
    assert (a.groups, a.video_start, a.video_end) == (b.groups, b.video_start, b.video_end), label
    for kind in ("keys", "values"):
        for layer, (x, y) in enumerate(zip(getattr(memory_a, kind), getattr(memory_b, kind))):
            if isinstance(x, torch.Tensor):
                error = float((x.float() - y.float()).abs().max())
                assert torch.equal(x, y), f"{label}: {kind} of layer {layer} differ (max {error:.3g})"
            else:  # int8 rows: codes and scales
                assert torch.equal(x.data, y.data), f"{label}: int8 {kind} codes of layer {layer} differ"
                assert torch.equal(x.scale, y.scale), f"{label}: int8 {kind} scales of layer {layer} differ"


@pytest.fixture
def small_spare(monkeypatch):
    """A store with few spare slots, so a short stream already makes it grow (doubling) several times."""
    monkeypatch.setattr(LiveSession, "spare_tokens", 16)


# -- the layout grows by prefixes ----------------------------------------------------------------------------
def test_layout_built_group_by_group_equals_build_layout(tiny):
    model, tokenizer = tiny
    config = model.config
    seconds = [0.0, 0.55, 1.04, 12.25, 99.96, 3600.0]
    builder = LayoutBuilder(tokenizer, config.tokens_per_group, config.video_token_id)
    prefix = build_prompt("?").split(IMAGE_MARKER)[0] + IMAGE_MARKER
    for n, s in enumerate(seconds, start=1):
        builder.add(s)
        whole = build_layout(tokenizer, prefix, seconds[:n], config.tokens_per_group, config.video_token_id)
        part = builder.layout()
        assert torch.equal(part.input_ids, whole.input_ids)
        assert part.groups == whole.groups and part.video_end == whole.video_end == whole.length
    assert [g.seconds for g in builder.groups] == [0.0, 0.6, 1.0, 12.2, 100.0, 3600.0]


def test_store_extension_keeps_the_filled_rows_and_doubles(tiny):
    model, tokenizer = tiny
    config = model.config
    runner = LayerRunner(model)
    layout = build_layout(tokenizer, "a <image> b", [0.0], config.tokens_per_group, config.video_token_id)
    for int8 in (False, True):
        store = KVStore.allocate(runner, layout, torch.float32, "cpu", spare=4, int8=int8)
        store.filled, store.global_filled = 10, 3
        store.key_buffers[0][:, :10] = torch.randn(2, 10, 16)
        store.global_keys[1][:, :3] = torch.randn(2, 3, 16)
        rows, global_rows = (
            store.key_buffers[0][:, :10].contiguous(),
            store.global_keys[1][:, :3].contiguous(),
        )
        before = store.capacity
        need = layout.video_end + 3 * before + 4
        store.extend(layout.video_end + 3 * before, 500, spare=4)
        assert store.capacity == need  # more than double: what is needed
        store.extend(store.capacity - 4, 500, spare=4)
        assert store.capacity == need  # room enough: no copy
        store.extend(store.capacity, 500, spare=4)
        assert store.capacity == 2 * need  # short: doubled
        for old, new in ((rows, store.key_buffers[0][:, :10]), (global_rows, store.global_keys[1][:, :3])):
            if int8:
                assert torch.equal(old.data, new.data) and torch.equal(old.scale, new.scale)
            else:
                assert torch.equal(old, new)
        assert store.global_keys[1].shape[1] >= 500 and store.keys[0].shape[1] == store.length


# -- bit-identity with one-shot pre-fill ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "mode,kv_dtype",
    [("dense", "auto"), ("chunked", "auto"), ("bilevel", "auto"), ("chunked", "int8"), ("dense", "int8")],
)
def test_appends_in_any_split_give_the_one_shot_memory(tiny, small_spare, mode, kv_dtype):
    model, tokenizer = tiny
    settings = settings_for(mode, kv_dtype)
    frames, stamps = make_frames()
    reference = one_shot(tiny, frames, stamps, settings)
    expected = reference.ask(QUESTION, generation_config=GENERATION)
    for kind in ("ones", "random", "seventeen"):
        live = LiveSession(model, tokenizer, settings, progress=False)
        feed(live, frames, stamps, splits(kind, FRAMES))
        live.finish()
        assert live.pending_frames == 0 and live.frames_seen == FRAMES and live.seconds_seen == stamps[-1]
        with live.snapshot() as view:
            assert_same_memory(view.memory, reference.memory, f"{mode}/{kv_dtype}/{kind}")
        answer = live.ask(QUESTION, generation_config=GENERATION)
        assert answer.token_ids == expected.token_ids, f"{mode}/{kv_dtype}/{kind}"
        assert answer.stats["frames_seen"] == FRAMES and answer.stats["seconds_seen"] == stamps[-1]
        assert [u["dense"] for u in answer.stats["units"]] == [u["dense"] for u in expected.stats["units"]]
        assert answer.stats["kv_bytes"] == expected.stats["kv_bytes"]
        live.close()


# -- questions mid-stream ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mode,kv_dtype", [("dense", "auto"), ("chunked", "auto"), ("bilevel", "auto"), ("bilevel", "int8")]
)
def test_a_question_mid_stream_equals_a_session_over_the_frames_seen(tiny, small_spare, mode, kv_dtype):
    model, tokenizer = tiny
    settings = settings_for(mode, kv_dtype)
    frames, stamps = make_frames()
    live = LiveSession(model, tokenizer, settings, progress=False)
    seen = 0
    for count in (21, 22, 32, 35):  # 5 pending (a padded group), 6, none, 3
        live.append(frames[seen:count], stamps[seen:count])
        seen = count
        fresh = one_shot(tiny, frames[:count], stamps[:count], settings)
        expected = fresh.ask(QUESTION, generation_config=GENERATION)
        for _ in range(2):  # the second question reuses the tail the first computed
            answer = live.ask(QUESTION, generation_config=GENERATION)
            assert answer.token_ids == expected.token_ids, f"{mode} after {count} frames"
            assert answer.stats["frames_seen"] == count and answer.stats["seconds_seen"] == stamps[count - 1]
            assert answer.stats["pending_frames"] == count % 16
            assert [u["score"] for u in answer.stats["units"]] == [
                u["score"] for u in expected.stats["units"]
            ]
        with live.snapshot() as view:
            assert_same_memory(view.memory, fresh.memory, f"{mode} after {count} frames")
            got = continuation_logprob(view, QUESTION, " a red square")
        want = continuation_logprob(fresh, QUESTION, " a red square")
        assert got == want, f"{mode} after {count} frames: log-probabilities {got} vs {want}"
    # the tails were forgotten: finishing gives the one-shot memory of all 35 frames
    live.finish()
    with live.snapshot() as view:
        assert_same_memory(view.memory, one_shot(tiny, frames[:35], stamps[:35], settings).memory, mode)


@pytest.mark.parametrize("mode", ["chunked", "bilevel"])
def test_saved_memory_mid_stream_reopens_and_answers_as_the_live_session(tiny, tmp_path, mode):
    model, tokenizer = tiny
    settings = settings_for(mode)
    frames, stamps = make_frames()
    with LiveSession(model, tokenizer, settings, source="cam", progress=False) as live:
        live.append(frames[:23], stamps[:23])
        path = live.save_memory(tmp_path / "live.safetensors", metadata={"note": "mid"})
        assert live.pending_frames == 7  # saving commits nothing
        expected = live.ask(QUESTION, generation_config=GENERATION)
        live.append(frames[23:], stamps[23:])
    loaded, extra = VideoMemory.load(path)
    assert_same_memory(loaded, one_shot(tiny, frames[:23], stamps[:23], settings).memory, "saved")
    assert extra == {"note": "mid"}
    reopened = VideoSession.from_memory(model, tokenizer, path)
    assert reopened.settings == settings and reopened.timestamps == stamps[:23] and reopened.source == "cam"
    answer = reopened.ask(QUESTION, generation_config=GENERATION)
    assert answer.token_ids == expected.token_ids
    assert [u["dense"] for u in answer.stats["units"]] == [u["dense"] for u in expected.stats["units"]]


# -- threads -------------------------------------------------------------------------------------------------
def test_appending_and_asking_in_two_threads(tiny):
    model, tokenizer = tiny
    settings = settings_for("bilevel")
    frames, stamps = make_frames(40, seed=3)
    live = LiveSession(model, tokenizer, settings, progress=False)
    errors = []

    def ingest():
        try:
            for i in range(len(frames)):
                live.append(frames[i : i + 1], stamps[i : i + 1])
                time.sleep(0.002)
            live.finish()
        except Exception as err:  # noqa: BLE001 (reported by the assertion below)
            errors.append(err)

    thread = threading.Thread(target=ingest)
    thread.start()
    answers = []
    while thread.is_alive() or not answers:
        if live.frames_seen:
            answers.append(live.ask(QUESTION, generation_config=GENERATION))
    thread.join()
    assert not errors, errors
    seen = sorted({a.stats["frames_seen"] for a in answers})
    for count in (seen[0], seen[len(seen) // 2], seen[-1]):  # each answer saw a consistent prefix
        answer = next(a for a in answers if a.stats["frames_seen"] == count)
        expected = one_shot(tiny, frames[:count], stamps[:count], settings).ask(
            QUESTION, generation_config=GENERATION
        )
        assert answer.token_ids == expected.token_ids, f"after {count} frames"
        assert answer.stats["seconds_seen"] == stamps[count - 1]
    with live.snapshot() as view:
        assert_same_memory(view.memory, one_shot(tiny, frames, stamps, settings).memory, "threads")


# -- bad input -----------------------------------------------------------------------------------------------
def test_bad_appends_and_questions_are_one_line_input_errors(tiny):
    model, tokenizer = tiny
    live = LiveSession(model, tokenizer, settings_for("dense"), source="cam", progress=False)
    frames, stamps = make_frames(6)
    with pytest.raises(InputError, match="cam: no frames seen yet"):
        live.ask(QUESTION)
    with pytest.raises(InputError, match=r"uint8 \(F, H, W, 3\)"):
        live.append(frames[..., 0], stamps)
    with pytest.raises(InputError, match="6 frames but 5 timestamps"):
        live.append(frames, stamps[:5])
    with pytest.raises(InputError, match="non-decreasing"):
        live.append(frames[:2], [1.0, 0.5])
    live.append(frames[:3], stamps[:3])
    with pytest.raises(InputError, match="before the last one appended"):
        live.append(frames[3:4], [0.0])
    assert live.frames_seen == 3 and live.seconds_seen == stamps[2]
    live.finish()
    live.finish()  # idempotent
    with pytest.raises(InputError, match="the stream has ended"):
        live.append(frames[3:], stamps[3:])
    assert live.ask(QUESTION, generation_config=GENERATION).stats["frames_seen"] == 3
    live.close()
    live.close()
    with pytest.raises(InputError, match="closed"):
        live.ask(QUESTION)
    assert live.memory_bytes() == 0


# -- background ingest ---------------------------------------------------------------------------------------
def ts_stream(seconds: float, fps: int = 10, seed: int = 0) -> bytes:
    """MPEG-TS of noise frames at `fps`."""
    rng = np.random.default_rng(seed)
    return mpegts_bytes(seconds, fps, 32, lambda i: rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))


def test_ingest_follows_a_growing_file_to_its_end(tiny, tmp_path):
    model, tokenizer = tiny
    settings = settings_for("chunked")
    data = ts_stream(5.0)
    path = tmp_path / "growing.ts"
    path.write_bytes(b"")
    live = LiveSession(model, tokenizer, settings, source=str(path), progress=False)
    ingest = LiveIngest(live, path, fps=4.0, follow_idle_s=0.5).start()
    assert ingest.status()["state"] in ("starting", "running")
    piece = len(data) // 5 + 1
    for start in range(0, len(data), piece):
        with open(path, "ab") as handle:
            handle.write(data[start : start + piece])
        time.sleep(0.1)
    assert ingest.join(timeout=60), "the ingest did not end"
    status = ingest.status()
    assert status["state"] == "ended" and status["ended"] == "end of stream" and status["error"] is None
    assert status["frames_seen"] == 20 and status["seconds_seen"] == 4.8 and live.finished
    assert status["lag_p50_s"] is not None and 0 <= status["lag_p50_s"] <= status["lag_p95_s"]
    assert status["memory_bytes"] == live.memory_bytes() > 0
    # the memory is that of a one-shot pre-fill of the frames the reader samples
    path.write_bytes(data)
    sampled = list(iter_live_frames(str(path), fps=4.0, follow_idle_s=0.1))
    reference = one_shot(tiny, np.stack([f for f, _ in sampled]), [t for _, t in sampled], settings)
    with live.snapshot() as view:
        assert_same_memory(view.memory, reference.memory, "ingest")


def test_a_slow_session_backs_the_reader_up_instead_of_queueing_without_end(tiny, tmp_path, monkeypatch):
    """A source faster than the model: the reader holds at most `QUEUE_BATCHES` batches of decoded frames
    and waits (the source backs up); every frame still arrives, in order."""
    import videoxl2.engine.live as live_module

    model, tokenizer = tiny
    monkeypatch.setattr(live_module, "QUEUE_BATCHES", 1)
    path = tmp_path / "fast.ts"
    path.write_bytes(ts_stream(6.0, seed=3))
    live = LiveSession(model, tokenizer, settings_for("chunked"), progress=False)
    seen, append = [], live.append

    def slow_append(frames, timestamps):
        seen.append(ingest._queue.qsize())
        time.sleep(0.05)
        append(frames, timestamps)

    monkeypatch.setattr(live, "append", slow_append)
    ingest = LiveIngest(live, path, fps=4.0, follow_idle_s=0.2)
    assert ingest._queue.maxsize == live.batch_frames
    assert ingest.start().join(timeout=60)
    assert ingest.status()["state"] == "ended" and live.frames_seen == 24, ingest.status()
    assert max(seen) <= live.batch_frames, seen


def test_a_source_that_breaks_off_ends_the_stream_with_what_was_seen(tiny, tmp_path):
    model, tokenizer = tiny
    data = ts_stream(6.0, seed=2)
    path = tmp_path / "cut.ts"
    path.write_bytes(data[: len(data) // 2 + 101])  # the producer died mid-packet and nothing more comes
    live = LiveSession(model, tokenizer, settings_for("chunked"), progress=False)
    ingest = LiveIngest(live, path, fps=4.0, follow_idle_s=0.3).start()
    assert ingest.join(timeout=60)
    status = ingest.status()
    assert status["state"] == "ended" and status["error"] is None and status["ended"]
    assert 4 <= status["frames_seen"] < 24 and live.finished
    answer = live.ask(QUESTION, generation_config=GENERATION)
    assert answer.stats["frames_seen"] == status["frames_seen"] and answer.stats["pending_frames"] == 0


def test_ingest_of_a_missing_source_fails_in_one_line(tiny, tmp_path):
    model, tokenizer = tiny
    live = LiveSession(model, tokenizer, settings_for("dense"), progress=False)
    ingest = LiveIngest(live, tmp_path / "nope.ts").start()
    assert ingest.join(timeout=30)
    status = ingest.status()
    assert status["state"] == "failed" and "nope.ts: no such file" in status["error"]
    assert "\n" not in status["error"] and status["frames_seen"] == 0


def test_stopping_an_ingest_keeps_what_was_seen(tiny, tmp_path):
    model, tokenizer = tiny
    path = tmp_path / "slow.ts"
    data = ts_stream(8.0)
    path.write_bytes(data[: len(data) // 2])  # the writer is still at work: the file is followed
    live = LiveSession(model, tokenizer, settings_for("dense"), progress=False)
    ingest = LiveIngest(live, path, fps=2.0, follow_idle_s=30.0).start()
    deadline = time.monotonic() + 30
    while live.frames_seen < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    ingest.stop()
    assert ingest.join(timeout=10), "stop() did not end the ingest"
    assert not ingest._reader.is_alive() and not ingest._appender.is_alive()
    status = ingest.status()
    assert status["state"] == "stopped" and live.finished and status["frames_seen"] >= 3
    assert live.ask(QUESTION, generation_config=GENERATION).stats["frames_seen"] == status["frames_seen"]


# -- bounded memory ------------------------------------------------------------------------------------------
def bounded_settings() -> EngineSettings:
    return EngineSettings(mode="bilevel", block_size=2, prev_blocks=1, unit_size=2, topk=1)


def stream_frames(count: int, seed: int = 7) -> tuple[np.ndarray, list[float]]:
    """`count` frames at 1 fps."""
    frames = np.random.default_rng(seed).integers(0, 256, (count, 24, 24, 3), dtype=np.uint8)
    return frames, [float(i) for i in range(count)]


def test_bounded_mode_before_any_spill_answers_as_exact_mode(tiny, tmp_path):
    model, tokenizer = tiny
    settings = bounded_settings()
    frames, stamps = make_frames()
    bounded = LiveSession(model, tokenizer, settings, progress=False, dense_horizon=1e9, spill_dir=tmp_path)
    for count in (21, 37):
        bounded.append(frames[len(bounded.timestamps) : count], stamps[len(bounded.timestamps) : count])
        fresh = one_shot(tiny, frames[:count], stamps[:count], settings)
        expected = fresh.ask(QUESTION, generation_config=GENERATION)
        answer = bounded.ask(QUESTION, generation_config=GENERATION)
        assert answer.token_ids == expected.token_ids and answer.stats["spilled_units"] == 0
        assert [u["score"] for u in answer.stats["units"]] == [u["score"] for u in expected.stats["units"]]
        assert answer.stats["kv_bytes"] == expected.stats["kv_bytes"] and answer.stats["reloaded_units"] == []
        with bounded.snapshot() as view:
            for layer, (a, b) in enumerate(zip(view.memory.sparse_keys, fresh.memory.sparse_keys)):
                rows = b.shape[1]
                assert torch.equal(a[:, :rows], b), f"sparse keys of layer {layer} after {count} frames"
            for a, b in zip(view.memory.sparse_values, fresh.memory.sparse_values):
                assert torch.equal(a[:, : b.shape[1]], b)
            got = continuation_logprob(view, QUESTION, " a red square")
        assert got == continuation_logprob(fresh, QUESTION, " a red square")
    bounded.close()


def test_bounded_mode_spills_old_units_and_reloads_the_selected(tiny, tmp_path):
    model, tokenizer = tiny
    settings = bounded_settings()
    frames, stamps = stream_frames(96)
    live = LiveSession(model, tokenizer, settings, progress=False, dense_horizon=12.0, spill_dir=tmp_path)
    reference = one_shot(tiny, frames, stamps, settings)
    first_spill = None
    for start in range(0, 96, 5):
        live.append(frames[start : start + 5], stamps[start : start + 5])
        if live.spilled_units and first_spill is None:
            first_spill = live.frames_seen
    assert live.spilled_units >= 8, live.spilled_units
    files = sorted(tmp_path.glob("live-*/unit-*.safetensors"))
    assert len(files) == live.spilled_units
    # the first units were pre-filled before anything was spilled: their files hold the exact rows
    groups = reference.layout.groups
    with safe_open(str(files[0]), framework="pt") as handle:
        for layer in range(model.config.text_config.num_hidden_layers):
            rows = reference.memory.keys[layer][:, groups[0].time_start : groups[1].end]
            assert torch.equal(handle.get_tensor(f"keys.{layer}"), rows)
    # the spilled units' position-0 sparse keys left memory for disk; a question reads them back bit for bit:
    # the sparse KV it sees is the one derived from the session's own dense KV (spilled units' from disk)
    spilled_rows = live._sparse_offsets[live.spilled_units * settings.unit_size]
    assert live._sparse_keys.start == spilled_rows > 0
    with live.snapshot() as view:
        derived = live._full_memory(view.memory)
        derived.build_sparse(live.prefill.runner)
        for layer, (got, want) in enumerate(zip(view.memory.sparse_keys, derived.sparse_keys)):
            assert got.shape == want.shape and torch.equal(got, want), f"sparse keys of layer {layer}"
        for layer, (got, want) in enumerate(zip(view.memory.sparse_values, derived.sparse_values)):
            assert torch.equal(got, want), f"sparse values of layer {layer}"
    # a question about everything seen, mid-stream, with an old unit selected from outside: it is read back
    live.append(frames[:0], [])
    answer = live.ask(QUESTION, generation_config=GENERATION, units=[1])
    assert answer.stats["reloaded_units"] == [0, 1] and answer.stats["frames_seen"] == 96
    dense = [u["index"] for u in answer.stats["units"] if u["dense"]]
    assert dense == [0, 1, len(answer.stats["units"]) - 1]
    scored = live.ask(QUESTION, generation_config=GENERATION)  # the model's own selection
    assert len(scored.token_ids) == GENERATION["max_new_tokens"] or scored.text
    path = live.save_memory(tmp_path / "bounded.safetensors")
    saved, _ = VideoMemory.load(path)
    first_unit = slice(groups[0].time_start, groups[1].end)
    assert torch.equal(saved.keys[0][:, first_unit], reference.memory.keys[0][:, first_unit])
    # reopened, the file answers as the bounded session did (same sparse KV, same selection, same rows)
    reopened = VideoSession.from_memory(model, tokenizer, path).ask(QUESTION, generation_config=GENERATION)
    assert reopened.token_ids == scored.token_ids
    assert [u["dense"] for u in reopened.stats["units"]] == [u["dense"] for u in scored.stats["units"]]
    spill_dir = files[0].parent
    live.close()
    assert not spill_dir.exists()


def test_bounded_mode_without_pooling_follows_exact_mode(tiny, tmp_path):
    """With compression 1 a group's sparse KV is its dense KV (keys turned back and forth: rounding only),
    so what later time tokens see in place of spilled units is what exact mode shows them: every row the
    bounded pre-fill computes, spilled or kept, and the answers must match exact mode to rounding. This
    checks the spilled-history path (offsets, positions, order, the store's shift) independently."""
    model, tokenizer = tiny
    settings = EngineSettings(mode="bilevel", block_size=2, prev_blocks=1, unit_size=2, topk=1, compression=1)
    frames, stamps = stream_frames(80)
    live = LiveSession(model, tokenizer, settings, progress=False, dense_horizon=10.0, spill_dir=tmp_path)
    for start in range(0, 80, 7):
        live.append(frames[start : start + 7], stamps[start : start + 7])
    live.finish()
    assert live.spilled_units >= 5
    reference = one_shot(tiny, frames, stamps, settings)
    groups, worst = reference.layout.groups, 0.0
    for unit in range(reference.memory.num_units):
        keys, values, _ = live._unit_rows(unit)
        first, last = reference.memory.unit_groups(unit)
        rows = slice(groups[first].time_start, groups[last].end)
        for layer in range(len(keys)):
            for got, want in (
                (keys[layer], reference.memory.keys[layer][:, rows]),
                (values[layer], reference.memory.values[layer][:, rows]),
            ):
                worst = max(worst, float((got - want).abs().max()))
    assert worst < 1e-4, f"bounded rows differ from exact ones by {worst:.3g}"
    with live.snapshot() as view:
        got, _ = continuation_logprob(view, QUESTION, " a red square")
    want, _ = continuation_logprob(reference, QUESTION, " a red square")
    assert abs(got - want) < 1e-3, (got, want)
    expected = reference.ask(QUESTION, generation_config=GENERATION)
    assert live.ask(QUESTION, generation_config=GENERATION).token_ids == expected.token_ids


def test_bounded_memory_stops_growing_past_the_horizon(tiny, tmp_path):
    model, tokenizer = tiny
    settings = bounded_settings()
    frames, stamps = stream_frames(192)
    live = LiveSession(model, tokenizer, settings, progress=False, dense_horizon=16.0, spill_dir=tmp_path)
    store_bytes, in_use, groups = [], [], []
    for start in range(0, 192, 16):
        live.append(frames[start : start + 16], stamps[start : start + 16])
        store = live.prefill.store
        store_bytes.append(sum(kv_nbytes(t) for t in (*store.key_buffers, *store.value_buffers)))
        in_use.append(live._in_use_bytes())
        groups.append(live.prefill.groups_done)
    # the dense store reaches its size within the horizon (plus the window) and then stays there
    assert store_bytes[3:] == [store_bytes[3]] * len(store_bytes[3:]), store_bytes
    # what still grows is each group's sparse KV (its time tokens and pooled visual tokens), nothing else: a
    # spilled unit's time tokens leave the global copy (its sparse KV stands in for them)
    layout = live._builder.layout()
    g = layout.groups[-1]
    per_row = 2 * model.config.text_config.num_hidden_layers * kv_nbytes(store.key_buffers[0][:, :1])
    time_rows, dense_rows = g.visual_start - g.time_start, g.end - g.time_start
    expected = (time_rows + (g.end - g.visual_start) // 4) * per_row
    assert store.global_shift == live.prefill.global_start[live.spilled_units * settings.unit_size] - (
        layout.video_start
    )
    growth = (in_use[-1] - in_use[3]) / (groups[-1] - groups[3])
    slack = 2 * dense_rows * per_row / (groups[-1] - groups[3])  # one unit more or less in the store
    assert abs(growth - expected) <= slack, (growth, expected, dense_rows * per_row)
    exact = LiveSession(model, tokenizer, settings, progress=False)
    exact.append(frames, stamps)
    assert live._in_use_bytes() < exact._in_use_bytes() and exact.spilled_units == 0


def test_max_memory_spills_until_the_kv_in_use_fits(tiny, tmp_path):
    model, tokenizer = tiny
    frames, stamps = stream_frames(64)
    live = LiveSession(model, tokenizer, bounded_settings(), progress=False, max_memory=1, spill_dir=tmp_path)
    live.append(frames, stamps)
    # everything before the next block's window (1 block of 2 groups back from group 16) is on disk
    assert live.spilled_units == (16 - 2) // 2
    assert live.ask(QUESTION, generation_config=GENERATION).stats["spilled_units"] == 7


def test_bounded_mode_settings_are_checked(tiny, tmp_path):
    model, tokenizer = tiny
    with pytest.raises(InputError, match="needs the bilevel engine mode"):
        LiveSession(model, tokenizer, settings_for("chunked"), progress=False, dense_horizon=10)
    with pytest.raises(InputError, match="int8 is not supported"):
        LiveSession(model, tokenizer, settings_for("bilevel", "int8"), progress=False, dense_horizon=10)
    with pytest.raises(InputError, match="dense_horizon must be"):
        LiveSession(model, tokenizer, bounded_settings(), progress=False, dense_horizon=-1)
    with pytest.raises(InputError, match="max_memory must be"):
        LiveSession(model, tokenizer, bounded_settings(), progress=False, max_memory=0)
