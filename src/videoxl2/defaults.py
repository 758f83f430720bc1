"""Where the bundled demo model lives: the default `--model` of every command.

It is a small Video-XL-2-architecture model trained on our synthetic needle videos (see its README.md model
card); it answers questions about those videos only. Real videos need the released weights.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL = Path(__file__).parent / "models" / "demo"
