"""Running a benchmark: shard the questions over processes, answer them video by video, append each judged
answer to a per-process JSONL as it comes, and merge everything into samples.jsonl and results.json.

Questions about one video go to one process and share one pre-fill (the video memory answers any number
of questions). Each answer depends only on its video and question, so the merged results are the same for
any number of processes and for a run resumed after a crash.

Out folder: run.json (settings, checked on --resume), shards/rank<N>.jsonl (appended per answer),
samples.jsonl and results.json (written at the end, atomically).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path

from tqdm.auto import tqdm

from ..defaults import DEFAULT_MODEL as BUNDLED_MODEL
from ..errors import InputError, VideoXL2Error
from .benchmarks import BENCHMARKS, Benchmark, Options, input_rules
from .data import Sample, listing

DEFAULT_MODEL = str(BUNDLED_MODEL)  # `videoxl2 eval` without --model: the bundled demo model

_STAT_KEYS = (
    "mode", "video_tokens", "question_tokens", "new_tokens", "kv_tokens", "kv_bytes", "dense_kv_bytes",
    "sparse_kv_bytes", "prefill_attention_flops", "dense_attention_flops",
)  # fmt: skip
_VIDEO_TIMES = ("decode_s", "vision_s", "prefill_s")
_ANSWER_TIMES = ("select_s", "answer_s")


@dataclass
class EvalSettings:
    """Everything `videoxl2 eval` takes. `max_frames=None` uses the release's budget for the benchmark;
    `max_new_tokens=None` the harness's answer length; `engine` overrides EngineSettings fields."""

    benchmark: str
    data_root: Path
    out: Path
    model: str | None = DEFAULT_MODEL
    options: Options = field(default_factory=Options)
    max_frames: int | None = None
    fps: float | None = 1.0
    max_fps: float | None = 4.0
    max_new_tokens: int | None = None
    engine: dict = field(default_factory=dict)
    device: str = "cpu"
    dtype: str | None = None
    quantize: str | None = None  # weight-only "int8" / "int4" (torchao); None: full precision
    quantize_vision: bool = False
    device_map: str | dict | None = None  # weights spread by accelerate (`--device-map`); answers unchanged
    offload_folder: str | None = None
    limit: int | None = None
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    decode_threads: int | None = None  # how the videos are read; the frames are the same either way
    decode_workers: int = 1


@dataclass
class World:
    """This process's place among data-parallel workers (torchrun / accelerate launch set the env)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @classmethod
    def from_env(cls) -> World:
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        import torch.distributed as dist

        owns = not dist.is_initialized()
        if owns:  # gloo: the collectives here are barriers only, and gloo needs no GPU
            dist.init_process_group("gloo", timeout=timedelta(hours=72))
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owns)

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def run_eval(settings: EvalSettings) -> dict | None:
    """Evaluate; returns the results dict on the main process (None on the others)."""
    started = time.perf_counter()
    bench = BENCHMARKS.get(settings.benchmark)
    if bench is None:
        raise InputError(f"unknown benchmark {settings.benchmark!r}: one of {', '.join(sorted(BENCHMARKS))}")
    options = bench.resolve(settings.options)
    if settings.model is None:
        raise InputError("--model is required: the checkpoint folder to evaluate")
    config = run_config(settings, bench, options)
    samples = bench.load(Path(settings.data_root), options)
    if settings.limit is not None:
        samples = samples[: max(0, int(settings.limit))]
    if not samples:
        raise InputError(f"{settings.data_root}: no questions to ask")
    duplicates = [i for i, n in Counter(s.id for s in samples).items() if n > 1]
    if duplicates:
        raise InputError(f"{settings.data_root}: question ids are not unique:{listing(duplicates)}")

    world = World.from_env()
    try:
        out = Path(settings.out)
        check_out(out, config, settings.resume, settings.overwrite)
        world.barrier()
        if world.rank == 0:
            prepare_out(out, config, settings.overwrite)
        world.barrier()
        done = {i for i, r in read_shards(out).items() if "error" not in r}
        pending = [s for s in shard(samples, world.rank, world.size) if s.id not in done]
        if pending:
            answer_all(
                pending, bench, options, settings, config, world, out / "shards" / f"rank{world.rank}.jsonl"
            )
        world.barrier()
        if world.rank != 0:
            return None
        return merge(out, samples, bench, options, config, world.size, time.perf_counter() - started)
    finally:
        world.close()


def run_config(settings: EvalSettings, bench: Benchmark, options: Options) -> dict:
    """The settings an answer depends on (what --resume must find unchanged), engine settings resolved
    from the checkpoint's config."""
    from ..engine.settings import EngineSettings
    from ..modeling.checkpoint import read_config, resolve_checkpoint
    from ..modeling.quantize import check_quantize

    quantize = check_quantize(settings.quantize)
    model = resolve_checkpoint(settings.model)  # a folder, or a hub id in the local cache
    if not model.is_dir():
        raise InputError(f"--model {model}: not a checkpoint folder")
    engine = EngineSettings.from_config(read_config(model)[0], **settings.engine)
    config = dict(
        benchmark=bench.name,
        protocol=options.protocol,
        subset=options.subset,
        subtitles=options.subtitles,
        annotations=None if options.annotations is None else str(Path(options.annotations).resolve()),
        model=str(model.resolve()),
        dtype=settings.dtype,
        # only when set, so that runs from before --quantize existed still resume
        **({"quantize": quantize, "quantize_vision": settings.quantize_vision} if quantize else {}),
        max_frames=int(settings.max_frames or bench.max_frames),
        fps=settings.fps,
        max_fps=settings.max_fps,
        max_new_tokens=int(settings.max_new_tokens or bench.max_new_tokens),
        engine=asdict(engine),
        **input_rules(options.protocol),  # remainder (frames past a multiple of 4), time_rule (mm:ss)
    )
    return json.loads(json.dumps(config))  # as it reads back from run.json


