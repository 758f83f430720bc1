"""Weight-only quantization (`--quantize int8|int4`, torchao) against float32 on CPU: accuracy, memory, speed.

For each of `--quantize` (default none,int8,int4), on the bundled demo model unless `--model` says otherwise:

* weights: the bytes the loaded model stores (`modeling/quantize.weight_bytes`) beside the planner's
  prediction (`engine/budget.weight_breakdown`), and which linears were converted or kept;
* speed: one 96-frame synthetic video pre-filled once (seconds; the best of `--repeats`), then the
  multiple-choice question of the held-out set, answered greedily: first-token seconds and decode ms per
  token (the median gap between tokens after the first), in-process;
* held-out accuracy: `videoxl2 eval synthetic --limit 200` per engine mode (`--modes`, default
  dense,bilevel) on the model card's held-out set (made with `videoxl2 make-data` when `--data-root` does
  not exist), each in its own process: accuracy by family, seconds per question, peak RSS;
* V-NIAH: `videoxl2 niah` over `--niah-lengths` x 5 depths x `--niah-trials` needles for `--niah-modes`
  (default bilevel), in its own process: accuracy by length, wall seconds, peak RSS (`--no-niah` skips it);
* a larger LLM (`--shape qwen0.5b`, default; `none` skips it): the demo model's weights are 5.6 MB, too few
  to show in a process's memory, so a random model with Qwen2.5-0.5B's decoder (hidden 896, 24 layers,
  14 / 2 heads, MLP 4,864; the tiny vocabulary and vision tower) is saved once and loaded in a process of
  its own per setting: weight bytes, peak RSS (the float checkpoint is read first, then quantized) and RSS
  after loading, pre-fill seconds of `--shape-frames` random frames and decode ms per token.

Writes `benchmarks/results/quantize-<model>-<device>-<time>.json` and prints a markdown table. Needs torchao
(`pip install torchao --no-deps`). On a shared CPU machine run it under its lock, e.g. `flock /tmp/cpu.lock
python benchmarks/quantize.py`; `--device cuda` runs the same on a GPU (bf16 unless `--dtype`).

    python benchmarks/quantize.py --data-root work/heldout
    python benchmarks/quantize.py --quantize int8 --modes dense --no-niah      # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from engine import SHAPES as ENGINE_SHAPES  # benchmarks/engine.py

from videoxl2 import load_model, load_tokenizer
from videoxl2.defaults import DEFAULT_MODEL
from videoxl2.engine import budget
from videoxl2.engine.session import VideoSession
from videoxl2.engine.settings import EngineSettings
from videoxl2.modeling.quantize import weight_bytes

RESULTS = Path(__file__).parent / "results"
SHAPES = {"qwen0.5b": ENGINE_SHAPES["qwen0.5b"]}  # the larger LLM: Qwen2.5-0.5B's decoder
HELDOUT = dict(videos=60, seed=12345, frames_min=8, frames_max=96)  # the model card's held-out draw
SPEED_FRAMES = 96


def videoxl2_command() -> list[str]:
    exe = shutil.which("videoxl2")
    return [exe] if exe else [sys.executable, "-m", "videoxl2.cli"]


def run_measured(command: list[str]) -> dict:
    """Run `command` in its own process: exit code, wall seconds, peak RSS (bytes), the tail of its output."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return dict(
        rc=proc.returncode,
        wall_s=time.perf_counter() - start,
        peak_rss=usage.ru_maxrss * 1024,
        tail=output[-600:],
    )


def ensure_heldout(root: Path) -> Path:
    if (root / "test.json").is_file():
        return root
    command = [*videoxl2_command(), "make-data", str(root), "--split", "test"]
    command += ["--videos", str(HELDOUT["videos"]), "--seed", str(HELDOUT["seed"])]
    command += ["--frames-min", str(HELDOUT["frames_min"]), "--frames-max", str(HELDOUT["frames_max"])]
    subprocess.run(command, check=True, capture_output=True)
    return root


def measure_weights(model_path: str, quantize: str, device: str, dtype) -> dict:
    model = load_model(model_path, device=device, dtype=dtype, quantize=quantize)
    report = getattr(model, "quantization", None)
    predicted = budget.weight_breakdown(model.config, model.get_input_embeddings().weight.dtype, quantize)
    return dict(
        bytes=weight_bytes(model),
        predicted=predicted.total,
        quantized_linears=len(report.quantized) if report else 0,
        kept=report.kept if report else {},
    )


