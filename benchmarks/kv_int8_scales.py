"""Int8 quantization error on the demo model's own video KV: a scale per token and KV head (what the engine
stores) against a scale per channel and KV head over blocks of 64 tokens (KIVI's choice for keys), for keys,
values and q.k logits (queries: 64 of the layer's own keys), over the chunked pre-fill of the first videos of
a held-out set (`videoxl2 make-data ... --split test`). fp32 scales, to compare the two axes alone.

    python benchmarks/kv_int8_scales.py work/heldout --videos 6
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def per_token(x: torch.Tensor) -> torch.Tensor:
    scale = x.abs().amax(-1, keepdim=True) / 127
    return (x / scale.clamp_min(1e-30)).round().clamp(-127, 127) * scale


def per_channel(x: torch.Tensor, block: int = 64) -> torch.Tensor:
    out = torch.empty_like(x)
    for a in range(0, x.shape[1], block):
        chunk = x[:, a : a + block]
        scale = chunk.abs().amax(1, keepdim=True) / 127
        out[:, a : a + block] = (chunk / scale.clamp_min(1e-30)).round().clamp(-127, 127) * scale
    return out


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@torch.inference_mode()
def main(argv=None) -> None:
    from videoxl2 import load_model, load_tokenizer
    from videoxl2.defaults import DEFAULT_MODEL
    from videoxl2.engine.session import VideoSession
    from videoxl2.engine.settings import EngineSettings

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_root", type=Path)
    parser.add_argument("--videos", type=int, default=6)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model, tokenizer = load_model(DEFAULT_MODEL), load_tokenizer(DEFAULT_MODEL)
    samples = json.loads((args.data_root / "test.json").read_text())
    videos = sorted({s["video"] for s in samples})[: args.videos]
    found: dict[str, list[float]] = {}
    for video in videos:
        session = VideoSession.from_path(
            model, tokenizer, args.data_root / video, settings=EngineSettings(mode="chunked"), progress=False
        )
        memory = session.prefill()
        for keys, values in zip(memory.keys, memory.values):
            keys, values = keys.float(), values.float()
            queries = keys[:, torch.randperm(keys.shape[1])[:64]]
            logits = queries @ keys.transpose(1, 2)
            for name, quantize in (("per token", per_token), ("per channel", per_channel)):
                found.setdefault(f"keys {name}", []).append(relative(quantize(keys), keys))
                found.setdefault(f"values {name}", []).append(relative(quantize(values), values))
                q_k = queries @ quantize(keys).transpose(1, 2)
                found.setdefault(f"q.k {name}", []).append(relative(q_k, logits))
    for name, values in found.items():
        print(f"{name:20s} mean {sum(values) / len(values):.5f} max {max(values):.5f}")


if __name__ == "__main__":
    main()
