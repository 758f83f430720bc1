"""The `videoxl2` command. Every failure we foresee ends with one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import json
import sys
import time

from .errors import VideoXL2Error


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    from .defaults import DEFAULT_MODEL

    parser.add_argument(
        "--model",
        default=str(DEFAULT_MODEL),
        help="checkpoint folder, the release's or ours, or a hub id such as BAAI/Video-XL-2[@revision] "
        "(the Hugging Face cache; HF_HUB_OFFLINE honoured) (default: the bundled demo model)",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--dtype", default=None, help="float32 (CPU default), bfloat16 (GPU default), float16"
    )
    _add_quantize_args(parser)
    _add_placement_args(parser)


def _add_placement_args(parser: argparse.ArgumentParser) -> None:
    """--device-map / --offload-folder: weights spread by accelerate (`modeling/offload.py`)."""
    parser.add_argument(
        "--device-map",
        default=None,
        help="spread the weights with accelerate instead of --device: auto, balanced, sequential, or a JSON "
        'object / file {module: "cuda:0" | "cpu" | "disk"} (layers must compute on one GPU)',
    )
    parser.add_argument(
        "--offload-folder",
        default=None,
        help='where "disk" entries of --device-map go (default: a temp folder)',
    )


def _add_quantize_args(parser: argparse.ArgumentParser) -> None:
    """--quantize / --quantize-vision: weight-only quantization through torchao (`modeling/quantize.py`)."""
    parser.add_argument(
        "--quantize",
        default=None,
        metavar="{none,int8,int4}",
        help="store the LLM's linear weights as int8 (per-channel scales) or int4 (groups of 128) "
        '(needs torchao: pip install -e ".[quant]"; int4 on CUDA needs --dtype bfloat16)',
    )
    parser.add_argument(
        "--quantize-vision", action="store_true", help="with --quantize: the SigLIP tower's linears too"
    )


def _weight_kwargs(args) -> dict:
    """load_model's weight options (quantize, quantize_vision, device_map, offload_folder) from the flags."""
    from .modeling.offload import parse_device_map

    device_map = getattr(args, "device_map", None)
    return dict(
        quantize=getattr(args, "quantize", None),
        quantize_vision=getattr(args, "quantize_vision", False),
        device_map=None if device_map is None else parse_device_map(device_map),
        offload_folder=getattr(args, "offload_folder", None),
    )


def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", choices=["dense", "chunked", "bilevel"], default=None, help="engine mode")
    _add_memory_args(parser)
    parser.add_argument(
        "--offload", action="store_true", help="keep the dense video KV in CPU memory (GPU runs)"
    )
    _add_reader_args(parser)


def _add_reader_args(parser: argparse.ArgumentParser) -> None:
    """How the video is read: decoder threads and processes (the frames are the same either way)."""
    from .video.decode import default_decode_workers

    parser.add_argument(
        "--decode-threads", type=int, default=None, help="FFmpeg decoding threads (default: FFmpeg's choice)"
    )
    parser.add_argument(
        "--decode-workers",
        type=int,
        default=default_decode_workers(),
        help="processes decoding stretches of the video in parallel (default: one per 4 cores, "
        f"here {default_decode_workers()})",
    )


