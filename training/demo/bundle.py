"""Turn a training output folder into the bundled demo model: weights, tokenizer and a config whose engine
defaults suit short synthetic videos. Usage: python bundle.py TRAINED_DIR OUT_DIR"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

KEEP = ("model.safetensors", "tokenizer.json", "tokenizer_config.json")
# Selection units of 2 groups (8 s at 1 fps) and 4 relevant units kept dense: on the demo's 96-frame video
# that is 6 of 12 units with the first and last, so bi-level decoding has a real choice to make. Keys keep
# their pre-fill positions: the model never saw contiguous re-rotated ones, and with them it reads "when" a
# group early (34 of 43 held-out "when" questions right instead of 39; dense 42).
ENGINE = {"unit_size": 2, "topk": 4, "rerotate": False}
# The engine's prompt limit (`max_context_tokens`; the LLM's own `max_position_embeddings` belongs to its
# RoPE scaling and stays as trained): room for V-NIAH's 4,096-frame haystacks.
CONTEXT = 32768


def bundle(trained: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in KEEP:
        shutil.copyfile(trained / name, out / name)
    config = json.loads((trained / "config.json").read_text())
    config.update(ENGINE)
    config["max_context_tokens"] = CONTEXT
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python bundle.py TRAINED_DIR OUT_DIR")
    bundle(Path(sys.argv[1]), Path(sys.argv[2]))
