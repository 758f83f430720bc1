"""Charades-STA test set: temporal grounding of a sentence in a ~30 s video, scored by IoU with the gold
span. The release published no grounding harness, so prompt and parsing are lmms-eval 0.7.3's
(`charades_sta` task).

Two published layouts under --data-root:
  - the original release: `charades_sta_test.txt`, lines "VIDEO_ID start end##sentence";
  - lmms-eval's copy (Hugging Face `lmms-eval/charades_sta`): a parquet/JSON table with video
    ("ID.mp4"), caption, timestamp ([start, end]).
Videos: `Charades_v1_480/<ID>.mp4` (or at the root).
"""

from __future__ import annotations

import ast

from ..errors import InputError
from .data import Sample, check_root, find_file, listing, locate_videos, read_records, require_fields
from .scoring import grounding_table, parse_span, temporal_iou

ANNOTATIONS = ("charades_sta_test.txt", "*.txt", "*.parquet", "*.json", "*.jsonl")
PRE_PROMPT = (
    "Please find the visual event described by a sentence in the video, determining its starting and ending "
    "times. The format should be: 'The event happens in the start time - end time'. For example, The event "
    "'person turn a light on' happens in the 24.3 - 30.4 seonds. Now I will give you the textual sentence: "
)  # lmms-eval's words, typo included: the prompt is part of what makes scores comparable
POST_PROMPT = "Please return its start time and end time."


def read_sta_text(path) -> list[dict]:
    rows, problems = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        head, _, caption = line.partition("##")
        parts = head.split()
        try:
            start, end = float(parts[1]), float(parts[2])
            usable = len(parts) == 3 and bool(caption.strip())
        except (ValueError, IndexError):
            usable = False
        if not usable:
            problems.append(f"line {number}: {line!r} is not 'ID start end##sentence'")
            continue
        rows.append({"video": f"{parts[0]}.mp4", "caption": caption.strip(), "timestamp": [start, end]})
    if problems:
        raise InputError(f"{path}: {len(problems)} malformed lines:{listing(problems)}")
    return rows


def load(root, options) -> list[Sample]:
    root = check_root(root)
    path = find_file(root, ANNOTATIONS, "Charades-STA annotations", options.annotations)
    rows = read_sta_text(path) if path.suffix == ".txt" else read_records(path)
    require_fields(rows, ("video", "caption", "timestamp"), path)
    folders = [root / "Charades_v1_480", root]
    videos = locate_videos([(r["video"], [f / r["video"] for f in folders]) for r in rows], root)
    samples = []
    for index, (row, video) in enumerate(zip(rows, videos)):
        stamp = row["timestamp"]
        start, end = (float(t) for t in (ast.literal_eval(stamp) if isinstance(stamp, str) else stamp))
        caption = str(row["caption"])
        samples.append(
            Sample(
                id=f"{index}:{row['video']}",
                video=video,
                question=f"{PRE_PROMPT}{caption}. {POST_PROMPT}",
                answer=[start, end],
            )
        )
    return samples


def judge(sample: Sample, prediction: str, options) -> dict:
    """`correct` is IoU >= 0.5, the usual headline threshold; the summary reports every threshold."""
    span = parse_span(prediction)
    iou = temporal_iou(sample.answer, span) if span is not None else 0.0
    return {"extracted": None if span is None else list(span), "iou": iou, "correct": iou >= 0.5}


def summarize(records: list[dict], options) -> dict:
    table = grounding_table(records)
    return {"score": table["mIoU"], "score_name": "mIoU (%)", **table}