def choice_sample(root: Path) -> tuple[Path, str]:
    """The held-out set's multiple-choice question (a long answer) on its longest video (up to 96 frames)."""
    from videoxl2.video import probe_video

    choices = [s for s in json.loads((root / "test.json").read_text()) if s["family"] == "choice"]
    if not choices:
        raise SystemExit(f"{root}: no multiple-choice question")
    sample = max(choices, key=lambda s: min(SPEED_FRAMES, probe_video(root / s["video"]).num_frames))
    return root / sample["video"], sample["conversations"][0]["value"].replace("<image>\n", "")


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def clock(stamps: list[float]):
    """An `on_token` callback recording when each token came (a token id is read back on the host, so the
    device has finished it)."""
    return lambda _token: stamps.append(time.perf_counter())


def measure_speed(model_path, quantize, video: Path, question: str, repeats: int, device, dtype) -> dict:
    model = load_model(model_path, device=device, dtype=dtype, quantize=quantize)
    tokenizer = load_tokenizer(model_path)
    settings = EngineSettings.from_config(model.config, mode="dense")
    best = None
    for _ in range(repeats):
        with torch.inference_mode():
            session = VideoSession.from_path(
                model, tokenizer, video, SPEED_FRAMES, 1.0, 4.0, settings=settings, progress=False
            )  # sampled as `videoxl2 eval` does
            start = time.perf_counter()
            session.prefill()
            synchronize(device)
            prefill_s = time.perf_counter() - start
            stamps: list[float] = []
            start = time.perf_counter()
            answer = session.ask(question, generation_config={"max_new_tokens": 96}, on_token=clock(stamps))
        gaps = [b - a for a, b in zip(stamps, stamps[1:])]
        run = dict(
            frames=len(session.timestamps),
            video_tokens=session.layout.video_end,
            prefill_s=prefill_s,
            first_token_s=stamps[0] - start if stamps else None,
            new_tokens=len(answer.token_ids),
            decode_ms_per_token=1000 * statistics.median(gaps) if gaps else None,
            answer=answer.text,
        )
        if best is None or run["prefill_s"] + (run["decode_ms_per_token"] or 0) < best["prefill_s"] + (
            best["decode_ms_per_token"] or 0
        ):
            best = run
    return best


def device_args(device: str, dtype: str | None) -> list[str]:
    return ["--device", device] + (["--dtype", dtype] if dtype else [])


def eval_command(model_path, root, out, mode, quantize, limit, device, dtype) -> list[str]:
    command = [*videoxl2_command(), "eval", "synthetic", "--model", model_path, "--data-root", str(root)]
    command += ["--out", str(out), "--mode", mode, "--limit", str(limit), "--no-progress", "--overwrite"]
    return command + ["--quantize", quantize, *device_args(device, dtype)]


def measure_eval(model_path, root, work, mode, quantize, limit, device, dtype) -> dict:
    out = work / f"eval-{mode}-{quantize}"
    run = run_measured(eval_command(model_path, root, out, mode, quantize, limit, device, dtype))
    if run["rc"] != 0:
        return dict(error=run["tail"], **{k: run[k] for k in ("rc", "wall_s")})
    results = json.loads((out / "results.json").read_text())
    families = results["metrics"]["categories"]["family"]
    return dict(
        accuracy=results["metrics"]["accuracy"],
        questions=results["answered"],
        families={name: value["accuracy"] for name, value in families.items()},
        seconds_per_question=results["timings"]["elapsed_s"] / max(1, results["answered"]),
        timings=results["timings"],
        wall_s=run["wall_s"],
        peak_rss=run["peak_rss"],
    )


