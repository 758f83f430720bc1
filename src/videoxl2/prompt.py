"""Prompt text and token layout.

The release's prompt is ChatML (`qwen_1_5` template) with one `<image>` marker in the first user turn. The
marker is replaced by the whole video: per 4-frame group the text `Time {t}s:` and then the group's visual
embeddings (placeholder id `video_token_id` in `input_ids`). `TokenLayout` records where every piece sits,
because the chunked pre-fill and the bi-level cache work on those spans.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .errors import InputError

SYSTEM_PROMPT = "You are a helpful assistant."
IMAGE_MARKER = "<image>"

_HMS = re.compile(r"(?<![\d:])(\d{1,2}):(\d{2}):(\d{2})(?![\d:])")
_MS = re.compile(r"(?<![\d:])(\d{1,3}):(\d{2})(?![\d:])")
_RELEASE_MMSS = re.compile(r"\d{2}:\d{2}")
TIME_RULES = ("ours", "release")


def rewrite_times(text: str, rule: str = "ours") -> str:
    """Write clock times as seconds, the unit of the video's time text.

    "ours" (chat, serve, training, lmms-eval protocol): a whole `h:mm:ss` / `hh:mm:ss` and a whole `m:ss`
    / `mm:ss` / `mmm:ss` not glued to other digits or colons ("1:05" -> "65 seconds", "01:02:03" ->
    "3723 seconds", "123:45" -> "7425 seconds"; "3:2:1:0" stays). "release": `rewrite_times_release`.
    """
    if rule == "release":
        return rewrite_times_release(text)
    if rule != "ours":
        raise InputError(f"time rule must be one of {', '.join(TIME_RULES)}, got {rule!r}")
    text = _HMS.sub(lambda m: f"{int(m[1]) * 3600 + int(m[2]) * 60 + int(m[3])} seconds", text)
    return _MS.sub(lambda m: f"{int(m[1]) * 60 + int(m[2])} seconds", text)


def rewrite_times_release(text: str) -> str:
    """The release evaluation's rewrite, quirks included (its lmms-eval wrapper, `convert_time_in_prompt`).

    It lists every two-digit `dd:dd` in the text, left to right without overlaps, then replaces each listed
    string everywhere in the text, in that order, by "{60 * dd + dd} seconds". Whatever else looks like a
    time stays: "1:05" is untouched, "01:02:03" becomes "62 seconds:03", "123:45" becomes "11425 seconds".
    """
    for found in _RELEASE_MMSS.findall(text):
        minutes, seconds = found.split(":")
        text = text.replace(found, f"{int(minutes) * 60 + int(seconds)} seconds")
    return text


class RewrittenText(str):
    """Question text whose clock times are already written as the model should read them: `build_prompt`
    keeps it as it is instead of applying `rewrite_times` again."""


def prepare_question(text: str, rule: str = "ours") -> RewrittenText:
    """`text` with its times rewritten by `rule`, marked so that the prompt keeps it verbatim."""
    return RewrittenText(rewrite_times(text, rule))


def _with_times(text: str) -> str:
    return str(text) if isinstance(text, RewrittenText) else rewrite_times(text)


def time_text(seconds: float) -> str:
    """The text before each group: `Time 12.5s:` (seconds rounded to 0.1, Python float repr)."""
    return f"Time {round(float(seconds), 1)}s:"


def check_clip_start(value, where: str) -> float:
    """A clip's `clip_start`: the seconds its time text starts at, so a clip cut from a longer video keeps
    its source's times (training records, evaluation records and `VideoSession.from_path` share it)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise InputError(f"{where}: 'clip_start' must be a finite number of seconds >= 0, got {value!r}")
    return float(value)


def normalize_history(history: Sequence | None) -> list[tuple[str, str]]:
    """Accept [(question, answer), ...] or OpenAI-style [{"role": ..., "content": ...}, ...]."""
    if not history:
        return []
    if isinstance(history[0], dict):
        turns, pending = [], None
        for message in history:
            role, content = message.get("role"), message.get("content")
            if role == "user":
                pending = content
            elif role == "assistant" and pending is not None:
                turns.append((pending, content))
                pending = None
            elif role != "system":
                raise InputError(f"chat_history: unexpected message {message!r}")
        return turns
    try:
        return [(str(q), str(a)) for q, a in history]
    except (TypeError, ValueError) as err:
        raise InputError(
            "chat_history must be a list of (question, answer) pairs or role/content dicts"
        ) from err


