"""Streaming: memory beyond the KV store stays flat as the video grows (frames never all in memory)."""

from __future__ import annotations

import json
import subprocess
import sys

WORKER = r"""
import json, resource, sys
import numpy as np, torch
torch.set_num_threads(1)
from videoxl2.engine.session import VideoSession
from videoxl2.engine.settings import EngineSettings
from videoxl2.tiny import build_tiny_model

frames = int(sys.argv[1])
model, tokenizer = build_tiny_model(vision=dict(image_size=126, patch_size=14))
rng = np.random.default_rng(0)

def run(count):
    def batches(size):  # frames are made on demand, like a decoder streaming a file
        for start in range(0, count, size):
            yield rng.integers(0, 255, (min(size, count - start), 96, 96, 3), dtype=np.uint8)

    settings = EngineSettings(mode="chunked", block_size=4, prev_blocks=3)
    times = [i * 0.25 for i in range(count)]
    session = VideoSession(model, tokenizer, batches, times, settings, progress=False)
    return session.prefill()

run(64)  # warm up allocator and kernels
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
memory = run(frames)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(dict(base=base, peak=peak, kv=memory.dense_bytes() + memory.sparse_bytes())))
"""


def measure(frames: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", WORKER, str(frames)], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_working_memory_flat_at_4x_frames():
    small, large = measure(256), measure(1024)
    # Peak resident memory minus what the KV store legitimately holds. Holding all frames of the large run
    # as float pixels alone would add ~195 MB to a ~0.5 GB process and fail this.
    ratio = (large["peak"] - large["kv"]) / (small["peak"] - small["kv"])
    assert ratio < 1.3, f"memory outside the KV store grew {ratio:.2f}x for 4x frames: {small} -> {large}"
    assert large["kv"] > 3.5 * small["kv"]  # the store itself does grow with the video