def _add_memory_args(
    parser: argparse.ArgumentParser,
    kv_dtypes=("auto", "int8"),
    kv_help="video memory: auto (the model's dtype) or int8, a scale per token and KV head (half of bf16)",
) -> None:
    """The chunked / bi-level knobs (default: the checkpoint's own), for every command running the engine;
    `videoxl2 plan` passes its own `--kv-dtype` choices (float dtypes too)."""
    parser.add_argument("--block-size", type=int, default=None, help="groups per pre-fill block (chunked)")
    parser.add_argument("--prev-blocks", type=int, default=None, help="earlier blocks a block sees (chunked)")
    parser.add_argument("--unit-size", type=int, default=None, help="groups per selection unit (bilevel)")
    parser.add_argument("--topk", type=int, default=None, help="relevant units kept dense (bilevel)")
    parser.add_argument("--compression", type=int, default=None, help="visual KV pooling step (bilevel)")
    parser.add_argument(
        "--rerotate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bilevel: keys at contiguous positions (the release's way) or, with --no-rerotate, at their own",
    )
    parser.add_argument("--kv-dtype", choices=list(kv_dtypes), default=None, help=kv_help)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="videoxl2", description="Video-XL-2 long-video understanding")
    commands = parser.add_subparsers(dest="command", required=True)

    chat = commands.add_parser(
        "chat", help="answer a question about a video or image file, or a saved video memory"
    )
    chat.add_argument(
        "video", help="video or image file, or a memory written by --save-memory (answered without the video)"
    )
    chat.add_argument("question")
    _add_model_args(chat)
    _add_engine_args(chat)
    chat.add_argument("--max-frames", type=int, default=512, help="most frames sampled (default 512)")
    chat.add_argument("--fps", type=float, default=1.0, help="sampling rate in frames per second (default 1)")
    chat.add_argument(
        "--max-fps", type=float, default=None, help="raise the rate up to this for short videos"
    )
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    chat.add_argument("--json", action="store_true", help="print answer, frames, timestamps, stats as JSON")
    chat.add_argument("--units", default=None, help="bilevel: dense units chosen by you, e.g. 3,7,12")
    chat.add_argument("--selection-file", default=None, help="bilevel: the release's selected_infos JSON")
    chat.add_argument(
        "--save-memory",
        default=None,
        metavar="FILE",
        help="also write the video memory to FILE; `videoxl2 chat FILE QUESTION` then answers from it",
    )

    tiny = commands.add_parser(
        "init-tiny", help="write a randomly initialised tiny checkpoint (for trying things)"
    )
    tiny.add_argument("path")
    tiny.add_argument("--seed", type=int, default=0)

    synth = commands.add_parser("synth-video", help="write a small synthetic test video")
    synth.add_argument("path")
    synth.add_argument("--frames", type=int, default=64)
    synth.add_argument("--fps", type=float, default=4.0)
    synth.add_argument("--seed", type=int, default=0)
    return parser


def _memory_overrides(args) -> dict:
    """The knobs given on the command line (None: keep the checkpoint's)."""
    return dict(
        block_size=args.block_size,
        prev_blocks=args.prev_blocks,
        unit_size=args.unit_size,
        topk=args.topk,
        compression=args.compression,
        rerotate=args.rerotate,
        kv_dtype=args.kv_dtype if args.kv_dtype in ("auto", "int8") else None,  # plan: its float dtypes aside
    )


def _engine_overrides(args) -> dict:
    return dict(mode=args.mode, **_memory_overrides(args), offload=args.offload or None)


def run_chat(args) -> int:
    import torch

    from . import load_model, load_tokenizer
    from .engine.memory import memory_header
    from .engine.session import VideoSession
    from .engine.settings import EngineSettings

    header = memory_header(args.video)  # a videoxl2 memory file; anything else is a video or image
    if header is None:
        check_media(args.video, args.max_frames, args.fps, args.max_fps)  # fail fast, before loading weights
    start = time.perf_counter()
    model = load_model(args.model, device=args.device, dtype=args.dtype, **_weight_kwargs(args))
    tokenizer = load_tokenizer(args.model)
    load_s = time.perf_counter() - start
    generation = dict(max_new_tokens=args.max_new_tokens)
    if args.temperature > 0:
        generation.update(do_sample=True, temperature=args.temperature)
    with torch.inference_mode():
        if header is None:
            settings = EngineSettings.from_config(model.config, **_engine_overrides(args))
            session = VideoSession.from_path(
                model,
                tokenizer,
                args.video,
                max_num_frames=args.max_frames,
                sample_fps=args.fps,
                max_sample_fps=args.max_fps,
                settings=settings,
                progress=False if args.json else None,
                decode_threads=args.decode_threads,
                decode_workers=args.decode_workers,
            )
        else:
            # what the memory records, with the knobs given here (pre-fill ones must agree with it)
            session = VideoSession.from_memory(model, tokenizer, args.video, _engine_overrides(args))
        units = external_units(args, session.settings, session)
        answer = session.ask(args.question, generation_config=generation, units=units)
        saved = session.save_memory(args.save_memory) if args.save_memory else None
    if args.json:
        stats = dict(answer.stats)
        stats["load_s"] = load_s
        frames = None if session.timestamps is None else len(session.timestamps)
        record = dict(answer=answer.text, frames=frames, timestamps=session.timestamps, stats=stats)
        if header is not None:
            record.update(memory=str(args.video), source=session.source, group_seconds=session.group_seconds)
        if saved is not None:
            record["saved_memory"] = str(saved)
        print(json.dumps(record, indent=2))
    else:
        print(answer.text)
    return 0


