"""Text-only check: can the demo's LLM learn the multiple-choice letter when the name is only in its answer?

A fresh LLM of the demo model's size and tokenizer trains on drills that ask the video question with no
video, options listed as "green square (A)" lines, answered with the matching line. The name in the answer
cannot be predicted (teacher-forced), so the letter after it is a pure look-up of a name the model wrote
itself: the case a video question poses. Prints, every 200 steps, the loss and the share of 200 new drills
whose letter (argmax over A-D after the teacher-forced name) is right.

    python drill.py --names all --loss letter --steps 1600
"""

import argparse
import math
import random
import time

import numpy as np
import torch

from videoxl2.data.synthetic import COLOURS, SHAPES
from videoxl2.tiny import build_tiny_model
from videoxl2.tokenizer import build_tiny_tokenizer
from videoxl2.train.data import encode_sample

TEXT = dict(
    hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2
)


def drills(count: int, seed: int, distinct_shapes: bool) -> list[tuple[str, str, str]]:
    """(question, answer, letter) triples; options are 4 of the 24 names, or 4 different shapes."""
    rng = np.random.default_rng(seed)
    names = sorted(f"{c} {s}" for c in COLOURS for s in SHAPES)
    out = []
    for _ in range(count):
        if distinct_shapes:
            options = [f"{rng.choice(list(COLOURS))} {shape}" for shape in rng.permutation(SHAPES)]
        else:
            options = [str(n) for n in rng.choice(names, size=4, replace=False)]
        answer = int(rng.integers(4))
        listing = "\n".join(f"{name} ({letter})" for letter, name in zip("ABCD", options))
        question = f"What was the first shape shown in the video?\n{listing}\nAnswer with the matching line."
        out.append((question, f"{options[answer]} ({'ABCD'[answer]})", "ABCD"[answer]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--names", choices=("all", "distinct-shapes"), default="all")
    parser.add_argument(
        "--loss",
        choices=("letter", "answer"),
        default="answer",
        help="letter: the letter token only; answer: every answer token, as training does",
    )
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--schedule", choices=("constant", "cosine"), default="constant")
    parser.add_argument("--hidden", type=int, default=TEXT["hidden_size"], help="the demo's LLM has 128")
    parser.add_argument("--layers", type=int, default=TEXT["num_hidden_layers"], help="the demo's LLM has 4")
    args = parser.parse_args()
    torch.manual_seed(0)
    random.seed(0)
    tokenizer = build_tiny_tokenizer()
    model, _ = build_tiny_model(
        0,
        tokenizer,
        init_std=None,
        text={
            **TEXT,
            "num_hidden_layers": args.layers,
            "hidden_size": args.hidden,
            "intermediate_size": 3 * args.hidden,
        },
    )
    letters = tokenizer.convert_tokens_to_ids(list("ABCD"))

    def encode(question: str, answer: str) -> tuple[list[int], list[float], int]:
        ids, labels, _ = encode_sample(tokenizer, [(question, answer)], None, model.config)
        at = max(i for i, (token, label) in enumerate(zip(ids, labels)) if label != -100 and token in letters)
        weights = (
            [1.0 if label != -100 else 0.0 for label in labels] if args.loss == "answer" else [0.0] * len(ids)
        )
        weights[at] = 1.0
        return ids, weights, at

    distinct = args.names == "distinct-shapes"
    train = [encode(q, a) for q, a, _ in drills(20_000, 1, distinct)]
    test = [(encode(q, a), letter) for q, a, letter in drills(200, 2, distinct)]
    optimizer = torch.optim.AdamW(model.language_model.parameters(), lr=1e-3, weight_decay=0.01)

    def letter_accuracy() -> float:
        model.eval()
        with torch.no_grad():
            right = sum(
                "ABCD"[int(model(input_ids=torch.tensor([ids[:at]])).logits[0, -1, letters].argmax())]
                == letter
                for (ids, _, at), letter in test
            )
        model.train()
        return right / len(test)

    model.train()
    start = time.time()
    for step in range(1, args.steps + 1):
        for group in optimizer.param_groups:
            decay = 0.5 * (1 + math.cos(math.pi * step / args.steps)) if args.schedule == "cosine" else 1.0
            group["lr"] = 1e-3 * min(1.0, step / 60) * decay
        batch = random.sample(train, 32)
        width = max(len(ids) for ids, _, _ in batch)
        ids = torch.tensor([b[0] + [0] * (width - len(b[0])) for b in batch])
        mask = torch.tensor([[1] * len(b[0]) + [0] * (width - len(b[0])) for b in batch])
        weights = torch.tensor([b[1] + [0.0] * (width - len(b[1])) for b in batch])[:, 1:]
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        loss = (losses * weights).sum() / weights.sum()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 200 == 0:
            accuracy, seconds = letter_accuracy(), time.time() - start
            print(f"step {step}  loss {loss.item():.3f}  letter {accuracy:.3f}  {seconds:.0f}s", flush=True)


if __name__ == "__main__":
    main()
