"""`videoxl2 demo` and `videoxl2 niah` end to end on a tiny random model (the machinery, not accuracy)."""

from __future__ import annotations

import json

import pytest

from videoxl2.cli import main
from videoxl2.demo.niah import NiahSettings, needle_unit_dense, plot_heatmap, summarize
from videoxl2.demo.run import demo_spec, run_demo
from videoxl2.errors import InputError


def test_demo_spec_places_three_needles_on_group_boundaries():
    spec = demo_spec(192, 1.0, seed=0)
    starts = [n.start_frame for n in spec.needles]
    assert starts == sorted(starts) and all(s % 4 == 0 for s in starts)
    assert len({n.name for n in spec.needles}) == 3


def test_demo_writes_video_answers_and_timelines(tiny_checkpoint, tmp_path):
    results = run_demo(
        tiny_checkpoint, tmp_path, num_frames=48, progress=False, engine=dict(unit_size=1, topk=2)
    )
    assert (tmp_path / "demo.mp4").stat().st_size > 0
    assert {r.family for r in results} == {"what", "choice", "when", "count", "order"}
    for result in results:
        assert result.stats["mode"] == "bilevel"
        assert result.timeline.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        dense = [u for u in result.stats["units"] if u["dense"]]
        # 12 units of one group: the first, the last and the 2 best-scoring are dense.
        assert len(result.stats["units"]) == 12 and len(dense) == 4
        assert dense[0]["index"] == 0 and dense[-1]["index"] == 11
        assert all(u["score"] is not None for u in result.stats["units"])
        # Bi-level keeps less KV than the dense memory holds.
        assert result.stats["kv_bytes"] < result.stats["dense_kv_bytes"]


def test_niah_cli_writes_json_and_one_heatmap_per_mode(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "niah"
    code = main(
        ["niah", "--model", str(tiny_checkpoint), "--out", str(out), "--lengths", "16,48", "--depths",
         "0,0.5,1", "--trials", "1", "--limit", "4"]
    )  # fmt: skip
    assert code == 0
    result = json.loads((out / "niah.json").read_text())
    summary, records = result["summary"], result["records"]
    assert summary["lengths"] == [16, 48] and summary["depths"] == [0.0, 0.5, 1.0]
    assert set(summary["modes"]) == {"dense", "chunked", "bilevel"}
    # --limit 4 keeps 4 of the 6 cells, spread over the grid (first and last included).
    cells = {(r["frames"], r["depth"]) for r in records}
    assert len(cells) == 4 and (16, 0.0) in cells and (48, 1.0) in cells
    assert len(records) == 4 * 3
    for record in records:
        assert record["correct"] == (record["answer"].strip().lower() == record["needle"])
        assert (record["needle_unit_dense"] is None) == (record["mode"] != "bilevel")
    assert summary["modes"]["bilevel"]["needle_unit_selected"] is not None
    for mode, path in summary["heatmaps"].items():
        assert path.endswith(f"niah-{mode}.png")
        assert (out / f"niah-{mode}.png").read_bytes()[:4] == b"\x89PNG"
    assert "dense" in capsys.readouterr().out


def test_niah_engine_knobs_reach_bilevel(tiny_checkpoint, tmp_path):
    """--topk / --unit-size / --no-rerotate override the checkpoint's knobs: fewer dense units, less KV."""
    kv = {}
    for topk in (0, 4):
        out = tmp_path / f"niah-{topk}"
        args = ["niah", "--model", str(tiny_checkpoint), "--out", str(out), "--lengths", "48",
                "--depths", "0.5", "--modes", "bilevel", "--trials", "1", "--unit-size", "1",
                "--topk", str(topk), "--no-rerotate"]  # fmt: skip
        assert main(args) == 0
        result = json.loads((out / "niah.json").read_text())
        engine = result["summary"]["engine"]
        assert engine["topk"] == topk and engine["unit_size"] == 1 and engine["rerotate"] is False, engine
        kv[topk] = result["records"][0]["kv_bytes"]
    assert kv[0] < kv[4], kv


def test_needle_unit_lookup():
    units = [
        dict(start_seconds=0.0, end_seconds=8.0, dense=True, score=0.5),
        dict(start_seconds=8.0, end_seconds=16.0, dense=False, score=0.1),
        dict(start_seconds=16.0, end_seconds=20.0, dense=True, score=0.4),
    ]
    assert needle_unit_dense(units, 4.0) is True
    assert needle_unit_dense(units, 8.0) is False
    assert needle_unit_dense(units, 20.0) is True  # the last group's start can equal the last end
    assert needle_unit_dense([{**u, "dense": True, "score": None} for u in units], 9.0) is None


def test_niah_summary_and_heatmap_from_known_records(tmp_path):
    settings = NiahSettings(lengths=[8, 16], depths=[0.0, 1.0], modes=["dense"], trials=2)
    records = [
        dict(mode="dense", frames=8, depth=0.0, correct=True),
        dict(mode="dense", frames=8, depth=0.0, correct=False),
        dict(mode="dense", frames=16, depth=1.0, correct=True),
        dict(mode="dense", frames=16, depth=1.0, correct=True),
    ]
    summary = summarize(records, settings)
    dense = summary["modes"]["dense"]
    assert dense["accuracy"] == 75.0
    assert dense["by_length"] == {"8": 50.0, "16": 100.0}
    assert [c["accuracy"] for c in dense["cells"]] == [50.0, 100.0]
    assert plot_heatmap(summary, "dense", tmp_path / "h.png").stat().st_size > 1000


@pytest.mark.parametrize(
    "changes, message",
    [(dict(modes=["sparse"]), "--modes"), (dict(depths=[1.5]), "--depths"), (dict(lengths=[2]), "--lengths")],
)
def test_niah_settings_reject_bad_values(changes, message):
    with pytest.raises(InputError, match=message):
        NiahSettings(**changes).check()