def external_units(args, settings, session) -> list[int] | None:
    """Units from --units or --selection-file (bilevel only); None lets the model choose."""
    from .errors import InputError

    if args.units is None and args.selection_file is None:
        return None
    if settings.mode != "bilevel":
        raise InputError("--units and --selection-file need --mode bilevel")
    if args.units is not None:
        try:
            return [int(u) for u in args.units.split(",") if u.strip()]
        except ValueError as err:
            raise InputError(f"--units must be comma-separated integers, got {args.units!r}") from err
    from .engine.select import read_selection_file

    units = read_selection_file(args.selection_file, session.source, args.question, settings.unit_size)
    if units is None:
        raise InputError(f"{args.selection_file}: no entry for this video and question")
    return units


def check_media(path, max_frames, fps, max_fps) -> None:
    from pathlib import Path

    from .engine.session import IMAGE_SUFFIXES
    from .video import plan_sampling, probe_video

    if Path(path).suffix.lower() in IMAGE_SUFFIXES:
        from .video import load_image

        load_image(path)
        return
    info = probe_video(path)
    plan_sampling(info.num_frames, info.avg_fps, max_frames, fps, max_fps)


def run_init_tiny(args) -> int:
    from .tiny import save_tiny_checkpoint

    print(save_tiny_checkpoint(args.path, seed=args.seed))
    return 0


def run_synth_video(args) -> int:
    from .video.synthetic import write_synthetic_video

    print(write_synthetic_video(args.path, num_frames=args.frames, fps=args.fps, seed=args.seed))
    return 0


COMMANDS = {"chat": run_chat, "init-tiny": run_init_tiny, "synth-video": run_synth_video}

# Packages that bring their own sub-commands: each has a `command.py` with
# COMMANDS = {name: (help, add_arguments(parser), run(args) -> exit code)}.
PLUGIN_MODULES = ("data", "train", "eval", "serve", "demo")


def plugin_commands() -> dict:
    import importlib

    found = {}
    for name in PLUGIN_MODULES:
        try:
            module = importlib.import_module(f"videoxl2.{name}.command")
        except ModuleNotFoundError as err:
            if err.name and err.name.startswith("videoxl2"):
                continue  # that package is not part of this build
            raise
        found.update(module.COMMANDS)
    found.update(importlib.import_module("videoxl2.engine.plan").COMMANDS)  # `videoxl2 plan`
    found.update(importlib.import_module("videoxl2.engine.watch").COMMANDS)  # `videoxl2 watch`
    return found


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    plugins = plugin_commands()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, (help_text, add_arguments, _) in plugins.items():
        add_arguments(commands.add_parser(name, help=help_text))
    args = parser.parse_args(argv)
    run = COMMANDS.get(args.command) or plugins[args.command][2]
    try:
        return run(args)
    except VideoXL2Error as err:
        print(f"videoxl2: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("videoxl2: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
