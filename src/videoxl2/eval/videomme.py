"""Video-MME (Hugging Face `lmms-lab/Video-MME`, split test): 900 videos x 3 questions, four options each,
grouped by duration (short / medium / long); optionally with the video's subtitles in the prompt.

Layout under --data-root, as the dataset unpacks:
    videomme/test-00000-of-00001.parquet   annotations (a .json/.jsonl with the same fields also works)
    data/<videoID>.mp4                     videos (.MP4 and .mkv too; the release kept them at the root)
    subtitle/<videoID>.srt                 subtitles, for --subtitles
Fields used: videoID, question_id, duration, domain, sub_category, task_type, question, options, answer.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .data import (
    Sample,
    check_root,
    find_file,
    locate_videos,
    read_records,
    require_fields,
    video_candidates,
)
from .scoring import ABCD, accuracy_table, mcq_letter, videomme_release_letter

DURATIONS = ("short", "medium", "long")
ANNOTATIONS = (
    "videomme/test-*.parquet",
    "*.parquet",
    "videomme/*.json",
    "videomme/*.jsonl",
    "*.json",
    "*.jsonl",
)
INSTRUCTION = (
    "Select the best answer to the following multiple-choice question based on the video and the subtitles. "
    "Respond with only the letter (A, B, C, or D) of the correct option."
)
POST_PROMPT = "\nAnswer with the option's letter from the given choices directly."
SUBTITLE_HEADER = "This video's subtitles are listed below: \n"
SUBTITLE_POST_PROMPT = "The best answer is:"
# Subtitles shown are those on screen at this many uniformly spaced frames (the harnesses' `frame_num`).
SUBTITLE_FRAMES = {"release": 128, "lmms-eval": 32}
_FONT = re.compile(r'<font color="white" size=".72c">(.*?)</font>')


def options_text(options: list[str], protocol: str) -> str:
    """The release prints the option list as a Python list (`['A. ...', 'B. ...']`); lmms-eval one a line."""
    return str(options) if protocol == "release" else "\n".join(options)


def load(root, options) -> list[Sample]:
    root = check_root(root)
    path = find_file(root, ANNOTATIONS, "Video-MME annotations", options.annotations)
    records = read_records(path)
    require_fields(records, ("videoID", "question_id", "duration", "question", "options", "answer"), path)
    if options.subset:
        records = [r for r in records if r["duration"] == options.subset]
    wanted = [
        (r["videoID"], video_candidates([root / "data", root], r["videoID"], (".mp4", ".MP4", ".mkv")))
        for r in records
    ]
    samples = []
    for record, video in zip(records, locate_videos(wanted, root)):
        choices = [str(o) for o in record["options"]]
        body = f"{INSTRUCTION}\n{record['question']}\n{options_text(choices, options.protocol)}\n"
        samples.append(
            Sample(
                id=str(record["question_id"]),
                video=video,
                question=body + (SUBTITLE_POST_PROMPT if options.subtitles else POST_PROMPT),
                answer=str(record["answer"]).strip(),
                categories={k: record.get(k) for k in ("duration", "domain", "sub_category", "task_type")},
                choices=ABCD,
                subtitles=root / "subtitle" / f"{record['videoID']}.srt" if options.subtitles else None,
            )
        )
    return samples


def prompt(sample: Sample, options) -> str:
    """With subtitles, the lines on screen at the harness's sampled frames go before the question."""
    if sample.subtitles is None:
        return sample.question
    shown = subtitle_text(sample.subtitles, sample.video, SUBTITLE_FRAMES[options.protocol])
    return f"{SUBTITLE_HEADER}{shown}\n{sample.question}"


def read_srt(path: Path) -> dict[tuple[float, float], str]:
    """(start, end) seconds -> text, blocks separated by blank lines (a repeated time range keeps the last
    text, as the harness's dict does)."""

    def seconds(stamp: str) -> float:
        hours, minutes, rest = stamp.strip().split(":")
        secs, millis = rest.split(",")
        return int(hours) * 3600 + int(minutes) * 60 + int(secs) + int(millis) / 1000

    entries = {}
    for block in path.read_text(encoding="utf-8").split("\n\n"):
        lines = block.split("\n")
        if block.strip() and len(lines) >= 3:
            start, end = lines[1].split(" --> ")
            entries[(seconds(start), seconds(end))] = " ".join(lines[2:])
    return entries


def subtitle_text(srt: Path, video: Path, frames: int) -> str:
    """The subtitles shown at `frames` uniformly spaced frames, one a line (the text inside the files'
    white <font> tag), or the harness's "No subtitles available" when the video has no subtitle file."""
    from ..video import probe_video

    if not srt.is_file():
        return "No subtitles available"
    info = probe_video(video)
    spans = [(int(s * info.avg_fps), int(e * info.avg_fps), text) for (s, e), text in read_srt(srt).items()]
    hits = [
        i
        for frame in np.linspace(0, info.num_frames - 1, frames, dtype=int).tolist()
        for i, (start, end, _) in enumerate(spans)
        if start <= frame < end
    ]
    lines = []
    for i in list(set(hits)):  # the harness's order: a set of the same ints, built the same way
        found = _FONT.findall(spans[i][2])
        if found:
            lines.append(found[0])
    return "\n".join(lines)


def judge(sample: Sample, prediction: str, options) -> dict:
    if options.protocol == "release":
        letter = videomme_release_letter(prediction)
    else:
        letter = mcq_letter(prediction, ABCD)
    return {"extracted": letter, "correct": letter.lower() == sample.answer.lower()}


def summarize(records: list[dict], options) -> dict:
    table = accuracy_table(records, ("duration", "domain", "sub_category", "task_type"))
    return {"score": table["accuracy"], "score_name": "accuracy (%)", **table}
