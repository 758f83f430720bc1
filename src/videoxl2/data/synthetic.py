"""Synthetic long videos with needles, and questions with exact answers, for training and testing.

A haystack of slowly drifting grey blobs (never a needle colour) carries "needle" events: a large coloured
shape shown for one 4-frame group. The vocabulary is small on purpose (6 colours x 4 shapes at 64x64) so a
tiny model can learn it on a CPU. Videos are written at `fps` (default 1) and needles start on group
boundaries, so sampling at that rate shows every frame and a needle's time is exactly the `Time {t}s:` text
of the group that shows it. Everything is deterministic from the seed.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..video.synthetic import write_synthetic_video

COLOURS = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 80, 235),
    "yellow": (240, 220, 40),
    "magenta": (225, 50, 225),
    "cyan": (40, 220, 230),
}
SHAPES = ("square", "circle", "triangle", "cross")
GROUP = 4  # frames per group: a needle fills exactly one
FAMILIES = ("what", "choice", "when", "count", "order")
# Multiple choice is answered by naming the shape, then judging each option against that name word by word,
# then the letter ("green square\n(A) red circle: colour no, shape no, so no\n(B) green square: colour yes,
# shape yes, so yes\n...\nAnswer: B"). A model this small names what it saw far more easily than it maps a
# seen shape to a letter, and copying the letter that follows a name it wrote itself is an induction copy it
# learns badly; copying each option by its letter (a one-token key in a fixed order) and comparing it with the
# name just written is learnt (the demo model card's "What it took", row `verdicts/`). Judged as a whole
# ("...: yes"), an option sharing one word with the name was often taken; one comparison per word, then their
# conjunction, is three one-step judgements instead of one two-word one.
CHOICE_SUFFIX = "Name the shape, compare colour and shape with each option, then give the letter."
LETTERS = "ABCD"


def choice_answer(options: list[str], answer: int) -> str:
    """The multiple-choice answer for `options[answer]`: its name, a line per option judging its colour, its
    shape and both against the name, then the letter."""
    colour, shape = options[answer].split()
    yes = lambda same: "yes" if same else "no"  # noqa: E731
    verdicts = []
    for letter, name in zip(LETTERS, options):
        own_colour, own_shape = name.split()
        same_colour, same_shape = own_colour == colour, own_shape == shape
        verdicts.append(f"({letter}) {name}: colour {yes(same_colour)}, shape {yes(same_shape)}, "
                        f"so {yes(same_colour and same_shape)}")  # fmt: skip
    return "\n".join([options[answer], *verdicts, f"Answer: {LETTERS[answer]}"])


@dataclass(frozen=True)
class Needle:
    colour: str
    shape: str
    start_frame: int
    num_frames: int = GROUP

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class VideoSpec:
    num_frames: int
    fps: float = 1.0
    seed: int = 0
    needles: tuple[Needle, ...] = ()
    size: tuple[int, int] = (64, 64)
    start: float = 0.0  # the time of frame 0: a clip cut from a longer video keeps that video's times

    def seconds(self, frame: int) -> float:
        return round(self.start + frame / self.fps, 1)

    def needle_at(self, frame: int) -> Needle | None:
        return next((n for n in self.needles if n.start_frame <= frame < n.start_frame + n.num_frames), None)


@lru_cache(maxsize=64)
def shape_mask(shape: str, height: int, width: int) -> np.ndarray:
    """Boolean mask of a shape filling ~95% of the frame: big enough that the shapes differ in which of the
    tiny model's 4x4 visual tokens they cover (at 60% they differed only inside boundary tokens, which the
    tiny model could not learn to tell apart)."""
    y, x = np.mgrid[0:height, 0:width]
    cy, cx, r = (height - 1) / 2, (width - 1) / 2, 0.47 * min(height, width)
    dy, dx = y - cy, x - cx
    if shape == "square":
        return (np.abs(dy) <= r) & (np.abs(dx) <= r)
    if shape == "circle":
        return dy**2 + dx**2 <= r**2
    if shape == "triangle":
        return (dy <= r) & (dy >= -r) & (np.abs(dx) <= (dy + r) / 2)
    if shape == "cross":
        return ((np.abs(dy) <= r / 3) & (np.abs(dx) <= r)) | ((np.abs(dx) <= r / 3) & (np.abs(dy) <= r))
    raise InputError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")


def haystack_frame(spec: VideoSpec, index: int) -> np.ndarray:
    """Grey background with two soft grey blobs drifting smoothly: varied, but colourless."""
    height, width = spec.size
    rng = np.random.default_rng(spec.seed)
    base, phase, speed = rng.uniform(70, 140), rng.uniform(0, 2 * np.pi, 4), rng.uniform(0.05, 0.2, 4)
    y, x = np.mgrid[0:height, 0:width]
    grey = np.full((height, width), base)
    for blob in range(2):
        cy = height * (0.5 + 0.35 * np.sin(phase[2 * blob] + speed[2 * blob] * index))
        cx = width * (0.5 + 0.35 * np.cos(phase[2 * blob + 1] + speed[2 * blob + 1] * index))
        grey += (40 if blob else -40) * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (0.05 * height * width))
    return np.repeat(np.clip(grey, 0, 255).astype(np.uint8)[..., None], 3, axis=2)


def render_frame(spec: VideoSpec, index: int) -> np.ndarray:
    frame = haystack_frame(spec, index)
    needle = spec.needle_at(index)
    if needle is not None:
        frame[shape_mask(needle.shape, *spec.size)] = COLOURS[needle.colour]
    return frame


def write_video(spec: VideoSpec, path) -> Path:
    return write_synthetic_video(
        path, spec.num_frames, spec.fps, spec.size, spec.seed, lambda i: render_frame(spec, i)
    )


def random_spec(
    rng: np.random.Generator,
    num_frames: int,
    fps: float = 1.0,
    max_needles: int = 3,
    repeat_colour: float = 0.0,
) -> VideoSpec:
    """A video with 1..max_needles needles in distinct groups (colour/shape drawn at random).

    `repeat_colour` is the chance that each later needle takes the first one's colour: drawn freely, two
    needles share a colour in about one video in six, too rare to learn counting from.
    """
    if not 0 <= repeat_colour <= 1:
        raise InputError(f"repeat_colour must be in [0, 1], got {repeat_colour}")
    groups = num_frames // GROUP
    if groups < 1:
        raise InputError(f"a synthetic video needs at least {GROUP} frames, got {num_frames}")
    count = int(rng.integers(1, min(max_needles, groups) + 1))
    starts = sorted(int(g) * GROUP for g in rng.choice(groups, size=count, replace=False))
    needles = [Needle(str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)), start) for start in starts]
    if repeat_colour:
        needles[1:] = [
            Needle(needles[0].colour, n.shape, n.start_frame) if rng.random() < repeat_colour else n
            for n in needles[1:]
        ]
    return VideoSpec(num_frames, fps, int(rng.integers(0, 2**31)), tuple(needles))


def needle_haystack_spec(
    num_frames: int, depth: float, needle: Needle | None = None, fps: float = 1.0, seed: int = 0
):
    """One needle at relative depth `depth` in [0, 1] of a haystack (V-NIAH), on a group boundary."""
    if not 0 <= depth <= 1:
        raise InputError(f"depth must be in [0, 1], got {depth}")
    groups = num_frames // GROUP
    if groups < 1:
        raise InputError(f"a haystack needs at least {GROUP} frames, got {num_frames}")
    start = min(int(round(depth * (groups - 1))), groups - 1) * GROUP
    needle = needle or Needle("red", "circle", 0)
    return VideoSpec(num_frames, fps, seed, (Needle(needle.colour, needle.shape, start),))


@dataclass
class Question:
    family: str
    question: str
    answer: str
    extra: dict = field(default_factory=dict)


def choice_question(answer: str, rng: np.random.Generator) -> Question:
    """The multiple-choice "first shape" question: `answer` and three other names, in a random order."""
    names = sorted({f"{c} {s}" for c in COLOURS for s in SHAPES} - {answer})
    options = [answer, *(str(name) for name in rng.choice(names, size=3, replace=False))]
    rng.shuffle(options)
    listing = "\n".join(f"({letter}) {name}" for letter, name in zip(LETTERS, options))
    question = f"What was the first shape shown in the video?\n{listing}\n{CHOICE_SUFFIX}"
    return Question("choice", question, choice_answer(options, options.index(answer)), {"options": options})


def questions(spec: VideoSpec, rng: np.random.Generator) -> list[Question]:
    """One question per applicable family, with exact answers derived from the spec."""
    first = spec.needles[0]
    out = [Question("what", "What was the first shape shown in the video?", first.name)]
    out.append(choice_question(first.name, rng))
    out.append(Question("when", f"When did the {first.name} appear?", f"{spec.seconds(first.start_frame)}s"))
    colour = first.colour
    count = sum(n.colour == colour for n in spec.needles)
    out.append(Question("count", f"How many times did a {colour} shape appear?", str(count)))
    distinct = [n for n in spec.needles if n.name != first.name]
    if distinct:
        later = distinct[0]
        a, b = (first, later) if rng.random() < 0.5 else (later, first)
        out.append(Question("order", f"Which came first, the {a.name} or the {b.name}?", first.name))
    return out


def later_needle_questions(spec: VideoSpec, rng: np.random.Generator) -> list[Question]:
    """ "When", "how many" and "which came first" about the later needles too: `questions` asks them about
    the first needle only, so a video with three needles trains one time read out of three. Same families,
    same wordings, exact answers (a name shown twice is timed at its first showing, as `questions` does)."""
    first, out = spec.needles[0], []
    distinct: list[Needle] = []  # the first showing of each name, in order
    for needle in spec.needles:
        if all(needle.name != seen.name for seen in distinct):
            distinct.append(needle)
    for needle in distinct[1:]:
        answer = f"{spec.seconds(needle.start_frame)}s"
        out.append(Question("when", f"When did the {needle.name} appear?", answer))
    for colour in dict.fromkeys(n.colour for n in spec.needles if n.colour != first.colour):
        count = sum(n.colour == colour for n in spec.needles)
        out.append(Question("count", f"How many times did a {colour} shape appear?", str(count)))
    for i, earlier in enumerate(distinct[1:], start=1):
        for later in distinct[i + 1 :]:
            a, b = (earlier, later) if rng.random() < 0.5 else (later, earlier)
            out.append(Question("order", f"Which came first, the {a.name} or the {b.name}?", earlier.name))
    return out


LIST_QUESTION = "Name every shape shown, in order."


def list_question(spec: VideoSpec) -> Question:
    """Every needle by name, in order: a shape read per needle, for the price of a few answer tokens."""
    return Question("list", LIST_QUESTION, ", ".join(n.name for n in spec.needles))


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def option_matching_records(count: int, seed: int, grid: float = 0.0) -> list[dict]:
    """Text-only multiple-choice drills: the video question without a video, answered as a video would be.

    The name that opens the answer cannot be known without the video; everything after it (each option
    judged against that name, then the letter) is text work that video questions teach slowly (every one
    costs a video) and these teach for the price of a few dozen tokens each. With `grid` (0-1), that share of
    drills lists two colours x two shapes: every option is one word away from two others, so judging by
    the colour (or the shape) alone fails, which random options rarely punish. Those draws come from a
    generator of their own: with `grid` 0 the drills are the same as without it.
    """
    if not 0.0 <= grid <= 1.0:
        raise InputError(f"grid must be in [0, 1], got {grid}")
    rng = np.random.default_rng(seed)
    grids = np.random.default_rng([seed, 2])
    names = sorted(f"{c} {s}" for c in COLOURS for s in SHAPES)
    records = []
    for index in range(count):
        options = [str(n) for n in rng.choice(names, size=4, replace=False)]
        answer = int(rng.integers(4))
        if grid and grids.random() < grid:
            colours = grids.choice(list(COLOURS), 2, replace=False)
            shapes = grids.choice(SHAPES, 2, replace=False)
            options = [f"{c} {s}" for c in colours for s in shapes]
            options = [options[i] for i in grids.permutation(4)]
        listing = "\n".join(f"({letter}) {name}" for letter, name in zip(LETTERS, options))
        question = f"What was the first shape shown in the video?\n{listing}\n{CHOICE_SUFFIX}"
        records.append(
            {
                "id": f"match_{seed}_{index:05d}",
                "family": "match",
                "conversations": [
                    {"from": "human", "value": question},
                    {"from": "gpt", "value": choice_answer(options, answer)},
                ],
            }
        )
    return records


def make_dataset(
    out_dir,
    num_videos: int,
    seed: int = 0,
    frames_range: tuple[int, int] = (16, 64),
    fps: float = 1.0,
    split: str = "train",
    multi_turn: bool = False,
    matching: int = 0,
    repeat_colour: float = 0.0,
    choice_repeats: int = 0,
    matching_grid: float = 0.0,
    list_shapes: bool = False,
    reading_first: float = 0.0,
    every_needle: bool = False,
    clip_start_max: int = 0,
    clip_start_share: float = 1.0,
    when_repeats: int = 0,
) -> Path:
    """Write `num_videos` videos and `<split>.json` (LLaVA format) + `data.yaml`.

    One entry per question, or with `multi_turn` one conversation per video asking every question in a random
    order: the video is encoded once for all its answers, which makes CPU training about 4x cheaper.
    `matching` adds that many text-only option-matching drills (`option_matching_records`, `matching_grid`
    of them with two colours x two shapes as options); `repeat_colour`
    goes to `random_spec`. `choice_repeats` (multi-turn only) asks the multiple-choice question that many
    more times per conversation, options drawn and ordered afresh each time: the letter changes while the
    video stays, so a habitual letter is wrong 3 times in 4 (it did not teach the demo model the look-up: its
    model card's "What it took", row `choice-repeats/`). Those draws come from a generator of their own, so
    the videos and the other questions are the same as without. `list_shapes` (multi-turn only) also asks
    for every shape in order (`list_question`), at a position drawn from that same generator: more shape
    reading per encoded video, the rest unchanged. `reading_first` (multi-turn only, 0-1) is the chance that a
    conversation opens on the two questions that read the first shape (open, then multiple choice, or the
    other way round), drawn from that generator too: the "when" and "order" questions and either reading
    answer name the shape, so in a random order only about a quarter of the open answers have to read it
    off the video; the rest can copy it from an earlier turn. `every_needle` (multi-turn only) adds the
    `later_needle_questions` at random positions (same generator): meant for training with
    `independent_turns`, where a turn sees none of the others and each extra question costs a few tokens.
    `clip_start_max` gives `clip_start_share` of the videos a `clip_start` of 1 to that many whole seconds
    (a generator of its own: the videos and questions are the same as without, the "when" answers moved by
    it): its time text no longer starts at 0, so the time must be read off it rather than counted (`eval
    synthetic` honours it). The others start at 0, as most videos a user asks about do. `when_repeats`
    (multi-turn only) follows each "when" turn with that many copies of itself: under `independent_turns`
    a copy adds that answer's loss once more for a few tokens, the cheapest way to weigh the family that
    lags (no draws: the rest is the same as without).
    """
    if num_videos < 0 or matching < 0 or num_videos + matching < 1:
        raise InputError(f"nothing to write: --videos {num_videos}, --matching {matching}")
    if choice_repeats < 0 or (choice_repeats and not multi_turn):
        raise InputError(f"--choice-repeats needs --multi-turn and a count >= 0, got {choice_repeats}")
    if list_shapes and not multi_turn:
        raise InputError("--list-shapes needs --multi-turn")
    if every_needle and not multi_turn:
        raise InputError("--every-needle needs --multi-turn")
    if when_repeats < 0 or (when_repeats and not multi_turn):
        raise InputError(f"--when-repeats needs --multi-turn and a count >= 0, got {when_repeats}")
    if not 0.0 <= reading_first <= 1.0 or (reading_first and not multi_turn):
        raise InputError(f"--reading-first needs --multi-turn and a chance in [0, 1], got {reading_first}")
    if not isinstance(clip_start_max, int) or clip_start_max < 0:
        raise InputError(f"--clip-start-max must be whole seconds >= 0, got {clip_start_max!r}")
    if not 0.0 <= clip_start_share <= 1.0:
        raise InputError(f"--clip-start-share must be a share in [0, 1], got {clip_start_share}")
    low, high = frames_range
    if not GROUP <= low <= high:
        raise InputError(f"frames range must satisfy {GROUP} <= min <= max, got {low}..{high}")
    out = Path(out_dir)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    records = []
    for index in range(num_videos):
        frames = int(rng.integers(low // GROUP, high // GROUP + 1)) * GROUP
        spec = random_spec(rng, frames, fps, repeat_colour=repeat_colour)
        clip_draw = np.random.default_rng([seed, index, 1])
        if clip_start_max and clip_draw.random() < clip_start_share:
            spec = replace(spec, start=float(clip_draw.integers(1, clip_start_max + 1)))
        clip = {"clip_start": spec.start} if spec.start else {}
        name = f"videos/{split}_{seed}_{index:05d}.mp4"
        write_video(spec, out / name)
        asked = questions(spec, rng)
        if multi_turn:
            ordered = [asked[i] for i in rng.permutation(len(asked))]
            extra = np.random.default_rng([seed, index])
            if reading_first and extra.random() < reading_first:
                reading = [q for q in ordered if q.family in ("what", "choice")]
                if extra.random() < 0.5:
                    reading.reverse()
                ordered = reading + [q for q in ordered if q.family not in ("what", "choice")]
            for _ in range(choice_repeats):
                at = int(extra.integers(len(ordered) + 1))
                ordered.insert(at, choice_question(spec.needles[0].name, extra))
            if list_shapes:
                ordered.insert(int(extra.integers(len(ordered) + 1)), list_question(spec))
            if every_needle:
                for question in later_needle_questions(spec, extra):
                    ordered.insert(int(extra.integers(len(ordered) + 1)), question)
            ordered = [r for q in ordered for r in [q] * (1 + when_repeats * (q.family == "when"))]
            turns = []
            for position, q in enumerate(ordered):
                prefix = "<image>\n" if position == 0 else ""
                turns += [{"from": "human", "value": prefix + q.question}, {"from": "gpt", "value": q.answer}]
            records.append(
                {
                    "id": f"{split}_{seed}_{index:05d}",
                    "video": name,
                    "family": "multi",
                    **clip,
                    "conversations": turns,
                    "needles": [asdict(n) for n in spec.needles],
                }
            )
            continue
        for number, q in enumerate(asked):
            records.append(
                {
                    "id": f"{split}_{seed}_{index:05d}_{number}",
                    "video": name,
                    "family": q.family,
                    **clip,
                    "conversations": [
                        {"from": "human", "value": f"<image>\n{q.question}"},
                        {"from": "gpt", "value": q.answer},
                    ],
                    "needles": [asdict(n) for n in spec.needles],
                    **q.extra,
                }
            )
    records += option_matching_records(matching, seed, grid=matching_grid)
    _write_atomic(out / f"{split}.json", json.dumps(records, indent=1))
    _write_atomic(out / "data.yaml", f"datasets:\n  - json_path: {split}.json\n    sampling_strategy: all\n")
    return out / f"{split}.json"
