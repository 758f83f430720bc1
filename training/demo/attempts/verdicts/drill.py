"""Text-only check of "verdict" multiple-choice answers: each option restated with yes/no, then the letter.

The letter after a name the model wrote itself is an induction copy this LLM learns badly (see
`../lookup-first/`). Here the answer walks the options in order, "(A) red circle: no" ... "Answer: B": each
line copies an option by its letter (a one-token key, fixed order), judges it against the needle, and the
letter is read from the "yes" line. `--form verdicts` names the needle after the listing, so the option
lines cannot be judged while they are read; `--form name-verdicts` asks the video question with no video
and the answer opens with the name (teacher-forced in the test, as if read off the video), then the
verdicts: the form the demo model is trained on. `--form name-letter` is the older "green square (A)".
Prints, every 200 steps, the loss and the share of 200 new drills answered exactly (greedy) and with the
right final letter.

    python drill.py --form name-verdicts --steps 1200
"""

import argparse
import random
import time

import numpy as np
import torch

from videoxl2.data.synthetic import COLOURS, SHAPES, choice_answer
from videoxl2.tiny import build_tiny_model
from videoxl2.tokenizer import build_tiny_tokenizer
from videoxl2.train.data import encode_sample

TEXT = dict(
    hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2
)


def verdicts(options: list[str], answer: int) -> str:
    """The project's multiple-choice answer without its first line (the name)."""
    return choice_answer(options, answer).split("\n", 1)[1]


def drills(count: int, seed: int, form: str) -> list[tuple[str, str, str]]:
    """(question, answer, forced): `forced` starts the answer in the test (the name a video would give)."""
    rng = np.random.default_rng(seed)
    names = sorted(f"{c} {s}" for c in COLOURS for s in SHAPES)
    out = []
    for _ in range(count):
        options = [str(n) for n in rng.choice(names, size=4, replace=False)]
        answer = int(rng.integers(4))
        listing = "\n".join(f"({letter}) {name}" for letter, name in zip("ABCD", options))
        question = f"What was the first shape shown in the video?\n{listing}"
        if form == "name-verdicts":  # the name only in the answer, as a video question has it
            out.append((question, choice_answer(options, answer), options[answer]))
            continue
        question += f"\nIt was a {options[answer]}."
        reply = verdicts(options, answer) if form == "verdicts" else f"{options[answer]} ({'ABCD'[answer]})"
        out.append((question, reply, ""))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--form", choices=("verdicts", "name-verdicts", "name-letter"), default="verdicts")
    parser.add_argument("--steps", type=int, default=1200)
    args = parser.parse_args()
    torch.manual_seed(0)
    random.seed(0)
    tokenizer = build_tiny_tokenizer()
    model, _ = build_tiny_model(0, tokenizer, init_std=None, text=TEXT)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def encode(question: str, answer: str):
        ids, labels, _ = encode_sample(tokenizer, [(question, answer)], None, model.config)
        start = min(i for i, label in enumerate(labels) if label != -100)
        return ids, [1.0 if label != -100 else 0.0 for label in labels], start

    train = [encode(q, a) for q, a, _ in drills(20_000, 1, args.form)]
    test = [(encode(q, a), a, forced) for q, a, forced in drills(200, 2, args.form)]
    optimizer = torch.optim.AdamW(model.language_model.parameters(), lr=1e-3, weight_decay=0.01)

    def accuracy() -> tuple[float, float]:
        model.eval()
        exact = letter = 0
        with torch.no_grad():
            for (ids, _, start), answer, forced in test:
                out = list(ids[:start]) + tokenizer(forced)["input_ids"]
                for _ in range(80):
                    token = int(model(input_ids=torch.tensor([out])).logits[0, -1].argmax())
                    if token == end:
                        break
                    out.append(token)
                text = tokenizer.decode(out[start:]).strip()
                exact += text == answer
                letter += text[-1:] == answer[-1] if "verdicts" in args.form else text[-2:-1] == answer[-2]
        model.train()
        return exact / len(test), letter / len(test)

    model.train()
    start = time.time()
    for step in range(1, args.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = 1e-3 * min(1.0, step / 60)
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
            exact, letter = accuracy()
            print(f"step {step}  loss {loss.item():.3f}  exact {exact:.3f}  letter {letter:.3f}  "
                  f"{time.time() - start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
