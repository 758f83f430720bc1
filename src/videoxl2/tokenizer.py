"""A small byte-level BPE tokenizer with Qwen's ChatML special tokens, for tiny and demo models.

The released model uses Qwen2.5's tokenizer from its checkpoint folder. Tiny models (tests, benchmarks,
the bundled demo model) need one that is built here, offline, in milliseconds, and that round-trips any
text (byte level), so the same prompt code runs unchanged on both.

It splits text into words and digit runs of up to three before BPE (Qwen2 splits single digits; GPT-4's
tokenizer splits runs of three): a number is then the same tokens wherever it appears ("Time 56.0s:" in the
prompt, "56.0s" in an answer), so a small model answers "when" by copying tokens, and every whole second up
to 199 is one token (the corpus lists them), so that copy is one token, not a digit sequence whose length
varies. The merges go to words, so a colour or shape name is one token, not three.
"""

from __future__ import annotations

from collections.abc import Iterable

from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_pad|>"]

_BASE_CORPUS = [
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
    "<|im_start|>user\n",
    "<|im_start|>assistant\n",
    *[f"Time {t / 10}s:" for t in range(0, 2000, 7)],
    "What is shown in the video? Which colour, shape, digit or object appears, when and how many times?",
    "Answer with the option's letter from the given choices directly. Best option: (A) (B) (C) (D) (E)",
    "The answer is red green blue yellow cyan magenta white black orange purple square circle triangle.",
    "first second third before after seconds minutes start end from to 0 1 2 3 4 5 6 7 8 9 .",
    "What was the first shape shown in the video? When did the red square appear? How many times did a",
    "green circle, blue triangle, yellow cross, magenta square, cyan circle? Which came first, the or the",
    "Answer with the shape, then its option's letter. The first shape shown was a Which option is it?",
    "Name the shape, compare colour and shape with each option, then give the letter.",
    "colour yes, shape no, so no colour no, shape yes, so no colour yes, shape yes, so yes Answer:",
    # Whole seconds: every number up to 199 merged into one token (times and counts of the demo's videos).
    " ".join(str(n) for n in range(200)) * 3,
]
# Qwen2's pre-tokenizer pattern (letters with one leading non-letter, punctuation runs, spaces) with digit
# runs of up to three instead of single digits.
_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def build_tiny_tokenizer(extra_corpus: Iterable[str] = (), vocab_size: int = 768) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on a fixed built-in corpus (+ `extra_corpus`); deterministic."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator([*(_BASE_CORPUS * 4), *extra_corpus], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|vision_pad|>"],
        model_max_length=32768,
    )
