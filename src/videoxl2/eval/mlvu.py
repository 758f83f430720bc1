"""MLVU dev, multiple choice (seven task types; the two open-ended ones are not part of it).

Two published layouts under --data-root:
  - the lmms-eval copy (Hugging Face `sy1998/MLVU_dev`): `mlvu/test-00000-of-00001.parquet` (or a
    .json/.jsonl) with video_name, question (options already in it as "(A) ..." lines), answer (a letter),
    task_type; videos at `<video_name>` (or `video/<video_name>`).
  - the MLVU release (`MLVU/json/<n>_<task>.json`, JSON lists with video, question, candidates, answer
    (the option text), question_type; videos at `MLVU/video/<n>_<task>/<video>`). Its questions get
    the options appended as "(A) ..." lines, the answer becomes the letter.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from .data import (
    LETTERS,
    Sample,
    check_root,
    find_file,
    letter_options,
    listing,
    locate_videos,
    read_records,
    require_fields,
)
from .scoring import ABCD, accuracy_table, mcq_letter, mlvu_release_letter

TASK_TYPES = ("anomaly_reco", "count", "ego", "needle", "order", "plotQA", "topic_reasoning")
RELEASE_TASK_NAMES = {"findNeedle": "needle"}  # the MLVU release's question_type -> lmms-eval's task_type
ANNOTATIONS = ("mlvu/test-*.parquet", "*.parquet", "mlvu/*.json", "mlvu/*.jsonl", "*.json", "*.jsonl")


def load(root, options) -> list[Sample]:
    root = check_root(root)
    json_dir = next((d for d in (root / "json", root / "MLVU" / "json") if d.is_dir()), None)
    if options.annotations is None and json_dir is not None:
        rows = release_rows(json_dir)
    else:
        path = find_file(root, ANNOTATIONS, "MLVU annotations", options.annotations)
        rows = read_records(path)
        require_fields(rows, ("video_name", "question", "answer", "task_type"), path)
        for index, row in enumerate(rows):
            row["id"] = str(row.get("question_id") or f"{row['task_type']}/{row['video_name']}/{index}")
            row["video_paths"] = [root / row["video_name"], root / "video" / row["video_name"]]
            if row.get("candidates") is not None and "(A)" not in row["question"]:
                row["question"] = f"{row['question']}\n{letter_options(list(row['candidates']), 'paren')}"
                row["answer"] = answer_letter(row["answer"], list(row["candidates"]), path)
    videos = locate_videos([(row["video_paths"][0].name, row["video_paths"]) for row in rows], root)
    return [
        Sample(
            id=row["id"],
            video=video,
            question=text(row["question"], options.protocol),
            answer=str(row["answer"]).strip(),
            categories={"task_type": row["task_type"]},
            choices=ABCD,
        )
        for row, video in zip(rows, videos)
    ]


def answer_letter(answer, candidates: list, source) -> str:
    """The gold letter: the answer's position among the candidates, or the answer if it is a letter."""
    if answer in candidates:
        return LETTERS[candidates.index(answer)]
    if isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip() in LETTERS[: len(candidates)]:
        return answer.strip()
    raise InputError(f"{source}: answer {answer!r} is not one of the candidates {candidates}")


def release_rows(json_dir: Path) -> list[dict]:
    """Rows from the MLVU release's per-task JSON files (multiple-choice tasks only)."""
    files = sorted(json_dir.glob("*.json"))
    if not files:
        raise InputError(f"{json_dir}: no MLVU annotation files (*.json)")
    rows, problems = [], []
    for path in files:
        for index, record in enumerate(read_records(path)):
            if record.get("candidates") is None:
                continue  # open-ended tasks (sub-scene captioning, summary)
            missing = [f for f in ("video", "question", "answer", "question_type") if record.get(f) is None]
            if missing:
                problems.append(f"{path.name}[{index}]: missing {', '.join(missing)}")
                continue
            candidates = list(record["candidates"])
            task = RELEASE_TASK_NAMES.get(record["question_type"], record["question_type"])
            rows.append(
                {
                    "id": f"{path.stem}/{index}",
                    "video_paths": [json_dir.parent / "video" / path.stem / record["video"]],
                    "question": f"{record['question']}\n{letter_options(candidates, 'paren')}",
                    "answer": answer_letter(record["answer"], candidates, f"{path}[{index}]"),
                    "task_type": task,
                }
            )
    if problems:
        raise InputError(f"{json_dir}: {len(problems)} records lack required fields:{listing(problems)}")
    return rows


def text(question: str, protocol: str) -> str:
    if protocol == "release":
        return f"\n{question}\nOnly give the best option.\n\nBest option: ("
    return f"{question}\nOnly give the best option.\nBest option: ("


def judge(sample: Sample, prediction: str, options) -> dict:
    if options.protocol == "release":
        letter = mlvu_release_letter(prediction)
    else:
        letter = mcq_letter(prediction, ABCD)
    return {"extracted": letter, "correct": letter == sample.answer}


def summarize(records: list[dict], options) -> dict:
    """The release scores accuracy over all questions; lmms-eval averages the seven task types' accuracies
    (a type with no questions counting 0, as there)."""
    table = accuracy_table(records, ("task_type",))
    if options.protocol == "release":
        return {"score": table["accuracy"], "score_name": "accuracy (%)", **table}
    by_type = table.get("categories", {}).get("task_type", {})
    mean = sum(by_type.get(t, {}).get("accuracy", 0.0) for t in TASK_TYPES) / len(TASK_TYPES)
    return {"score": round(mean, 4), "score_name": "mean accuracy over task types (%)", **table}
