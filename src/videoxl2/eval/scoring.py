"""Answer extraction and scoring, rule for rule as the harnesses behind the published numbers do it.

Two harnesses matter: the trimmed lmms-eval copy the release evaluated with (protocol "release", whose
numbers are the published ones) and lmms-eval 0.7.3 (protocol "lmms-eval"). Their quirks are kept on
purpose, since they move scores: e.g. the release's Video-MME prefix list glues two pairs of prefixes
together, LongVideoBench guesses a letter when none can be parsed, and the release's LVBench score leaves
empty outputs out of the denominator.
"""

from __future__ import annotations

import random
import re
import string
from collections import defaultdict
from collections.abc import Sequence

ABCD = ("A", "B", "C", "D")

# -- multiple choice: lmms-eval 0.7.3 (`_task_utils/mcq_extract.py`) -------------------------------------
_PHRASES = (
    "the answer is", "answer is", "the correct answer is", "correct answer is", "the best answer is",
    "best answer is", "the correct option is", "correct option is", "the best option is", "best option is",
    "the choice is", "choice is", "the correct choice is", "correct choice is", "i choose", "i select",
    "i pick", "my answer is", "my choice is", "옵션", "정답은", "답은", "답:", "答案是", "答案为",
    "选", "答えは",
)  # fmt: skip
_RANK = {"start": 10, "end": 9, "phrase": 7, "parentheses": 6, "period": 5, "colon": 4, "right_paren": 3,
         "space": 2, "fallback": 0}  # fmt: skip


def mcq_letter(response: str, choices: Sequence[str] = ABCD) -> str:
    """lmms-eval 0.7.3's letter extraction: every way a letter can appear is a candidate, ranked by how
    answer-like the form is (leading letter > trailing > after "the answer is" > "(B)" > "B." > "B:" >
    "B)" > "B "), the last occurrence winning within a form; any bare capital letter only as a last resort.
    Returns "" when nothing matches (case-sensitive: "b" is not an answer)."""
    if not response or not response.strip():
        return ""
    text = response.strip()
    for char in ",.!?;:'\"":  # one character after the other, as the original does
        text = text.strip(char)
    text = f" {text} "
    found = []
    for form, template in (("parentheses", "({})"), ("period", "{}."), ("colon", "{}:"),
                           ("right_paren", "{})"), ("space", "{} ")):  # fmt: skip
        for ch in choices:
            if template.format(ch) in text:
                found.append((ch, text.rfind(template.format(ch)), form))
    lower = text.lower()
    for phrase in _PHRASES:
        at = lower.find(phrase)
        if at != -1:
            for ch in choices:
                position = text.find(ch, at + len(phrase))
                if position != -1:
                    found.append((ch, position, "phrase"))
    bare = text.strip()
    for ch in choices:
        if bare.startswith(ch) and (len(bare) == 1 or not bare[1].isalpha()):
            found.append((ch, 0, "start"))
        if bare.endswith(ch) and (len(bare) == 1 or not bare[-2].isalpha()):
            found.append((ch, len(text) - 1, "end"))
    if not found:
        found = [(ch, text.rfind(ch), "fallback") for ch in choices if ch in text]
    if not found:
        return ""
    return max(found, key=lambda c: (_RANK[c[2]], c[1]))[0]


# -- multiple choice: the release's harness --------------------------------------------------------------
# The release's Video-MME list lacks two commas, so two pairs of prefixes are joined into one string each.
_VIDEOMME_PREFIXES = ("The best answer is", "The correct answer is", "The answer is", "The answer",
                      "The best option isThe correct option is", "Best answer:Best option:")  # fmt: skip
_LVB_PREFIXES = ("The best answer is", "The correct answer is", "The answer is", "The answer",
                 "The best option is", "The correct option is", "Best answer:", "Best option:")  # fmt: skip


def first_letter(response: str, prefixes: Sequence[str], letters: str) -> str | None:
    """Remove answer prefixes, then the first capital in `letters` (None when there is none; the
    originals' extra "over 10 words without a letter" test changes nothing and is left out)."""
    text = response.strip()
    for prefix in prefixes:
        text = text.replace(prefix, "")
    match = re.search(f"[{letters}]", text)
    return match[0] if match else None


def videomme_release_letter(response: str) -> str:
    """The release's Video-MME rule: first A-D after removing answer prefixes, else ""."""
    return first_letter(response, _VIDEOMME_PREFIXES, "ABCD") or ""


def longvideobench_letter(response: str, choices: Sequence[str], seed: str) -> tuple[str, bool]:
    """LongVideoBench's rule (both harnesses): first A-E after removing answer prefixes; when none is found
    the harness guesses a random option. The guess is seeded by `seed` (the sample id) so that reruns and
    data-parallel runs agree. Returns (letter, guessed)."""
    letter = first_letter(response, _LVB_PREFIXES, "ABCDE")
    if letter is None:
        return random.Random(seed).choice(list(choices)), True
    return letter, False


def mlvu_release_letter(response: str) -> str:
    """The release's MLVU rule (the prompt ends in "Best option: ("): the character before the first ")",
    else the whole stripped output."""
    text = response.strip()
    if ")" in text:
        at = text.index(")")
        return text[at - 1 : at]
    return text


_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
          "!")  # fmt: skip
_COMMA_NUMBER = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")


