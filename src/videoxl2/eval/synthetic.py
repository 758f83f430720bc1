"""The synthetic suite: any LLaVA-style JSON (what `videoxl2.data` writes for the demo model, and what the
training data uses): a list of {video, conversations: [{from: human, value: question}, {from: gpt,
value: answer}], optional id, family and clip_start}. The first question/answer pair is asked; the answer
counts when it equals the reference after normalisation (case, spacing, outer punctuation); scores are given
per family. A record's `clip_start` (seconds) starts the video's time text there, as in training: with clips
whose "when" answers moved with it (`make-data --clip-start-max`), the "when" score says whether the model
reads its time text or counts groups from the start.

Layout: --data-root holds the JSON (or pass --annotations); video paths are relative to the JSON's folder.
"""

from __future__ import annotations

from ..errors import InputError
from ..prompt import IMAGE_MARKER, check_clip_start
from .data import Sample, check_root, find_file, listing, locate_videos, read_records
from .scoring import accuracy_table, normalize_text

ANNOTATIONS = ("*.json", "*.jsonl")


def first_turn(record: dict) -> tuple[str, str] | None:
    turns = record.get("conversations") or []
    if len(turns) < 2 or turns[0].get("from") != "human" or turns[1].get("from") != "gpt":
        return None
    question = str(turns[0].get("value", "")).replace(IMAGE_MARKER, "").strip()
    return (question, str(turns[1].get("value", ""))) if question else None


def load(root, options) -> list[Sample]:
    root = check_root(root)
    found = sorted(root.glob("*.json")) + sorted(root.glob("*.jsonl"))
    if options.annotations is None and len(found) > 1:
        raise InputError(f"{root}: several annotation files, choose one with --annotations:{listing(found)}")
    path = find_file(root, ANNOTATIONS, "LLaVA-style annotation JSON", options.annotations)
    records = read_records(path)
    problems = []
    for index, record in enumerate(records):
        if not record.get("video"):
            problems.append(f"record {index}: missing video")
        elif first_turn(record) is None:
            problems.append(
                f"record {index}: conversations must start with a human question and a gpt answer"
            )
        try:
            check_clip_start(record.get("clip_start", 0.0), f"record {index}")
        except InputError as err:
            problems.append(str(err))
    if problems:
        raise InputError(f"{path}: {len(problems)} unusable records:{listing(problems)}")
    folders = [path.parent, root]
    videos = locate_videos([(r["video"], [f / r["video"] for f in folders]) for r in records], root)
    samples = []
    for index, (record, video) in enumerate(zip(records, videos)):
        question, answer = first_turn(record)
        samples.append(
            Sample(
                id=str(record.get("id", index)),
                video=video,
                question=question,
                answer=answer,
                categories={"family": record.get("family", "all")},
                clip_start=float(record.get("clip_start", 0.0)),
            )
        )
    return samples


def judge(sample: Sample, prediction: str, options) -> dict:
    extracted = normalize_text(prediction)
    return {"extracted": extracted, "correct": extracted == normalize_text(sample.answer)}


def summarize(records: list[dict], options) -> dict:
    table = accuracy_table(records, ("family",))
    return {"score": table["accuracy"], "score_name": "exact-match accuracy (%)", **table}
