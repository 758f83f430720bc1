"""`benchmarks/gpu_check.py --tiny` runs on the CPU (so the GPU check is ready the day a device is lent) and
writes every field the GPU run will."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_tiny_runs_on_cpu(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = list(tmp_path.glob("gpu_check-*-tiny.json"))
    assert len(files) == 1, files
    result = json.loads(files[0].read_text())

    assert result["errors"] == {}
    assert result["shape"] == "tiny" and result["dtype"] == "float32"
    env_info = result["env"]
    assert env_info["device_type"] == "cpu" and env_info["device"] and env_info["torch"]

    sessions = result["sessions"]
    assert set(sessions) == {"dense", "chunked", "bilevel"}
    for mode, row in sessions.items():
        assert row["prefill_s"] > 0 and row["tokens"] > 0, (mode, row)
        assert row["question"]["new_tokens"] >= 1
        assert row["question"]["ms_per_token"] > 0
        assert row["peak_bytes"] > 0
        estimate = row["estimate"]
        assert estimate["video_kv"] > 0 and estimate["total"] >= estimate["video_kv"]
        assert (estimate["sparse_kv"] > 0) == (mode == "bilevel")

    late = result["late_block"]
    assert late["keys"] >= result["settings"]["late_keys"] and late["block_s"] > 0
    assert late["block_groups"] >= 1 and isinstance(late["fast_forward"], bool)

    sites = result["sdpa"]
    names = " ".join(site["site"] for site in sites)
    assert "engine/prefill.py" in names and "engine/decode.py" in names
    for site in sites:
        example = site["example"]
        assert site["count"] >= 1 and len(example["q"]) == len(example["k"]) == 4
        assert site["runs"]["default"]["ok"], site
        assert site["runs"]["default"]["kernel"], site
        assert {"flash", "efficient", "math"} <= set(site["runs"])

    fits = result["fits"]
    for mode in ("dense", "chunked", "bilevel"):
        assert fits[mode]["estimate"] >= 4
    assert "attention calls" in result["table"] and "attention calls" in proc.stdout
