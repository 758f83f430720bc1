"""LongVideoBench validation set, video only (Hugging Face `longvideobench/LongVideoBench`, lmms-eval task
`longvideobench_val_v`): up to five options per question.

Layout under --data-root, as the dataset unpacks:
    lvb_val.json                            annotations (candidates as a list), or
    validation-00000-of-00001.parquet       the same with option0..option4 ("N/A" when unused)
    videos/<video_path>                     videos
Fields used: id, video_path, question, candidates | option0..4, correct_choice, duration_group,
question_category. Both harnesses use the same prompt and parsing, so the two protocols agree here.
"""

from __future__ import annotations

from .data import (
    LETTERS,
    Sample,
    check_root,
    find_file,
    letter_options,
    locate_videos,
    read_records,
    require_fields,
)
from .scoring import accuracy_table, longvideobench_letter

ANNOTATIONS = ("lvb_val.json", "validation-*.parquet", "*val*.json", "*val*.jsonl", "*.parquet")
POST_PROMPT = "Answer with the option's letter from the given choices directly.\n"


def option_list(record: dict) -> tuple[list[str], int]:
    """Options shown (every one but "N/A") and how many are valid answers (those before the first "N/A")."""
    if record.get("candidates") is not None:
        options = [str(c) for c in record["candidates"]]
        return options, len(options)
    raw = [record.get(f"option{i}") for i in range(5)]
    shown = [str(o) for o in raw if o is not None and o != "N/A"]
    valid = next((i for i, o in enumerate(raw) if o is None or o == "N/A"), len(raw))
    return shown, valid


def load(root, options) -> list[Sample]:
    root = check_root(root)
    path = find_file(root, ANNOTATIONS, "LongVideoBench annotations", options.annotations)
    records = read_records(path)
    require_fields(records, ("id", "video_path", "question", "correct_choice"), path)
    folders = [root / "videos", root]
    wanted = [(r["video_path"], [folder / r["video_path"] for folder in folders]) for r in records]
    samples = []
    for record, video in zip(records, locate_videos(wanted, root)):
        shown, valid = option_list(record)
        samples.append(
            Sample(
                id=str(record["id"]),
                video=video,
                question=f"{record['question']}\n{letter_options(shown, 'dot')}\n{POST_PROMPT}",
                answer=LETTERS[int(record["correct_choice"])],
                categories={k: record.get(k) for k in ("duration_group", "question_category")},
                choices=tuple(LETTERS[:valid]),
            )
        )
    return samples


def judge(sample: Sample, prediction: str, options) -> dict:
    letter, guessed = longvideobench_letter(prediction, sample.choices, seed=sample.id)
    return {"extracted": letter, "correct": letter == sample.answer, "guessed": guessed}


def summarize(records: list[dict], options) -> dict:
    table = accuracy_table(records, ("duration_group", "question_category"))
    guessed = sum(bool(r.get("guessed")) for r in records)
    return {"score": table["accuracy"], "score_name": "accuracy (%)", "guessed": guessed, **table}
