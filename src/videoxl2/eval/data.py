"""What every loader shares: the sample record, reading annotation files (JSON, JSONL, parquet), and finding
videos, with errors that list everything missing at once so a broken download is fixed in one go."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError

LIST_LIMIT = 20
VIDEO_SUFFIXES = (".mp4", ".MP4", ".mkv", ".webm", ".avi", ".mov")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass
class Sample:
    """One question. `question` is the full text the model is asked (the harness's prompt); `answer` is the
    gold value the benchmark's judge compares with (a letter, a text, or [start, end] seconds)."""

    id: str
    video: Path
    question: str
    answer: object
    categories: dict = field(default_factory=dict)  # category name -> value (or list of values)
    choices: tuple[str, ...] = ()  # option letters of a multiple-choice question
    subtitles: Path | None = None
    clip_start: float = 0.0  # seconds the video's times start at (a clip keeps its source's times)


def listing(items: Sequence) -> str:
    """The first LIST_LIMIT items, one per line, and how many more there are."""
    items = [str(i) for i in items]
    shown = "\n  ".join(items[:LIST_LIMIT])
    more = f"\n  ... and {len(items) - LIST_LIMIT} more" if len(items) > LIST_LIMIT else ""
    return f"\n  {shown}{more}"


def check_root(root) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"--data-root {root}: no such folder")
    return root


def find_file(root: Path, names: Iterable[str], what: str, override=None) -> Path:
    """`override` if given, else the first of `names` (relative to `root`, globs allowed) that exists."""
    if override is not None:
        path = Path(override)
        if not path.is_file():
            raise InputError(f"{what}: {path}: no such file")
        return path
    names = list(names)
    for name in names:
        found = sorted(root.glob(name))
        if found:
            return found[0]
    raise InputError(f"{root}: no {what} found; looked for:{listing(names)}")


def read_records(path: Path) -> list[dict]:
    """A JSON list, JSON lines, or a parquet table (needs pyarrow), as a list of dicts."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError as err:
                raise InputError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from err
            return pq.read_table(path).to_pylist()
        text = path.read_text(encoding="utf-8")
        if suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: not readable ({err})") from err
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise InputError(f"{path}: expected a list of objects")
    return data


def require_fields(records: Sequence[dict], fields: Sequence[str], source) -> None:
    """Every record has every field, else one error naming each record and what it lacks."""
    problems = []
    for index, record in enumerate(records):
        missing = [f for f in fields if record.get(f) is None]
        if missing:
            problems.append(f"record {index}: missing {', '.join(missing)}")
    if problems:
        raise InputError(f"{source}: {len(problems)} records lack required fields:{listing(problems)}")


def locate_videos(wanted: Sequence[tuple[str, Sequence[Path]]], root: Path) -> list[Path]:
    """For each (name, candidate paths) the first candidate that is a file; one error listing every video
    none of whose candidates exists (each with where it was looked for first)."""
    found, missing = [], []
    for name, candidates in wanted:
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            missing.append(f"{name} (e.g. {candidates[0]})")
        found.append(path)
    if missing:
        names = sorted(set(missing))
        raise InputError(f"{root}: {len(names)} videos not found:{listing(names)}")
    return found


def video_candidates(folders: Sequence[Path], name: str, suffixes: Sequence[str] = ("",)) -> list[Path]:
    """`name` (plus each suffix) in each folder, in order."""
    return [folder / f"{name}{suffix}" for folder in folders for suffix in suffixes]


def letter_options(options: Sequence[str], style: str) -> str:
    """Options one per line as `A. text` (style "dot") or `(A) text` (style "paren")."""
    if style == "dot":
        return "\n".join(f"{LETTERS[i]}. {text}" for i, text in enumerate(options))
    return "\n".join(f"({LETTERS[i]}) {text}" for i, text in enumerate(options))