def check_out(out: Path, config: dict, resume: bool, overwrite: bool) -> None:
    """An out folder with earlier answers needs --resume (same settings) or --overwrite."""
    earlier = out.is_dir() and (any((out / "shards").glob("*.jsonl")) or (out / "results.json").exists())
    if not earlier or overwrite:
        return
    if not resume:
        raise InputError(
            f"{out} holds an earlier run: pass --resume to continue it or --overwrite to start over"
        )
    try:
        previous = json.loads((out / "run.json").read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"{out}/run.json: unreadable, cannot check --resume settings ({err})") from err
    changed = sorted(k for k in config.keys() | previous.keys() if config.get(k) != previous.get(k))
    if changed:
        raise InputError(f"--resume: {out} was run with different {', '.join(changed)}")


def prepare_out(out: Path, config: dict, overwrite: bool) -> None:
    (out / "shards").mkdir(parents=True, exist_ok=True)
    if overwrite:
        for path in [*(out / "shards").glob("*.jsonl"), out / "samples.jsonl", out / "results.json"]:
            path.unlink(missing_ok=True)
    write_atomic(out / "run.json", json.dumps(config, indent=2) + "\n")


def write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_shards(out: Path) -> dict[str, dict]:
    """Every answer recorded so far, by question id; an answer beats an error; a line cut short by a crash
    is skipped."""
    records: dict[str, dict] = {}
    for path in sorted((out / "shards").glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record["id"] not in records or "error" in records[record["id"]]:
                records[record["id"]] = record
    return records


def shard(samples: list[Sample], rank: int, size: int) -> list[Sample]:
    """This rank's questions: whole videos, each to the rank with the fewest questions so far."""
    loads, mine = [0] * size, []
    for _, group in group_by_video(samples):
        target = min(range(size), key=lambda r: (loads[r], r))
        loads[target] += len(group)
        if target == rank:
            mine.extend(group)
    return mine


class ShardWriter:
    """Appends one JSON line per answer and flushes it, so a crash loses at most the answer in flight."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        cut = False
        if path.is_file() and path.stat().st_size:
            with open(path, "rb") as file:
                file.seek(-1, os.SEEK_END)
                cut = file.read(1) != b"\n"
        self.file = open(path, "a", encoding="utf-8")
        if cut:
            self.file.write("\n")  # leave a line cut short by a crash on its own

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def answer_all(pending, bench, options, settings, config, world, path: Path) -> None:
    """Load the model and answer `pending`, one pre-fill per video, each answer recorded as it comes."""
    import torch

    from .. import load_model, load_tokenizer
    from ..engine.session import VideoSession
    from ..engine.settings import EngineSettings
    from ..prompt import prepare_question

    device = settings.device
    if world.size > 1 and device.startswith("cuda") and ":" not in device:
        device = f"cuda:{world.local_rank}"
    if world.size > 1 and settings.device_map is not None:
        raise InputError("--device-map spreads one model: run it in one process, not data-parallel")
    model = load_model(
        settings.model,
        device=device,
        dtype=settings.dtype,
        quantize=config.get("quantize"),
        quantize_vision=config.get("quantize_vision", False),
        device_map=settings.device_map,
        offload_folder=settings.offload_folder,
    )
    tokenizer = load_tokenizer(settings.model)
    engine = EngineSettings(**config["engine"])
    generation = {"max_new_tokens": config["max_new_tokens"]}
    bar = tqdm(
        total=len(pending), desc=bench.name, unit="q", disable=not settings.progress or world.rank != 0
    )
    running = Running(bench.running)
    writer = ShardWriter(path)
    try:
        for (video, clip_start), group in group_by_video(pending):
            session, first = None, True
            for sample in group:
                record = {"id": sample.id, "video": str(video)}
                try:
                    question = bench.question(sample, options)
                    record["question"] = question
                    if session is None:
                        session = VideoSession.from_path(
                            model, tokenizer, video, config["max_frames"], config["fps"], config["max_fps"],
                            settings=engine, progress=False, remainder=config["remainder"],
                            decode_threads=settings.decode_threads, decode_workers=settings.decode_workers,
                            clip_start=clip_start,
                        )  # fmt: skip
                    asked = prepare_question(question, config["time_rule"])
                    with torch.inference_mode():
                        answer = session.ask(asked, generation_config=generation)
                except VideoXL2Error as err:  # recorded (and retried on --resume); the run goes on
                    record.update(failed(bench, sample, options, err))
                else:
                    record.update(judged(bench, sample, options, answer, first))
                    first = False
                record["categories"] = sample.categories
                writer.write(record)
                running.add(record)
                bar.set_postfix_str(running.text(), refresh=False)
                bar.update()
    finally:
        writer.close()
        bar.close()


def group_by_video(samples: Iterable[Sample]) -> list[tuple[tuple[Path, float], list[Sample]]]:
    """Questions that can share one pre-fill: the same video told the same times."""
    groups: dict[tuple[Path, float], list[Sample]] = {}
    for sample in samples:
        groups.setdefault((sample.video, sample.clip_start), []).append(sample)
    return list(groups.items())


def judged(bench, sample, options, answer, first: bool) -> dict:
    """The record of one answer: gold, prediction, the judge's verdict, frames, timings, engine stats.
    The video's own timings go with its first question only (later ones reuse its pre-fill)."""
    stats = answer.stats
    timings = {k: stats[k] for k in (*(_VIDEO_TIMES if first else ()), *_ANSWER_TIMES) if k in stats}
    mode_stats = {k: stats[k] for k in _STAT_KEYS if k in stats}
    if stats.get("mode") == "bilevel":
        mode_stats["dense_units"] = [u["index"] for u in stats.get("units", []) if u.get("dense")]
    return {
        "answer": sample.answer,
        "prediction": answer.text,
        **bench.judge(sample, answer.text, options),
        "frames": stats.get("frames"),
        "video_reused": not first,
        "timings": timings,
        "stats": mode_stats,
    }


def failed(bench, sample, options, err: Exception) -> dict:
    """A question that could not be asked counts as a wrong, empty answer and keeps its error."""
    verdict = {**bench.judge(sample, "", options), "correct": False}
    if "iou" in verdict:
        verdict["iou"] = 0.0
    return {"answer": sample.answer, "prediction": "", **verdict, "error": str(err)}


class Running:
    """The number on the progress bar: accuracy, or mIoU for grounding."""

    def __init__(self, metric: str):
        self.metric, self.total, self.count = metric, 0.0, 0

    def add(self, record: dict) -> None:
        self.total += record["iou"] if self.metric == "mIoU" else float(bool(record["correct"]))
        self.count += 1

    def text(self) -> str:
        return f"{self.metric}={100 * self.total / max(1, self.count):.1f}%"


def merge(out: Path, samples, bench, options, config, world_size: int, elapsed: float) -> dict:
    """samples.jsonl in question order and results.json: metrics, settings, summed timings."""
    records = read_shards(out)
    ordered = [{"index": i, **records[s.id]} for i, s in enumerate(samples) if s.id in records]
    write_atomic(out / "samples.jsonl", "".join(json.dumps(r) + "\n" for r in ordered))
    timings: dict[str, float] = {}
    for record in ordered:
        for key, value in record.get("timings", {}).items():
            timings[key] = round(timings.get(key, 0.0) + value, 6)
    results = {
        "benchmark": bench.name,
        "description": bench.description,
        "settings": config,
        "questions": len(samples),
        "answered": len(ordered),
        "errors": sum("error" in r for r in ordered),
        "metrics": bench.summarize(ordered, options),
        "timings": {**timings, "elapsed_s": round(elapsed, 3)},
        "run": {"world_size": world_size, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")},
    }
    write_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
    return results