def lvbench_release_normalize(text: str) -> str:
    """The release's LVBench normalisation, applied to prediction and gold letter alike: "B. ..." -> "B";
    else VQA-style punctuation clean-up, lower case, and the first standalone a-e letter (upper-cased) if
    any, else the cleaned text."""
    match = re.match(r"^([A-E])\.\s*(.+)$", text.strip(), re.IGNORECASE)
    if match:
        return match[1].upper()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    cleaned = text
    for p in _PUNCT:
        if p + " " in text or " " + p in text or _COMMA_NUMBER.search(text):
            cleaned = cleaned.replace(p, "")
        else:
            cleaned = cleaned.replace(p, " ")
    cleaned = _PERIOD.sub("", cleaned, 32)  # the original passes re.UNICODE (32) as the count
    cleaned = cleaned.strip("'").strip('"').strip(")").strip("(").strip().lower()
    letter = re.search(r"\b([A-E])\b", cleaned, re.IGNORECASE)
    return letter[1].upper() if letter else cleaned


# -- free text -------------------------------------------------------------------------------------------
def normalize_text(text: str) -> str:
    """For exact-match answers: lower case, inner whitespace collapsed, outer punctuation and spaces off."""
    return " ".join(str(text).lower().split()).strip(string.punctuation + " ")


# -- temporal grounding: lmms-eval 0.7.3 (`charades_sta/utils.py`) ---------------------------------------
_KEYWORDS = ("starts", "ends", "happens in", "start time", "end time", "start", "end", "happen")
_CLOCK = r"\d{1,2}:\d{2}(?::\d{2})?"
_CLOCK_RANGE = re.compile(rf"\b({_CLOCK})\s*[–-]\s*({_CLOCK})\b")
_NUMBER_RANGE = re.compile(r"(\d+(?:\.\d+)?)\s*[–-]\s*(\d+(?:\.\d+)?)")
_NUMBER = re.compile(r"\b(\d+(?:\.\d+)?)\b")
_CLOCK_ONE = re.compile(rf"\b({_CLOCK})\b")
_LOOSE_RANGE = re.compile(r"(\d+(?:\.\d+)?)\s*s?\s*[–-]\s*(\d+(?:\.\d+)?)\s*s?")


def _clock_seconds(text: str) -> float:
    seconds = 0.0
    for part in text.split(":"):
        seconds = seconds * 60 + float(part)
    return seconds


def _pairs(values: list[float]) -> list[tuple[float, float]]:
    return [(values[i], values[i + 1]) for i in range(0, len(values) - 1, 2)]


def parse_span(response: str) -> tuple[float, float] | None:
    """Start and end seconds from free text, as lmms-eval 0.7.3 reads Charades-STA answers: in sentences
    that mention start/end/happen (else all), the first of: a clock range "0:12 - 0:20", a number range
    "12.5 - 20", clock times taken pairwise, each sentence's first number taken pairwise, a loose range
    "12s - 20s". "to" counts as a dash (even inside words, as in the original). None when nothing parses."""
    text = response.lower().replace("a specific example is : 20.8 - 30.0 seconds", "").replace("to", "-")
    sentences = re.split(r"[!?\n]", text)
    candidates = [s for s in sentences if any(k in s for k in _KEYWORDS)] or sentences
    spans: list[tuple[float, float]] = []
    for sentence in candidates:
        spans = [(_clock_seconds(a), _clock_seconds(b)) for a, b in _CLOCK_RANGE.findall(sentence)]
        if spans:
            break
    if not spans:
        for sentence in candidates:
            spans = [(float(a), float(b)) for a, b in _NUMBER_RANGE.findall(sentence)]
            if spans:
                break
    if not spans:
        spans = _pairs([_clock_seconds(t) for s in candidates for t in _CLOCK_ONE.findall(s)])
    if not spans:
        spans = _pairs([float(found[0]) for s in candidates if (found := _NUMBER.findall(s))])
    if not spans:
        for sentence in candidates:
            spans = [(float(a), float(b)) for a, b in _LOOSE_RANGE.findall(sentence)]
            if spans:
                break
    if not spans:
        return None
    start, end = spans[0]
    return (start, end) if end > start else (end, start)


def temporal_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over the span from the earliest start to the latest end (0 when that is empty)."""
    inter = min(a[1], b[1]) - max(a[0], b[0])
    span = max(a[1], b[1]) - min(a[0], b[0])
    return 0.0 if span <= 0 else max(inter, 0.0) / span


# -- aggregation -----------------------------------------------------------------------------------------
def _percent(part: float, whole: int) -> float:
    return round(100.0 * part / whole, 4) if whole else 0.0


def accuracy_table(records: Sequence[dict], keys: Sequence[str] = (), counted=lambda r: True) -> dict:
    """Accuracy (%) overall and per value of each category in `keys` (a record listing several values
    counts in each). `counted` picks the records in the denominator (all by default)."""

    def cell(rows):
        rows = [r for r in rows if counted(r)]
        correct = sum(bool(r["correct"]) for r in rows)
        return {"accuracy": _percent(correct, len(rows)), "correct": correct, "total": len(rows)}

    table = cell(records)
    categories = {}
    for key in keys:
        groups = defaultdict(list)
        for record in records:
            values = record["categories"].get(key)
            for value in values if isinstance(values, list) else [values]:
                if value is not None:
                    groups[str(value)].append(record)
        categories[key] = {value: cell(rows) for value, rows in sorted(groups.items())}
    if categories:
        table["categories"] = categories
    return table


def grounding_table(records: Sequence[dict], thresholds=(0.3, 0.5, 0.7)) -> dict:
    """mIoU and recall at each IoU threshold (%), plus how many answers had no parsable span."""
    ious = [r["iou"] for r in records]
    table = {"mIoU": _percent(sum(ious), len(ious))}
    for t in thresholds:
        table[f"R@{t}"] = _percent(sum(i >= t for i in ious), len(ious))
    table.update(total=len(ious), unparsed=sum(r["extracted"] is None for r in records))
    return table
