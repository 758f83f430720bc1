"""LVBench (THUDM/LVBench): 103 hour-long videos, 1549 four-option questions, six capabilities.

Layout under --data-root, as the benchmark publishes it:
    video_info.meta.jsonl (or data/video_info.meta.jsonl)   one line per video: key, type,
                                                            qa: [{uid, question, answer, question_type}]
    videos/<key>.mp4 (or <key>.mp4)                         videos
A question's text carries its options as "\\n(A) ..." lines and its answer is the letter. The release
harness re-split them into a question and candidates "(A) ..." (shown as "A. (A) ..."), lmms-eval 0.7.3
shows them as published.
"""

from __future__ import annotations

import re

from ..errors import InputError
from .data import (
    LETTERS,
    Sample,
    check_root,
    find_file,
    listing,
    locate_videos,
    read_records,
    video_candidates,
)
from .scoring import ABCD, accuracy_table, lvbench_release_normalize, mcq_letter

ANNOTATIONS = ("video_info.meta.jsonl", "data/video_info.meta.jsonl", "*.jsonl")
RELEASE_POST_PROMPT = "Answer with the option's letter from the given choices directly."
LMMS_POST_PROMPT = "\nAnswer the question with the option letter"  # as lmms-eval's task file sets it
_OPTION = re.compile(r"^\(([A-Z])\)\s?(.*)$")


def split_question(text: str) -> tuple[str, list[str]]:
    """The question without its option lines, and the option lines ("(A) ...") themselves."""
    stem, options = [], []
    for line in text.split("\n"):
        if _OPTION.match(line.strip()):
            options.append(line.strip())
        else:
            stem.append(line)
    return "\n".join(stem).rstrip(), options


def question_text(text: str, protocol: str) -> str:
    stem, options = split_question(text)
    if protocol == "release":
        listed = "".join(f"{LETTERS[i]}. {option}\n" for i, option in enumerate(options))
        return f"{stem}\n{listed}{RELEASE_POST_PROMPT}"
    return f"{stem}\n" + "\n".join(options) + LMMS_POST_PROMPT


def load(root, options) -> list[Sample]:
    root = check_root(root)
    path = find_file(root, ANNOTATIONS, "LVBench annotations (video_info.meta.jsonl)", options.annotations)
    rows, problems = [], []
    for index, video in enumerate(read_records(path)):
        if not video.get("key") or not isinstance(video.get("qa"), list):
            problems.append(f"line {index + 1}: missing key or qa")
            continue
        for number, qa in enumerate(video["qa"]):
            missing = [f for f in ("question", "answer") if qa.get(f) is None]
            if missing:
                problems.append(f"line {index + 1}, qa {number}: missing {', '.join(missing)}")
                continue
            rows.append((video, qa, number))
    if problems:
        raise InputError(f"{path}: {len(problems)} entries lack required fields:{listing(problems)}")
    folders = [root / "videos", root / "video", root, path.parent]
    wanted = [
        (video["key"], video_candidates(folders, video["key"], (".mp4", ".mkv"))) for video, _, _ in rows
    ]
    samples = []
    for (video, qa, number), file in zip(rows, locate_videos(wanted, root)):
        types = qa.get("question_type") or []
        samples.append(
            Sample(
                id=str(qa.get("uid", f"{video['key']}/{number}")),
                video=file,
                question=question_text(qa["question"], options.protocol),
                answer=str(qa["answer"]).strip(),
                categories={
                    "question_type": list(types) if isinstance(types, list) else [types],
                    "video_type": video.get("type"),
                },
                choices=ABCD,
            )
        )
    return samples


def judge(sample: Sample, prediction: str, options) -> dict:
    if options.protocol == "release":
        extracted = lvbench_release_normalize(prediction)
        return {"extracted": extracted, "correct": extracted == lvbench_release_normalize(sample.answer)}
    letter = mcq_letter(prediction, ABCD)
    return {"extracted": letter, "correct": letter == sample.answer}


def summarize(records: list[dict], options) -> dict:
    """The release divides by the questions with a non-empty output; lmms-eval by all questions."""
    counted = (lambda r: r["prediction"] != "") if options.protocol == "release" else (lambda r: True)
    table = accuracy_table(records, ("question_type", "video_type"), counted)
    return {"score": table["accuracy"], "score_name": "accuracy (%)", **table}
