"""Reading real long videos: the plan-aware reader against front-to-back decoding, and reading overlapped
with the model.

1. Test videos, written here with PyAV (cached under results/ingest/videos/): H.264 with B-frames (three
   between references, a pyramid), a keyframe every 2 s and every 10 s, 480p and 1080p; one VP9 webm; each
   `--minutes` long (default 10) at 30 fps. The picture is a scrolling texture with a moving square, so
   motion compensation and references do real work.
2. Reading: for plans of 64 and 256 frames (the release's uniform spread) and 1 fps, the seconds and the
   frames decoded by front-to-back decoding (`decode_front_to_back`, the reference), by our reader
   (`iter_frames`), and by decord and torchcodec when they are importable (neither is a dependency; a
   missing one is reported as skipped). Our frames are checked bit for bit against front to back.
3. Overlap: 256 frames of the 480p, 2 s keyframe video, end to end through `VideoSession` (pre-fill and one
   answer of 16 tokens) on the engine benchmark's small shape (SigLIP at toy width, LLM hidden 512 x 8
   layers, 144 visual tokens per group), torch at one thread and the reader at one decoding thread: decode
   alone (reader + preprocessing), model alone (the same pixels, already made), and the pipeline; the
   acceptance is pipeline <= 1.15 x max(decode alone, model alone).
4. RGB conversion: decoded frames of each test video and of a 64x64 demo-style video converted by PyAV's
   `frame.to_ndarray(format="rgb24")` (a new swscale context per frame) and by the reader's
   `rgb_converter()` (one context reused), on frames decoded afresh for each side, best of three,
   milliseconds per frame, checked bit for bit.
5. The bundled demo model, default threads: time to the first answer on the same video and plan, with the
   per-stage split and the overlap achieved.

    python benchmarks/ingest.py                 # everything, about 20 min on 2 cores (videos cached)
    python benchmarks/ingest.py --minutes 1 --skip-1080p   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime
from pathlib import Path

import av
import numpy as np

HERE = Path(__file__).resolve().parent
FPS = 30
VIDEOS = {  # name: (height, width, codec, seconds between keyframes)
    "h264-480p-key2s": (480, 854, "libx264", 2),
    "h264-480p-key10s": (480, 854, "libx264", 10),
    "h264-1080p-key2s": (1080, 1920, "libx264", 2),
    "vp9-480p-key5s": (480, 854, "libvpx-vp9", 5),
}
E2E_VIDEO = "h264-480p-key2s"
SMALL_LLM = dict(
    hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2, intermediate_size=1408
)
QUESTION = "What happens in the video?"


# -- test videos --------------------------------------------------------------------------------------------
def write_video(path: Path, height: int, width: int, codec: str, key_seconds: int, minutes: float) -> Path:
    """A textured, moving test video; written to a temporary name, then renamed (never half a file)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, (height // 4, width // 4, 3), dtype=np.uint8)  # detail at 1/8 of the size
    texture = np.asarray(Image.fromarray(coarse).resize((width * 2, height * 2), Image.Resampling.BICUBIC))
    frames = int(minutes * 60 * FPS)
    tmp = path.with_name(path.stem + ".partial" + path.suffix)
    with av.open(str(tmp), "w") as container:
        stream = container.add_stream(codec, rate=FPS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        gop = key_seconds * FPS
        if codec == "libx264":
            params = f"b-adapt=0:b-pyramid=normal:keyint-min={gop}:scenecut=0"
            stream.options = {
                "preset": "ultrafast",
                "bf": "3",
                "g": str(gop),
                "crf": "23",
                "x264-params": params,
            }
        else:
            stream.options = {"g": str(gop), "deadline": "realtime", "cpu-used": "8", "crf": "32", "b": "0"}
        side = height // 4
        for index in range(frames):
            y, x = (index * 2) % height, (index * 3) % width
            image = np.ascontiguousarray(texture[y : y + height, x : x + width])
            sy, sx = (index * 5) % (height - side), (index * 7) % (width - side)
            image[sy : sy + side, sx : sx + side] = (255, 255, 255)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(tmp, path)
    return path


def make_videos(folder: Path, minutes: float, names: list[str]) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in names:
        height, width, codec, key = VIDEOS[name]
        suffix = ".webm" if codec == "libvpx-vp9" else ".mp4"
        path = folder / f"{name}-{minutes:g}min{suffix}"
        if not path.exists():
            start = time.perf_counter()
            print(f"writing {path.name} ...", file=sys.stderr, flush=True)
            write_video(path, height, width, codec, key, minutes)
            print(f"  {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        paths[name] = path
    return paths


# -- reading ------------------------------------------------------------------------------------------------
def plans(num_frames: int, avg_fps: float) -> dict[str, list[int]]:
    from videoxl2.video import plan_sampling

    return {
        "64 frames": plan_sampling(num_frames, avg_fps, 64).indices,
        "256 frames": plan_sampling(num_frames, avg_fps, 256).indices,
        "1 fps": plan_sampling(num_frames, avg_fps, 10**6, sample_fps=1.0).indices,
    }


def read_ours(path, indices):
    from videoxl2.video.decode import ReadStats, iter_frames

    stats = ReadStats()
    frames = list(iter_frames(path, indices, stats=stats))
    return frames, dict(frames_decoded=stats.frames_decoded, path=stats.path, seeks=stats.seeks)


def read_front_to_back(path, indices):
    from videoxl2.video.decode import ReadStats, decode_front_to_back

    stats = ReadStats()
    frames = list(decode_front_to_back(path, indices, stats=stats))
    return frames, dict(frames_decoded=stats.frames_decoded)


def read_decord(path, indices):
    import decord

    reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
    return list(reader.get_batch(indices).asnumpy()), {}


def read_torchcodec(path, indices):
    from torchcodec.decoders import VideoDecoder

    decoder = VideoDecoder(str(path), dimension_order="NHWC", seek_mode="exact")
    return list(decoder.get_frames_at(indices).data.numpy()), {}


READERS = {
    "front-to-back": (read_front_to_back, None),
    "ours": (read_ours, None),
    "decord": (read_decord, "decord"),
    "torchcodec": (read_torchcodec, "torchcodec.decoders"),
}


def importable(module: str | None) -> str | None:
    """None when importable, else why not."""
    if module is None:
        return None
    try:
        __import__(module)
    except Exception as err:  # any failure to import means we cannot measure it
        return f"not importable ({type(err).__name__}: {str(err).splitlines()[0][:80]})"
    return None


def bench_reading(paths: dict[str, Path]) -> list[dict]:
    from videoxl2.video import probe_video

    rows = []
    skipped = {name: importable(module) for name, (_, module) in READERS.items()}
    for video, path in paths.items():
        info = probe_video(path)
        for plan_name, indices in plans(info.num_frames, info.avg_fps).items():
            reference = None
            for reader, (read, _) in READERS.items():
                row = dict(video=video, plan=plan_name, frames=len(indices), reader=reader)
                if skipped[reader]:
                    rows.append(dict(row, skipped=skipped[reader]))
                    continue
                start = time.perf_counter()
                frames, extra = read(path, indices)
                row.update(seconds=time.perf_counter() - start, **extra)
                if reader == "front-to-back":
                    reference = frames
                else:
                    row["identical"] = len(frames) == len(reference) and all(
                        np.array_equal(a, b) for a, b in zip(frames, reference)
                    )
                del frames
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
            reference = None
    return rows


# -- overlap ------------------------------------------------------------------------------------------------
def small_model():
    from videoxl2.tiny import build_tiny_model

    return build_tiny_model(
        seed=0, text=dict(SMALL_LLM, max_position_embeddings=32768), vision_grid=24, init_std=0.02
    )


def time_session(session) -> dict:
    start = time.perf_counter()
    session.prefill()
    answer = session.ask(QUESTION, generation_config={"max_new_tokens": 16})
    wall = time.perf_counter() - start
    stats = answer.stats
    keys = ("decode_s", "decode_wait_s", "vision_s", "prefill_s", "overlap_s", "answer_s", "read")
    return dict(wall_s=wall, **{k: stats[k] for k in keys if k in stats})


def bench_overlap(path: Path, frames: int = 256) -> dict:
    import torch

    from videoxl2.engine.session import VideoSession
    from videoxl2.engine.settings import EngineSettings

    torch.set_num_threads(1)
    model, tokenizer = small_model()
    settings = EngineSettings.from_config(model.config, mode="chunked")

    def session():
        return VideoSession.from_path(
            model, tokenizer, path, max_num_frames=frames, settings=settings, progress=False, decode_threads=1
        )

    # decode alone: the reader thread's work (decode + preprocess) with nothing else running
    probe = session()
    start = time.perf_counter()
    pixels = list(probe._pixel_batches())
    decode_alone = time.perf_counter() - start
    # model alone: the same pixels, already made
    alone = session()
    alone._pixel_batches = pixels.__iter__
    model_alone = time_session(alone)
    pixels.clear()
    # the pipeline
    piped = time_session(session())
    bound = max(decode_alone, model_alone["wall_s"])
    return dict(
        frames=frames,
        torch_threads=torch.get_num_threads(),
        decode_threads=1,
        decode_alone_s=decode_alone,
        model_alone_s=model_alone["wall_s"],
        sequential_s=decode_alone + model_alone["wall_s"],
        pipeline=piped,
        ratio_to_max=piped["wall_s"] / bound,
        accepted=piped["wall_s"] <= 1.15 * bound,
    )


def bench_demo(path: Path, frames: int = 256) -> dict:
    import torch

    from videoxl2 import load_model, load_tokenizer
    from videoxl2.defaults import DEFAULT_MODEL
    from videoxl2.engine.session import VideoSession

    torch.set_num_threads(os.cpu_count() or 1)
    model, tokenizer = load_model(DEFAULT_MODEL), load_tokenizer(DEFAULT_MODEL)
    with torch.inference_mode():
        session = VideoSession.from_path(model, tokenizer, path, max_num_frames=frames, progress=False)
        return dict(frames=frames, **time_session(session))


# -- RGB conversion -----------------------------------------------------------------------------------------
def bench_conversion(paths: dict[str, Path], folder: Path, frames: int = 120) -> list[dict]:
    """Per-frame conversion cost, PyAV's per-frame context against the reader's reused one, on freshly
    decoded frames (the first `frames` of each video; the 64x64 one is the demo data's size)."""
    from videoxl2.video.decode import rgb_converter
    from videoxl2.video.synthetic import write_synthetic_video

    small = folder / "demo-64x64.mp4"
    if not small.exists():
        write_synthetic_video(small, num_frames=frames, fps=1.0, size=(64, 64), seed=0)

    def fresh(path):  # new frame objects each round: PyAV caches a frame's context on the frame itself
        with av.open(str(path)) as container:
            return [frame for _, frame in zip(range(frames), container.decode(video=0))]

    rows = []
    for name, path in {"64x64 (demo data)": small, **paths}.items():
        per_frame_s = reused_s = float("inf")
        for _ in range(3):  # alternated, best of three
            decoded = fresh(path)
            start = time.perf_counter()
            theirs = [frame.to_ndarray(format="rgb24") for frame in decoded]
            per_frame_s = min(per_frame_s, time.perf_counter() - start)
            decoded = fresh(path)
            to_rgb = rgb_converter()
            start = time.perf_counter()
            ours = [to_rgb(frame) for frame in decoded]
            reused_s = min(reused_s, time.perf_counter() - start)
        rows.append(
            dict(
                video=name,
                frames=len(decoded),
                size=f"{decoded[0].width}x{decoded[0].height}",
                pyav_per_frame_ms=round(1000 * per_frame_s / len(decoded), 3),
                reused_ms=round(1000 * reused_s / len(decoded), 3),
                speedup=round(per_frame_s / reused_s, 2),
                identical=all(np.array_equal(a, b) for a, b in zip(theirs, ours)),
            )
        )
    return rows


def conversion_table(rows: list[dict]) -> list[str]:
    lines = [
        "| video | size | frames | to_ndarray ms/frame | reused context ms/frame | speed-up | identical |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['video']} | {r['size']} | {r['frames']} | {r['pyav_per_frame_ms']:.3f} | "
            f"{r['reused_ms']:.3f} | {r['speedup']:.1f}x | {'yes' if r['identical'] else 'NO'} |"
        )
    return lines


# -- report -------------------------------------------------------------------------------------------------
def table(rows: list[dict]) -> list[str]:
    lines = [
        "| video | plan | front-to-back s (frames decoded) | ours s (frames decoded, path) | speed-up | "
        "decord s | torchcodec s | identical |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    keyed = {(r["video"], r["plan"], r["reader"]): r for r in rows}
    for video, plan in dict.fromkeys((r["video"], r["plan"]) for r in rows):
        base, ours = keyed[(video, plan, "front-to-back")], keyed[(video, plan, "ours")]

        def other(name, video=video, plan=plan):
            row = keyed[(video, plan, name)]
            return "skipped" if "skipped" in row else f"{row['seconds']:.2f}"

        lines.append(
            f"| {video} | {plan} | {base['seconds']:.2f} ({base['frames_decoded']}) | "
            f"{ours['seconds']:.2f} ({ours['frames_decoded']}, {ours['path']}) | "
            f"{base['seconds'] / ours['seconds']:.1f}x | {other('decord')} | {other('torchcodec')} | "
            f"{'yes' if ours['identical'] else 'NO'} |"
        )
    return lines


def report(result: dict) -> str:
    lines = table(result["reading"]) if result["reading"] else []
    if result.get("conversion"):
        lines += ["", "RGB conversion of decoded frames:", "", *conversion_table(result["conversion"])]
    overlap = result.get("overlap")
    if overlap:
        p = overlap["pipeline"]
        lines += [
            "",
            f"Overlap, small shape, {overlap['frames']} frames, one torch thread + one decoding thread:",
            "",
            "| decode alone s | model alone s | one after the other s | pipeline s | pipeline / max | "
            "reader wait s | overlap s |",
            "|---:|---:|---:|---:|---:|---:|---:|",
            f"| {overlap['decode_alone_s']:.2f} | {overlap['model_alone_s']:.2f} | "
            f"{overlap['sequential_s']:.2f} | {p['wall_s']:.2f} | {overlap['ratio_to_max']:.2f} | "
            f"{p['decode_wait_s']:.2f} | {p['overlap_s']:.2f} |",
        ]
    demo = result.get("demo")
    if demo:
        lines += [
            "",
            f"Demo model, {demo['frames']} frames, default threads: first answer in {demo['wall_s']:.2f} s "
            f"(reading {demo['decode_s']:.2f} s, of which {demo['decode_wait_s']:.2f} s waited for; vision "
            f"{demo['vision_s']:.2f} s, pre-fill {demo['prefill_s']:.2f} s, answer {demo['answer_s']:.2f} s; "
            f"overlap {demo['overlap_s']:.2f} s; frames decoded {demo['read']['frames_decoded']} of "
            f"{demo['read']['frames_in_file']}, path {demo['read']['path']})",
        ]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="length of each test video")
    parser.add_argument("--skip-1080p", action="store_true")
    parser.add_argument("--skip-reading", action="store_true")
    parser.add_argument("--skip-conversion", action="store_true")
    parser.add_argument("--skip-overlap", action="store_true")
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    names = [n for n in VIDEOS if not (args.skip_1080p and "1080p" in n)]
    paths = make_videos(args.out / "ingest" / "videos", args.minutes, names)
    result = dict(
        benchmark="ingest",
        date=datetime.now().isoformat(timespec="seconds"),
        machine=dict(cpu=platform.processor() or platform.machine(), cores=os.cpu_count()),
        pyav=av.__version__,
        ffmpeg=".".join(map(str, av.library_versions["libavcodec"])),
        minutes=args.minutes,
        fps=FPS,
        videos={name: VIDEOS[name] for name in names},
        reading=[] if args.skip_reading else bench_reading(paths),
    )
    if not args.skip_conversion:
        result["conversion"] = bench_conversion(paths, args.out / "ingest" / "videos")
    if not args.skip_overlap:
        result["overlap"] = bench_overlap(paths[E2E_VIDEO])
    if not args.skip_demo:
        result["demo"] = bench_demo(paths[E2E_VIDEO])
    out = args.out / f"ingest-{datetime.now():%Y%m%d-%H%M}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(report(result))
    print(f"\n-> {out}")


if __name__ == "__main__":
    main()
