"""`videoxl2 serve` (the API, optionally with the UI at /ui) and `videoxl2 ui` (the UI alone)."""

from __future__ import annotations

import argparse


def _common(parser: argparse.ArgumentParser) -> None:
    from ..defaults import DEFAULT_MODEL

    parser.add_argument(
        "--model", default=str(DEFAULT_MODEL), help="checkpoint folder (default: the demo model)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    from ..cli import _add_placement_args, _add_quantize_args

    _add_quantize_args(parser)
    _add_placement_args(parser)
    parser.add_argument("--host", default="127.0.0.1", help="default loopback only; 0.0.0.0 exposes it")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--media-root",
        action="append",
        default=[],
        help="folder whose files file:// URLs may read (repeatable)",
    )
    parser.add_argument(
        "--max-frames-limit", type=int, default=2048, help="most frames a request may ask for"
    )
    from ..cli import _add_reader_args

    _add_reader_args(parser)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    _common(parser)
    parser.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on /v1")
    parser.add_argument("--max-queue", type=int, default=8, help="requests admitted at once; more get 429")
    parser.add_argument(
        "--cache-gb",
        type=float,
        default=None,
        help="pre-filled videos kept for follow-up questions (default: half the device's free memory)",
    )
    parser.add_argument("--allow-remote-urls", action="store_true", help="let requests name http(s) videos")
    parser.add_argument("--max-upload-mb", type=float, default=64.0, help="largest data: upload")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds before a request gets 504")
    parser.add_argument("--ui", action="store_true", help="also serve the web UI at /ui")
    streams = parser.add_argument_group("live streams (POST /v1/streams)")
    streams.add_argument("--max-streams", type=int, default=2, help="streams watched at once; more get 429")
    streams.add_argument(
        "--stream-url-schemes",
        default="",
        metavar="LIST",
        help="URL schemes a stream may use, comma-separated (e.g. rtsp,srt); default none: files only",
    )
    streams.add_argument(
        "--stream-hosts", default="", metavar="LIST", help="hosts a stream URL may name, comma-separated"
    )
    streams.add_argument(
        "--stream-max-memory",
        default=None,
        metavar="BYTES",
        help="KV memory one stream may hold (e.g. 2GiB); older units spill to disk, and a stream still "
        "over it stops reading",
    )
    streams.add_argument(
        "--stream-dense-horizon",
        type=float,
        default=None,
        metavar="SECONDS",
        help="bounded memory: units older than this keep only their sparse KV in memory",
    )
    streams.add_argument("--stream-max-fps", type=float, default=4.0, help="most frames per stream second")
    streams.add_argument(
        "--stream-follow-idle",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="a followed file that has not grown for this long has ended",
    )


def settings_from(args, **extra):
    from ..cli import _weight_kwargs
    from ..errors import InputError
    from .service import ServeSettings

    if getattr(args, "max_queue", 1) < 1 or getattr(args, "timeout", 1) <= 0:
        raise InputError("--max-queue must be >= 1 and --timeout > 0")
    return ServeSettings(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        **_weight_kwargs(args),
        media_roots=args.media_root,
        max_frames_limit=args.max_frames_limit,
        decode_threads=args.decode_threads,
        decode_workers=args.decode_workers,
        **extra,
    )


def stream_settings(args) -> dict:
    """The live-stream fields of ServeSettings, checked before any weights are loaded."""
    from ..engine.plan import parse_bytes
    from ..errors import InputError
    from .streams import StreamPolicy

    def names(text: str) -> list[str]:
        return [name.strip() for name in text.split(",") if name.strip()]

    if args.max_streams < 0:
        raise InputError(f"--max-streams must be >= 0, got {args.max_streams}")
    if not args.stream_max_fps > 0 or not args.stream_follow_idle > 0:
        raise InputError("--stream-max-fps and --stream-follow-idle must be > 0")
    if args.stream_dense_horizon is not None and not args.stream_dense_horizon > 0:
        raise InputError(f"--stream-dense-horizon must be > 0 seconds, got {args.stream_dense_horizon}")
    schemes, hosts = names(args.stream_url_schemes), names(args.stream_hosts)
    StreamPolicy([], frozenset(schemes), frozenset(hosts))  # unknown schemes fail here, in one line
    memory = args.stream_max_memory
    return dict(
        max_streams=args.max_streams,
        stream_url_schemes=schemes,
        stream_hosts=hosts,
        stream_max_memory=None if memory is None else parse_bytes(memory, "--stream-max-memory"),
        stream_dense_horizon=args.stream_dense_horizon,
        stream_max_fps=args.stream_max_fps,
        stream_follow_idle_s=args.stream_follow_idle,
    )


def run_serve(args) -> int:
    import uvicorn

    from .api import create_app
    from .service import VideoChatService

    settings = settings_from(
        args,
        api_key=args.api_key,
        max_queue=args.max_queue,
        cache_bytes=None if args.cache_gb is None else int(args.cache_gb * 2**30),
        allow_remote_urls=args.allow_remote_urls,
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        timeout_s=args.timeout,
        **stream_settings(args),
    )
    service = VideoChatService(settings)
    app = create_app(service)
    if args.ui:
        import gradio as gr

        from .ui import build_ui

        app = gr.mount_gradio_app(app, build_ui(service), path="/ui")
    print(
        f"videoxl2 serving {service.model_id} on http://{args.host}:{args.port}"
        + (" (UI at /ui)" if args.ui else "")
    )
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        service.close()
    return 0


def run_ui(args) -> int:
    from .service import VideoChatService
    from .ui import build_ui

    service = VideoChatService(settings_from(args))
    try:
        build_ui(service).launch(server_name=args.host, server_port=args.port)
    finally:
        service.close()
    return 0


COMMANDS = {
    "serve": (
        "OpenAI-compatible video chat API (FastAPI), optionally with the web UI",
        add_serve_arguments,
        run_serve,
    ),
    "ui": ("the web UI alone (Gradio)", _common, run_ui),
}
