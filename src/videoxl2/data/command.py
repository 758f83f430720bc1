"""`videoxl2 make-data`: write a synthetic needle dataset (videos + LLaVA JSON + data YAML)."""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("out", help="output folder")
    parser.add_argument("--videos", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frames-min", type=int, default=16)
    parser.add_argument("--frames-max", type=int, default=64)
    parser.add_argument("--fps", type=float, default=1.0)
    parser.add_argument("--split", default="train")
    parser.add_argument(
        "--multi-turn", action="store_true", help="one conversation per video asking all its questions"
    )
    parser.add_argument(
        "--matching", type=int, default=0, help="add this many text-only option-matching drills"
    )
    parser.add_argument(
        "--matching-grid",
        type=float,
        default=0.0,
        help="share (0-1) of the drills whose options are two colours x two shapes (near misses)",
    )
    parser.add_argument(
        "--repeat-colour",
        type=float,
        default=0.0,
        help="chance (0-1) that each later needle repeats the first one's colour: more counting practice",
    )
    parser.add_argument(
        "--choice-repeats",
        type=int,
        default=0,
        help="with --multi-turn: ask the multiple-choice question this many more times, options reshuffled",
    )
    parser.add_argument(
        "--list-shapes",
        action="store_true",
        help="with --multi-turn: also ask for every shape shown, in order (more shape reading per video)",
    )
    parser.add_argument(
        "--reading-first",
        type=float,
        default=0.0,
        help="with --multi-turn: chance (0-1) that a conversation opens on the two shape-reading questions",
    )
    parser.add_argument(
        "--every-needle",
        action="store_true",
        help="with --multi-turn: also ask when/how many/which first about the later needles "
        "(for training with independent_turns)",
    )
    parser.add_argument(
        "--clip-start-max",
        type=int,
        default=0,
        help="give videos a clip_start of 1 to this many seconds: its time text and 'when' answers "
        "start there, so times must be read, not counted (a test split measures that reading)",
    )
    parser.add_argument(
        "--clip-start-share",
        type=float,
        default=1.0,
        help="with --clip-start-max: the share of videos (0-1) given a clip_start; the rest start at 0",
    )
    parser.add_argument(
        "--when-repeats",
        type=int,
        default=0,
        help="with --multi-turn: follow each 'when' turn with this many copies (more of its loss)",
    )


def run(args) -> int:
    from .synthetic import make_dataset

    path = make_dataset(
        args.out,
        args.videos,
        args.seed,
        (args.frames_min, args.frames_max),
        args.fps,
        args.split,
        args.multi_turn,
        args.matching,
        args.repeat_colour,
        args.choice_repeats,
        args.matching_grid,
        args.list_shapes,
        args.reading_first,
        args.every_needle,
        args.clip_start_max,
        args.clip_start_share,
        args.when_repeats,
    )
    print(f"wrote {args.videos} videos, {args.matching} matching drills and {path}")
    return 0


COMMANDS = {"make-data": ("write a synthetic needle-in-a-haystack dataset", add_arguments, run)}
