"""The needle-reading loss over long haystacks (`haystacks:`, train/haystack.py): the unit pre-filled again
with gradients is the engine's own pre-fill, the loss reaches the LLM and the projector only, and a config
with `haystacks:` trains with its needle loss logged. A tiny random model keeps it to seconds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from test_train import media, write_config  # noqa: F401  (the module's media fixture)

from videoxl2.errors import ConfigError
from videoxl2.train import load_config, train
from videoxl2.train.haystack import HaystackPool, HaystackSettings, split_evenly


@pytest.fixture(scope="module")
def pool():
    from videoxl2.tiny import build_tiny_model

    model, tokenizer = build_tiny_model(seed=0)
    settings = HaystackSettings(lengths=[128, 64], count=2, needles_per_step=2, extra_dense=1, seed=3)
    return HaystackPool(model, tokenizer, settings, progress=False)


def test_unit_pre_filled_again_is_the_engines_pre_fill(pool):
    """Units of a chunked pre-fill, recomputed from their frames with the store as context, give the store's
    keys and values: the first (its block window starts with it), the second (the window starts before it)
    and the last (earlier groups seen through their time tokens only)."""
    haystack = pool.haystacks[0]
    memory, engine = haystack.memory, pool.engine
    last_block = (memory.layout.num_groups - 1) // engine.block_size
    assert last_block > engine.prev_blocks  # the last unit's window leaves early groups out
    from videoxl2.video.preprocess import preprocess_frames

    worst = 0.0
    for unit in (0, 1, memory.num_units - 1):
        first, last = memory.unit_groups(unit)
        frames = haystack.frames[first * 4 : (last + 1) * 4]
        pixels = preprocess_frames(frames, image_size=pool.model.config.vision_config.image_size)
        with torch.no_grad():
            keys, values = pool.unit_rows(memory, first, last, pool.model.encode_video(pixels))
        a, b = memory.layout.groups[first].time_start, memory.layout.groups[last].end
        for layer in range(len(keys)):
            worst = max(
                worst,
                float((keys[layer] - memory.keys[layer][:, a:b]).abs().max()),
                float((values[layer] - memory.values[layer][:, a:b]).abs().max()),
            )
    assert worst < 1e-5, f"recomputed unit K/V differ from the store's by {worst:.2e}"


def test_unit_frames_are_what_the_video_with_the_new_needle_decodes_to(pool, tmp_path):
    """A needle drawn into a haystack's unit gives, bit for bit, the frames of that unit in the whole video
    written with that needle (the codec's context included), for every haystack of the pool."""
    from videoxl2.data.synthetic import Needle, VideoSpec, write_video
    from videoxl2.video import read_video

    for index, haystack in enumerate(pool.haystacks):
        spec, old = haystack.spec, haystack.spec.needles[0]
        needle = Needle("yellow" if old.colour != "yellow" else "cyan", "triangle", old.start_frame)
        unit = old.start_frame // 4 // haystack.memory.unit_size
        first, last = haystack.memory.unit_groups(unit)
        whole = VideoSpec(spec.num_frames, spec.fps, spec.seed, (needle,))
        _, batches = read_video(write_video(whole, tmp_path / f"{index}.mp4"), max_num_frames=spec.num_frames)
        expected = np.concatenate(list(batches))[first * 4 : (last + 1) * 4]
        got = pool.unit_frames(haystack, needle, first, last)
        assert got.shape == expected.shape and np.array_equal(got, expected), (
            f"haystack {index}: max difference {np.abs(got.astype(int) - expected).max()}"
        )
        assert not np.array_equal(got, haystack.frames[first * 4 : (last + 1) * 4])


def test_needle_loss_trains_the_llm_and_projector_only(pool):
    model = pool.model
    model.requires_grad_(False)
    model.language_model.requires_grad_(True)
    model.projector.requires_grad_(True)
    loss = pool.loss(2)
    assert loss.ndim == 0 and torch.isfinite(loss) and float(loss.detach()) > 0
    loss.backward()
    for name, part in (("llm", model.language_model), ("projector", model.projector)):
        grads = [p.grad for p in part.parameters() if p.grad is not None]
        assert grads and any(float(g.abs().sum()) > 0 for g in grads), f"no gradient reached the {name}"
    assert all(p.grad is None for p in model.vision_tower.parameters())
    model.zero_grad(set_to_none=True)


def test_ranks_pre_fill_their_share_of_the_same_pool(pool):
    """Under torchrun rank r pre-fills haystacks r, r + world, ...: the very videos and memory one process
    makes of them (draws keyed by haystack, not by the order they are made in)."""
    from videoxl2.tiny import build_tiny_model

    model, tokenizer = build_tiny_model(seed=0)
    second = HaystackPool(model, tokenizer, pool.settings, progress=False, rank=1, world=2)
    (own,), whole = second.haystacks, pool.haystacks[1]
    assert own.spec == whole.spec and np.array_equal(own.frames, whole.frames)
    error = max((a - b).abs().max().item() for a, b in zip(own.memory.keys, whole.memory.keys))
    assert error == 0.0, f"rank 1's haystack memory differs by {error:.2e}"
    with pytest.raises(ConfigError, match="haystacks.count: 2 haystacks for 3 ranks"):
        HaystackPool(model, tokenizer, pool.settings, progress=False, rank=0, world=3)


def test_needle_draws_are_keyed_by_step_and_part(pool):
    """The same (step, part) gives the same needles, another step new ones: a resumed run goes on drawing
    instead of repeating its first needles."""
    with torch.no_grad():
        again = [float(pool.loss(1, step=5, part=1)) for _ in range(2)]
        other = float(pool.loss(1, step=6, part=1))
    assert again[0] == again[1] and other != again[0], (again, other)


def test_needles_are_split_over_micro_batches():
    assert [split_evenly(5, 2, i) for i in range(4)] == [3, 2, 3, 2]
    assert sum(split_evenly(7, 3, i) for i in range(3)) == 7


def test_config_with_haystacks_trains_and_logs_the_needle_loss(tmp_path, media):  # noqa: F811
    frozen = {"vision": False, "dts": False, "projector": True, "llm": True}
    path = write_config(tmp_path, media, trainable=frozen, max_steps=2, logging_steps=1)
    raw = yaml.safe_load(path.read_text())
    raw["haystacks"] = {"lengths": [64], "count": 1, "needles_per_step": 2, "extra_dense": 1, "start_step": 1}
    path.write_text(yaml.safe_dump(raw))
    result = train(load_config(path))
    steps = [entry["step"] for entry in result.log_history if "needle_loss" in entry]
    needle = [entry["needle_loss"] for entry in result.log_history if "needle_loss" in entry]
    assert steps == [2] and needle[0] > 0, result.log_history  # from step 1 on: the second step only


def test_haystacks_train_through_lora_adapters(tmp_path, media):  # noqa: F811
    """With `lora:` the LLM is a peft wrapper; the engine's pre-fill inside the needle loss must still reach
    the decoder stack, and the loss must move the adapters only."""
    frozen = {"vision": False, "dts": False, "projector": False, "llm": True}
    lora = {"r": 4, "alpha": 8, "dropout": 0.0}
    path = write_config(tmp_path, media, trainable=frozen, lora=lora, max_steps=2, logging_steps=1)
    raw = yaml.safe_load(path.read_text())
    raw["haystacks"] = {"lengths": [64], "count": 1, "needles_per_step": 2, "extra_dense": 1}
    path.write_text(yaml.safe_dump(raw))
    result = train(load_config(path))
    needle = [entry["needle_loss"] for entry in result.log_history if "needle_loss" in entry]
    assert len(needle) == 2 and all(value > 0 for value in needle), result.log_history
    assert result.trainable_params["llm"] > 0 and result.trainable_params["projector"] == 0


@pytest.mark.parametrize(
    "section, message",
    [
        ({"lengths": [64], "count": 1}, "missing required key 'needles_per_step'"),
        ({"lengths": [64], "count": 1, "needles_per_step": 2, "depth": 3}, r"unknown keys \['depth'\]"),
        ({"lengths": [2], "count": 1, "needles_per_step": 2}, "lengths must be a list of frame counts"),
        ({"lengths": [64], "count": 0, "needles_per_step": 2}, "count must be a positive integer"),
        (
            {"lengths": [64], "count": 1, "needles_per_step": 2, "start_step": -1},
            "start_step must be an integer",
        ),
        ({"lengths": [64], "count": 1, "needles_per_step": 2, "families": {"why": 1}}, "families must map"),
    ],
)
def test_haystacks_config_errors_name_the_field(tmp_path, media, section, message):  # noqa: F811
    frozen = {"vision": False, "dts": False, "projector": True, "llm": True}
    path = write_config(tmp_path, media, trainable=frozen)
    raw = yaml.safe_load(path.read_text())
    raw["haystacks"] = section
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_haystacks_over_the_context_fail_before_training(tiny):
    model, tokenizer = tiny
    limit = model.config.context_limit
    frames = 4 * (limit // model.config.tokens_per_group + 1)
    settings = HaystackSettings(lengths=[64, frames], count=2, needles_per_step=1)
    with pytest.raises(
        ConfigError, match=f"haystacks.lengths: {frames} frames make .* over the model's context of {limit}"
    ):
        HaystackPool(model, tokenizer, settings, progress=False)


def test_haystacks_need_a_frozen_vision_side(tmp_path, media):  # noqa: F811
    path = write_config(tmp_path, media, trainable="stage3")
    raw = yaml.safe_load(path.read_text())
    raw["haystacks"] = {"lengths": [64], "count": 1, "needles_per_step": 1}
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="haystacks .* trainable.vision and trainable.dts to false"):
        load_config(path)


def test_two_cpu_ranks_share_the_needle_gradients(tmp_path, media):  # noqa: F811
    """Under torchrun each rank draws its own needles from its own haystacks (the pool split between them);
    their gradients must reach the step on both ranks: the ranks end with the same weights, and those differ
    from the weights of the same run with the needle loss weighted 0; each rank logs the mean over both."""
    import os
    import subprocess
    import sys

    script = tmp_path / "ranks.py"
    script.write_text(
        "import sys, torch, torch.distributed as dist\n"
        "from videoxl2.train import load_config, train\n"
        "from videoxl2.train.haystack import HaystackPool\n"
        "own, plain = [], HaystackPool.loss\n"  # record this rank's needle terms, unchanged
        "def loss(self, *args):\n"
        "    term = plain(self, *args)\n"
        "    own.append(float(term.detach()))\n"
        "    return term\n"
        "HaystackPool.loss = loss\n"
        "result = train(load_config(sys.argv[1]))\n"
        "needle = [e['needle_loss'] for e in result.log_history if 'needle_loss' in e]\n"
        "weights = {n: p.detach().clone() for n, p in result.model.named_parameters()}\n"
        "torch.save((needle, own, weights), f'{sys.argv[2]}/rank{dist.get_rank()}.pt')\n"
    )
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    frozen = {"vision": False, "dts": False, "projector": True, "llm": True}
    runs = {}
    for weight in (1.0, 0.0):
        out = tmp_path / f"weight{weight}"
        path = write_config(out, media, trainable=frozen, max_steps=2, logging_steps=1)
        raw = yaml.safe_load(path.read_text())
        raw["haystacks"] = {
            "lengths": [64],
            "count": 2,
            "needles_per_step": 2,
            "extra_dense": 1,
            "weight": weight,
        }
        path.write_text(yaml.safe_dump(raw))
        done = subprocess.run(
            [*launch, str(script), str(path), str(out)],
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        runs[weight] = [torch.load(out / f"rank{r}.pt") for r in (0, 1)]
    (needle0, own0, weights0), (needle1, own1, weights1) = runs[1.0]
    assert len(own0) == len(own1) == 2 and own0 != own1, (own0, own1)  # the ranks drew different needles
    mean = [round((a + b) / 2, 4) for a, b in zip(own0, own1)]
    assert needle0 == needle1 == mean, (needle0, needle1, own0, own1)  # each step's log: both ranks' mean
    error = max((weights0[n] - weights1[n]).abs().max().item() for n in weights0)
    assert error < 1e-6, f"the ranks' weights differ by {error:.2e} after 2 steps"
    unweighted = runs[0.0][0][2]
    moved = max((weights0[n] - unweighted[n]).abs().max().item() for n in weights0)
    assert moved > 1e-4, f"the needle loss moved no weight under torchrun (max difference {moved:.2e})"