def measure_niah(model_path, work, quantize, lengths, modes, trials, device) -> dict:
    out = work / f"niah-{quantize}"
    command = [*videoxl2_command(), "niah", "--model", model_path, "--out", str(out), "--quantize", quantize]
    command += ["--device", device]  # in the model's default dtype there
    command += ["--lengths", lengths, "--modes", modes, "--trials", str(trials)]
    run = run_measured(command)
    if run["rc"] != 0:
        return dict(error=run["tail"], **{k: run[k] for k in ("rc", "wall_s")})
    summary = json.loads((out / "niah.json").read_text())["summary"]
    return dict(
        modes={
            mode: dict(
                accuracy=value["accuracy"],
                by_length=value["by_length"],
                needle_unit_selected=value.get("needle_unit_selected"),
            )
            for mode, value in summary["modes"].items()
        },
        wall_s=run["wall_s"],
        peak_rss=run["peak_rss"],
    )


def shape_child(checkpoint: str, quantize: str, frames: int, device: str, dtype) -> None:
    """In its own process: load `checkpoint` quantized, pre-fill random frames, decode; print a JSON line."""
    import numpy as np

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    start = time.perf_counter()
    model = load_model(checkpoint, device=device, dtype=dtype, quantize=quantize)
    load_s = time.perf_counter() - start
    rss_loaded = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    tokenizer = load_tokenizer(checkpoint)
    size = model.config.vision_config.image_size
    pixels = np.random.default_rng(0).integers(0, 256, (frames, size, size, 3), dtype=np.uint8)
    settings = EngineSettings.from_config(model.config, mode="chunked")
    stamps: list[float] = []
    with torch.inference_mode():
        session = VideoSession.from_frames(
            model, tokenizer, pixels, [float(i) for i in range(frames)], settings=settings, progress=False
        )
        start = time.perf_counter()
        session.prefill()
        synchronize(device)
        prefill_s = time.perf_counter() - start
        session.ask("What is shown?", generation_config={"max_new_tokens": 32}, on_token=clock(stamps))
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    result = dict(
        weight_bytes=weight_bytes(model),
        predicted=budget.weight_bytes(model.config, model.get_input_embeddings().weight.dtype, quantize),
        load_s=load_s,
        rss_after_load=rss_loaded,
        video_tokens=session.layout.video_end,
        prefill_s=prefill_s,
        new_tokens=len(stamps),
        decode_ms_per_token=1000 * statistics.median(gaps) if gaps else None,
    )
    print("RESULT " + json.dumps(result), flush=True)


def measure_shape(checkpoint: Path, quantize: str, frames: int, device: str, dtype) -> dict:
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from quantize import shape_child; "
        f"shape_child({str(checkpoint)!r}, {quantize!r}, {frames}, {device!r}, {dtype!r})"
    )
    run = run_measured([sys.executable, "-c", code])
    lines = [line for line in run["tail"].splitlines() if line.startswith("RESULT ")]
    if run["rc"] != 0 or not lines:
        return dict(error=run["tail"], rc=run["rc"])
    return dict(json.loads(lines[-1][len("RESULT ") :]), peak_rss=run["peak_rss"], wall_s=run["wall_s"])