def build_prompt(question: str, history: Sequence | None = None, system: str = SYSTEM_PROMPT) -> str:
    """ChatML prompt with the `<image>` marker at the start of the first user turn."""
    if not isinstance(question, str) or not question.strip():
        raise InputError("question is empty")
    turns = [*normalize_history(history), (question, None)]
    parts = [f"<|im_start|>system\n{system}<|im_end|>\n"]
    for index, (user, answer) in enumerate(turns):
        if index == 0:
            # One marker leads the first turn; a marker the caller wrote is moved there with its newline only,
            # so deliberate blank lines (the release's MLVU prompt starts with one) survive.
            verbatim = isinstance(user, RewrittenText)
            if IMAGE_MARKER in user:
                user = user.replace(IMAGE_MARKER + "\n", "", 1) if IMAGE_MARKER + "\n" in user else user
                user = user.replace(IMAGE_MARKER, "")
            user = f"{IMAGE_MARKER}\n{user if verbatim else rewrite_times(user)}"
        else:
            user = _with_times(user)
        parts.append(f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")
        if answer is not None:
            parts.append(f"{answer}<|im_end|>\n")
    return "".join(parts)


@dataclass(frozen=True)
class GroupSpan:
    """Token positions of one 4-frame group: [time_start, visual_start) is its time text,
    [visual_start, end) its visual tokens."""

    time_start: int
    visual_start: int
    end: int
    seconds: float


@dataclass
class TokenLayout:
    """Where each piece of a prompt sits: prefix [0, video_start), groups, suffix [video_end, length)."""

    input_ids: torch.Tensor
    groups: list[GroupSpan]
    video_start: int
    video_end: int
    video_token_id: int
    suffix_ids: torch.Tensor = field(repr=False, default=None)

    @property
    def length(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    def visual_mask(self) -> torch.Tensor:
        return self.input_ids == self.video_token_id

    def time_mask(self) -> torch.Tensor:
        mask = torch.zeros(self.length, dtype=torch.bool)
        for g in self.groups:
            mask[g.time_start : g.visual_start] = True
        return mask


def video_prefix_text() -> str:
    """The prompt text before the video, the same for every question: a session pre-fills it once."""
    return build_prompt("?").split(IMAGE_MARKER)[0]


def video_layout(tokenizer, config, group_seconds: Sequence[float]) -> TokenLayout:
    """The layout a video session pre-fills (prefix text, then each group's time text and visual
    placeholders), before any question; `config` is the model's (`tokens_per_group`, `video_token_id`)."""
    return build_layout(
        tokenizer,
        video_prefix_text() + IMAGE_MARKER,
        group_seconds,
        config.tokens_per_group,
        config.video_token_id,
    )


def build_layout(
    tokenizer,
    prompt: str,
    group_seconds: Sequence[float],
    tokens_per_group: int,
    video_token_id: int,
    max_length: int | None = None,
) -> TokenLayout:
    """Tokenize `prompt` (one `<image>` marker) with the video's time text and visual placeholders."""
    if prompt.count(IMAGE_MARKER) != 1:
        raise InputError(
            f"prompt must hold exactly one {IMAGE_MARKER} marker, found {prompt.count(IMAGE_MARKER)}"
        )
    if not group_seconds:
        raise InputError("the video has no frame groups")
    before, after = prompt.split(IMAGE_MARKER)

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    ids = encode(before)
    video_start = len(ids)
    groups = []
    for seconds in group_seconds:
        time_start = len(ids)
        ids += encode(time_text(seconds))
        visual_start = len(ids)
        ids += [video_token_id] * tokens_per_group
        groups.append(GroupSpan(time_start, visual_start, len(ids), round(float(seconds), 1)))
    video_end = len(ids)
    suffix = encode(after)
    ids += suffix
    if max_length is not None and len(ids) > max_length:
        raise InputError(
            f"prompt is {len(ids)} tokens ({len(groups)} frame groups), "
            f"over the model's context of {max_length}: "
            "lower max_num_frames or shorten the question"
        )
    return TokenLayout(
        input_ids=torch.tensor(ids, dtype=torch.long),
        groups=groups,
        video_start=video_start,
        video_end=video_end,
        video_token_id=video_token_id,
        suffix_ids=torch.tensor(suffix, dtype=torch.long),
    )
