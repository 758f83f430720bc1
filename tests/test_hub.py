"""Hub ids: checkpoints resolved through a Hugging Face cache laid out on disk (models--org--name with refs
and snapshots) under a temporary HF_HOME, offline: a cached snapshot loads by id, a revision (branch or
commit) is honoured, a local path wins, and an id that is not cached is a one-line error. No network."""

from __future__ import annotations

import json
import re

import pytest
import torch

from videoxl2 import load_model, load_tokenizer
from videoxl2.cli import main
from videoxl2.errors import CheckpointError
from videoxl2.modeling.checkpoint import resolve_checkpoint
from videoxl2.tiny import save_tiny_checkpoint

REPO = "test-org/Video-XL-2-tiny"
MAIN = "a" * 40  # commit hashes
V2 = "b" * 40


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two tiny checkpoints of different seeds (main and the v2 branch), written once."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {MAIN: save_tiny_checkpoint(root / "main", seed=0), V2: save_tiny_checkpoint(root / "v2", seed=1)}


@pytest.fixture
def hub(tmp_path, monkeypatch, checkpoints):
    """HF_HOME with REPO cached at main (commit MAIN) and at branch v2 (commit V2), offline."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = tmp_path / "hf" / "hub" / ("models--" + REPO.replace("/", "--"))
    for branch, commit in (("main", MAIN), ("v2", V2)):
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / branch).write_text(commit)
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True)
        for file in checkpoints[commit].iterdir():
            (snapshot / file.name).symlink_to(file)  # as the hub cache links blobs
    return repo


def first_weight(model) -> torch.Tensor:
    return model.language_model.lm_head.weight


def test_cached_snapshot_loads_by_id(hub, checkpoints):
    model = load_model(REPO)
    reference = load_model(checkpoints[MAIN])
    assert torch.equal(first_weight(model), first_weight(reference))
    tokenizer = load_tokenizer(REPO)
    assert len(tokenizer) == model.config.vocab_size
    assert resolve_checkpoint(REPO) == hub / "snapshots" / MAIN


@pytest.mark.parametrize("revision", ["v2", V2])
def test_revision_is_honoured(hub, checkpoints, revision):
    other = load_model(checkpoints[V2])
    assert torch.equal(first_weight(load_model(REPO, revision=revision)), first_weight(other))
    assert torch.equal(first_weight(load_model(f"{REPO}@{revision}")), first_weight(other))
    assert not torch.equal(first_weight(load_model(REPO)), first_weight(other))
    assert resolve_checkpoint(REPO, revision=revision) == hub / "snapshots" / V2


def one_line(err: Exception) -> str:
    message = str(err)
    assert "\n" not in message
    return message


def test_offline_and_not_cached_is_one_line(hub):
    with pytest.raises(CheckpointError) as caught:
        load_model("test-org/not-downloaded")
    message = one_line(caught.value)
    assert "not in the Hugging Face cache" in message and "HF_HUB_OFFLINE is set" in message
    assert "hf download test-org/not-downloaded" in message and str(hub.parent) in message
    with pytest.raises(CheckpointError) as caught:
        load_tokenizer(REPO, revision="no-such-branch")
    message = one_line(caught.value)
    assert "at revision no-such-branch" in message and "--revision no-such-branch" in message
    with pytest.raises(CheckpointError, match="local_files_only is set"):
        load_model("test-org/not-downloaded", local_files_only=True)


def test_hf_hub_cache_wins_over_hf_home(hub, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "elsewhere"))):
        resolve_checkpoint(REPO)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub.parent))
    assert resolve_checkpoint(REPO) == hub / "snapshots" / MAIN


def test_local_path_wins_over_an_id(hub, checkpoints, tmp_path, monkeypatch):
    local = tmp_path / "work"
    save_tiny_checkpoint(local / REPO, seed=2)
    monkeypatch.chdir(local)
    model = load_model(REPO)  # the folder ./test-org/Video-XL-2-tiny, not the cached snapshot
    assert not torch.equal(first_weight(model), first_weight(load_model(checkpoints[MAIN])))
    assert resolve_checkpoint(REPO).resolve() == (local / REPO).resolve()


def test_paths_that_are_not_ids_keep_their_error(hub, tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        load_model(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        load_model("./relative/missing/folder")


def test_cli_plan_by_hub_id(hub, capsys):
    assert main(["plan", "--model", REPO, "--revision", "v2", "--frames", "32", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["model"] == REPO and record["revision"] == "v2" and record["video_kv"] > 0
    assert main(["plan", "--model", "test-org/not-downloaded"]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "hf download test-org/not-downloaded" in err