def shape_table(record: dict) -> str:
    head = [
        "weights",
        "weight MB",
        "planner MB",
        "peak RSS MiB",
        "RSS loaded MiB",
        "pre-fill s",
        "decode ms/token",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for q, row in record["shape"]["runs"].items():
        if "error" in row:
            lines.append(f"| {q} | error: {row['error'][-200:]!r} |")
            continue
        decode = row["decode_ms_per_token"]
        cells = [q, f"{row['weight_bytes'] / 1e6:.1f}", f"{row['predicted'] / 1e6:.1f}"]
        cells += [f"{row['peak_rss'] / 2**20:.0f}", f"{row['rss_after_load'] / 2**20:.0f}"]
        cells += [f"{row['prefill_s']:.2f}", f"{decode:.1f}" if decode else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(record: dict) -> str:
    modes = record["settings"]["modes"]
    niah_modes = record["settings"]["niah_modes"] if record["settings"]["niah"] else []
    head = ["weights", "weight bytes", "planner"]
    head += [f"{m} acc" for m in modes] + [f"{m} s/question" for m in modes]
    head += [f"V-NIAH {m}" for m in niah_modes]
    head += ["prefill s (96 fr)", "decode ms/token", "peak RSS MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for q, row in record["runs"].items():
        evals = row.get("eval", {})
        cells = [q, f"{row['weights']['bytes']:,}", f"{row['weights']['predicted']:,}"]
        cells += [f"{evals[m].get('accuracy', float('nan')):.1f}" for m in modes]
        cells += [f"{evals[m].get('seconds_per_question', float('nan')):.3f}" for m in modes]
        niah = row.get("niah", {}).get("modes", {})
        cells += [f"{niah[m]['accuracy']:.1f}" if m in niah else "-" for m in niah_modes]
        speed = row["speed"]
        rss = max([e.get("peak_rss", 0) for e in evals.values()] + [0]) / 2**20
        cells += [f"{speed['prefill_s']:.3f}", f"{speed['decode_ms_per_token']:.2f}", f"{rss:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--quantize", default="none,int8,int4")
    parser.add_argument("--data-root", default=None, help="held-out set (made here when missing)")
    parser.add_argument("--modes", default="dense,bilevel", help="engine modes of the held-out evaluation")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3, help="speed: runs per setting, the best kept")
    parser.add_argument("--niah", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--niah-lengths", default="64,256,1024")
    parser.add_argument("--niah-modes", default="bilevel")
    parser.add_argument("--niah-trials", type=int, default=2)
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/quantize-...)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--shape", choices=[*SHAPES, "none"], default="qwen0.5b", help="the larger LLM")
    parser.add_argument(
        "--shape-frames", type=int, default=128, help="random frames the larger LLM pre-fills"
    )
    parser.add_argument("--skip-demo", action="store_true", help="only the larger LLM")
    parser.add_argument(
        "--dtype", default=None, help="compute dtype (default: float32 on cpu, bfloat16 on cuda)"
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    work = Path(tempfile.mkdtemp(prefix="videoxl2-quantize-"))
    quantizations = [q.strip() for q in args.quantize.split(",") if q.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    record = dict(
        model=str(args.model),
        torch=torch.__version__,
        torchao=__import__("torchao").__version__,
        threads=torch.get_num_threads(),
        cpu=os.uname().machine,
        device=args.device if args.device == "cpu" else torch.cuda.get_device_name(args.device),
        dtype=args.dtype,
        settings=dict(
            modes=modes,
            limit=args.limit,
            heldout=HELDOUT,
            speed_frames=SPEED_FRAMES,
            niah=args.niah,
            niah_lengths=args.niah_lengths,
            niah_modes=args.niah_modes.split(","),
            niah_trials=args.niah_trials,
        ),
        runs={},
    )
    stamp = time.strftime("%Y%m%d-%H%M")
    name = f"quantize-{Path(args.model).name}-{torch.device(args.device).type}-{stamp}.json"
    out = Path(args.out) if args.out else RESULTS / name
    out.parent.mkdir(parents=True, exist_ok=True)
    on = (args.device, args.dtype)
    if not args.skip_demo:
        root = ensure_heldout(Path(args.data_root) if args.data_root else work / "heldout")
        video, question = choice_sample(root)
        record["settings"]["speed_question"] = question
        for quantize in quantizations:
            row = dict(weights=measure_weights(args.model, quantize, *on))
            row["speed"] = measure_speed(args.model, quantize, video, question, args.repeats, *on)
            row["eval"] = {
                m: measure_eval(args.model, root, work, m, quantize, args.limit, *on) for m in modes
            }
            if args.niah:
                row["niah"] = measure_niah(
                    args.model,
                    work,
                    quantize,
                    args.niah_lengths,
                    args.niah_modes,
                    args.niah_trials,
                    args.device,
                )
            record["runs"][quantize] = row
            out.write_text(
                json.dumps(record, indent=2) + "\n"
            )  # after every setting: a cut run keeps its part
            print(f"{quantize}: done", file=sys.stderr, flush=True)
        print(table(record))
    if args.shape != "none":
        from videoxl2.tiny import save_tiny_checkpoint

        checkpoint = save_tiny_checkpoint(work / args.shape, seed=0, text=SHAPES[args.shape])
        record["shape"] = dict(name=args.shape, text=SHAPES[args.shape], frames=args.shape_frames, runs={})
        for quantize in quantizations:
            record["shape"]["runs"][quantize] = measure_shape(checkpoint, quantize, args.shape_frames, *on)
            out.write_text(json.dumps(record, indent=2) + "\n")
            print(f"{args.shape} {quantize}: done", file=sys.stderr, flush=True)
        print(shape_table(record))
    print(f"wrote {out}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
