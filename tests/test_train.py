"""Training: data format and sampling, label masking, train/inference layout, freeze policy, overfitting,
kill-and-resume, save/load, LoRA. Tiny random models and tiny synthetic videos keep every run to seconds."""

from __future__ import annotations

import importlib.util
import json
import random
import shutil

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from videoxl2 import load_model
from videoxl2.cli import main
from videoxl2.errors import ConfigError, InputError, MediaNotFoundError
from videoxl2.train import IGNORE_INDEX, Collator, SupervisedDataset, encode_sample, load_config, train
from videoxl2.train.data import sample_records
from videoxl2.video.synthetic import write_synthetic_video

QUESTION = "What is shown in the video?"
ANSWERS = ["The answer is red square.", "The answer is blue circle.", "The answer is green triangle."]
PARTS = {"vision": "vision_tower.", "dts": "dts.", "projector": "projector.", "llm": "language_model."}


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Three 16-frame videos (4 fps), one still image, and an annotation file of video QA samples."""
    root = tmp_path_factory.mktemp("media")
    for i in range(3):
        write_synthetic_video(root / f"v{i}.mp4", num_frames=16, fps=4.0, seed=i)
    Image.fromarray(np.full((40, 64, 3), 200, dtype=np.uint8)).save(root / "still.png")
    records = [
        {
            "id": f"s{i}",
            "video": f"v{i}.mp4",
            "conversations": qa(f"<image>\n{QUESTION}", answer),
        }
        for i, answer in enumerate(ANSWERS)
    ]
    (root / "videos.json").write_text(json.dumps(records))
    return root


def qa(question, answer):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def write_config(folder, media, trainable="stage3", lora=None, **training):
    folder.mkdir(parents=True, exist_ok=True)
    raw = {
        "model": "tiny",
        "data": {
            "datasets": [{"json_path": str(media / "videos.json"), "sampling_strategy": "all"}],
            "video_fps": 4,
            "frames_upbound": 16,
        },
        "trainable": trainable,
        "training": {
            "output_dir": "out",
            "max_steps": 4,
            "learning_rate": 3e-3,
            "per_device_train_batch_size": 3,
            "gradient_accumulation_steps": 1,
            "warmup_steps": 0,
            "save_steps": 100,
            "seed": 0,
            "disable_tqdm": True,
            **training,
        },
    }
    if lora:
        raw["lora"] = lora
    path = folder / "train.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def dataset_for(config_path):
    from videoxl2.tiny import build_tiny_model
    from videoxl2.train import load_samples

    config = load_config(config_path)
    model, tokenizer = build_tiny_model(seed=0)
    return SupervisedDataset(load_samples(config.data, 0), tokenizer, model.config, config.data), model


def spans(labels):
    """Contiguous runs of supervised positions, as lists of token ids."""
    out, run = [], []
    for token in labels.tolist() + [IGNORE_INDEX]:
        if token != IGNORE_INDEX:
            run.append(token)
        elif run:
            out.append(run)
            run = []
    return out


def test_sampling_strategies_are_the_release_rules_and_seeded():
    records = list(range(10))
    draw = lambda rule, seed=0: sample_records(records, rule, random.Random(seed), "x.json")  # noqa: E731
    assert draw("all") == records
    assert draw("first:3") == [0, 1, 2] and draw("end:3") == [7, 8, 9]
    assert draw("first:30%") == [0, 1, 2] and draw("end:25%") == [7, 8, 9]  # ceil(2.5) = 3
    assert len(draw("random:4")) == 4 and draw("random:4") == draw("random:4")
    assert draw("random:40%") != draw("random:40%", seed=1) and len(draw("50%")) == 5
    for bad in ("some", "first:x", "middle:3"):
        with pytest.raises(ConfigError, match="sampling_strategy"):
            draw(bad)


def test_data_yaml_paths_and_errors(tmp_path, media):
    (tmp_path / "anno").mkdir()
    shutil.copy(media / "videos.json", tmp_path / "anno" / "videos.json")
    (tmp_path / "data.yaml").write_text(
        yaml.safe_dump(
            {
                "datasets": [{"json_path": "anno/videos.json", "sampling_strategy": "random:2"}],
                "video_folder": str(media),
            }
        )
    )
    config_path = write_config(tmp_path, media)
    raw = yaml.safe_load(config_path.read_text())
    raw["data"] = {"path": "data.yaml", "frames_upbound": 8}
    config_path.write_text(yaml.safe_dump(raw))
    config = load_config(config_path)
    assert config.data.frames_upbound == 8 and config.data.video_folder == media
    assert str(config.training["output_dir"]) == str(tmp_path / "out")
    from videoxl2.train import load_samples

    first, again = load_samples(config.data, 0), load_samples(config.data, 0)
    assert [s.id for s in first] == [s.id for s in again] and len(first) == 2
    assert all(s.video.parent == media for s in first)

    raw["data"]["frames_upbound"] = 8
    for key, value, message in [
        ("training", None, "missing required key 'training'"),
        ("trainable", "stage9", "trainable preset 'stage9'"),
        ("trainable", dict.fromkeys(PARTS, False), "nothing would train"),
        ("lora", {"r": 4}, "set trainable.llm"),
        ("optimiser", 1, "unknown keys \\['optimiser'\\]"),
    ]:
        broken = dict(raw, trainable={"llm": False}) if key == "lora" else dict(raw)
        broken[key] = value
        if value is None:
            del broken[key]
        config_path.write_text(yaml.safe_dump(broken))
        with pytest.raises(ConfigError, match=message) as err:
            load_config(config_path)
        assert str(config_path) in str(err.value)


def test_missing_media_are_listed(tmp_path, media):
    records = [
        {"video": "gone.mp4", "conversations": qa("Q", "A")},
        {"image": "lost.png", "conversations": qa("Q", "A")},
    ]
    (tmp_path / "bad.json").write_text(json.dumps(records))
    config_path = write_config(tmp_path, media)
    raw = yaml.safe_load(config_path.read_text())
    raw["data"]["datasets"].append({"json_path": "bad.json"})
    config_path.write_text(yaml.safe_dump(raw))
    with pytest.raises(MediaNotFoundError, match="2 media files not found") as err:
        dataset_for(config_path)
    assert "gone.mp4" in str(err.value) and "lost.png" in str(err.value)


def test_labels_are_exactly_the_answers(tmp_path, media):
    turns = [
        {"from": "human", "value": "<image>\nWhich colour comes first?"},
        {"from": "gpt", "value": "Red, at 0:02."},
        {"from": "human", "value": "And after 1:05?"},
        {"from": "gpt", "value": "Blue."},
    ]
    records = [
        {"id": "multi", "video": str(media / "v0.mp4"), "conversations": turns},
        {"id": "still", "image": str(media / "still.png"), "conversations": turns[:2]},
        {"id": "text", "conversations": qa("Hi?", "Hello.")},
    ]
    (tmp_path / "mixed.json").write_text(json.dumps(records))
    config_path = write_config(tmp_path, media)
    raw = yaml.safe_load(config_path.read_text())
    raw["data"]["datasets"] = [{"json_path": "mixed.json"}]
    config_path.write_text(yaml.safe_dump(raw))
    dataset, model = dataset_for(config_path)
    tokenizer, config = dataset.tokenizer, model.config
    expected = [["Red, at 0:02.", "Blue."], ["Red, at 0:02."], ["Hello."]]
    groups = [4, 1, 0]  # 16 frames at 4 fps -> 4 groups; an image is one frame -> one group
    items = [dataset[i] for i in range(3)]
    for item, answers, count in zip(items, expected, groups):
        decoded = [tokenizer.decode(run) for run in spans(item["labels"])]
        assert decoded == [f"{a}<|im_end|>\n" for a in answers]
        slots = item["input_ids"] == config.video_token_id
        assert int(slots.sum()) == count * config.tokens_per_group
        assert (item["labels"][slots] == IGNORE_INDEX).all()
    assert items[0]["pixel_values"].shape == (16, 3, 63, 63) and items[1]["pixel_values"].shape[0] == 1
    assert items[2]["pixel_values"] is None
    text = tokenizer.decode(items[0]["input_ids"])
    assert "And after 65 seconds?" in text and "Time 3.0s:" in text  # questions are rewritten as at inference

    batch = Collator(tokenizer.pad_token_id)(items)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert len(batch["pixel_values"]) == 2 and batch["attention_mask"][2].sum() == len(items[2]["input_ids"])
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    with torch.no_grad():
        loss = model(**batch).loss
    assert torch.isfinite(loss)


def test_training_ids_are_the_inference_ids(tmp_path, media):
    from videoxl2.engine.session import VideoSession
    from videoxl2.video import preprocess_frames

    dataset, model = dataset_for(write_config(tmp_path, media))
    item = dataset[0]
    session = VideoSession.from_path(
        model, dataset.tokenizer, media / "v0.mp4", max_num_frames=16, sample_fps=4, max_sample_fps=None
    )
    prompt = torch.cat([session.layout.input_ids, session.question_ids(QUESTION)])
    assert torch.equal(item["input_ids"][: len(prompt)], prompt)
    assert (item["labels"][: len(prompt)] == IGNORE_INDEX).all()
    assert item["labels"][len(prompt)] != IGNORE_INDEX
    frames = np.concatenate(list(session._frame_batches(64)))
    assert torch.equal(item["pixel_values"], preprocess_frames(frames, image_size=63))

    # A later turn: everything before its answer is what a session builds from the history.
    turns = [("<image>\nFirst?", "One."), ("Second?", "Two.")]
    ids, labels, _ = encode_sample(dataset.tokenizer, turns, session.group_seconds, model.config)
    history = [("First?", "One.")]
    second = torch.cat([session.layout.input_ids, session.question_ids("Second?", history=history)])
    assert ids[: len(second)] == second.tolist()
    assert dataset.tokenizer.decode(spans(torch.tensor(labels[len(second) :]))[0]) == "Two.<|im_end|>\n"


def test_a_clip_keeps_its_source_videos_times(tmp_path, media):
    """`clip_start` (seconds) moves every time text by that much: a clip cut from a longer video trains with
    the times that video's session would write, so time answers must be read off the time text."""
    from videoxl2.engine.session import VideoSession

    record = {"id": "clip", "video": str(media / "v0.mp4"), "conversations": qa(f"<image>\n{QUESTION}", "x")}
    records = [{**record, "clip_start": 96}]
    (tmp_path / "clip.json").write_text(json.dumps(records))
    config_path = write_config(tmp_path, media)
    raw = yaml.safe_load(config_path.read_text())
    raw["data"]["datasets"] = [{"json_path": str(tmp_path / "clip.json")}]
    config_path.write_text(yaml.safe_dump(raw))
    dataset, model = dataset_for(config_path)
    plain = VideoSession.from_path(model, dataset.tokenizer, media / "v0.mp4", 16, 4, None)
    frames = np.concatenate(list(plain._frame_batches(64)))
    moved = VideoSession.from_frames(model, dataset.tokenizer, frames, [t + 96 for t in plain.timestamps])
    prompt = torch.cat([moved.layout.input_ids, moved.question_ids(QUESTION)])
    assert torch.equal(dataset[0]["input_ids"][: len(prompt)], prompt)
    assert "Time 97.0s:" in dataset.tokenizer.decode(prompt) and "Time 1.0s:" not in dataset.tokenizer.decode(
        prompt
    )

    (tmp_path / "clip.json").write_text(json.dumps([{**record, "clip_start": -4}]))
    with pytest.raises(
        InputError, match=r"clip\.json\[0\]: 'clip_start' must be a finite number of seconds >= 0"
    ):
        dataset_for(config_path)


def test_independent_turns_train_each_question_as_if_asked_alone(tmp_path, media):
    """A conversation with independent turns gives, branch by branch, the logits of each question asked
    alone (the prompt `VideoSession` builds), in one forward with one encoding of the video."""
    from videoxl2.engine.session import VideoSession

    turns = [
        *qa("<image>\nWhat colour?", "Red."),
        *qa("When?", "At 0:02, then again."),
        *qa("How many?", "2"),
    ]
    records = [
        {"id": "multi", "video": str(media / "v0.mp4"), "conversations": turns},
        {"id": "text", "conversations": [*qa("Hi?", "Hello."), *qa("Bye?", "Goodbye.")]},
        {"id": "one", "video": str(media / "v1.mp4"), "conversations": qa(f"<image>\n{QUESTION}", "Blue.")},
    ]
    (tmp_path / "multi.json").write_text(json.dumps(records))
    config_path = write_config(tmp_path, media)
    raw = yaml.safe_load(config_path.read_text())
    raw["data"].update(datasets=[{"json_path": str(tmp_path / "multi.json")}], independent_turns=True)
    config_path.write_text(yaml.safe_dump(raw))
    dataset, model = dataset_for(config_path)
    model.eval()
    tokenizer = dataset.tokenizer
    items = [dataset[i] for i in range(3)]
    batch = Collator(tokenizer.pad_token_id)(items)
    assert batch["attention_mask"].shape == (3, 1, batch["input_ids"].shape[1], batch["input_ids"].shape[1])
    with torch.no_grad():
        logits = model(**batch).logits

    session = VideoSession.from_path(
        model, tokenizer, media / "v0.mp4", max_num_frames=16, sample_fps=4, max_sample_fps=None
    )
    starts = items[0]["branch_starts"]
    assert len(starts) == 3 and starts[0] == session.layout.video_end
    ends = [*starts[1:], len(items[0]["input_ids"])]
    worst = 0.0
    for (question, answer), start, end in zip(zip(turns[0::2], turns[1::2]), starts, ends):
        question, answer = question["value"].removeprefix("<image>\n"), answer["value"]
        alone = torch.cat([session.layout.input_ids, session.question_ids(question)])
        ids, labels, _ = encode_sample(tokenizer, [(question, answer)], session.group_seconds, model.config)
        assert ids[: len(alone)] == alone.tolist()
        # The branch holds exactly the single-question sample's tokens after the shared video prefix.
        assert items[0]["input_ids"][start:end].tolist() == ids[session.layout.video_end :]
        assert items[0]["labels"][start:end].tolist() == labels[session.layout.video_end :]
        with torch.no_grad():
            single = model(input_ids=torch.tensor([ids]), pixel_values=[items[0]["pixel_values"]]).logits[0]
        error = (logits[0, start:end] - single[session.layout.video_end :]).abs().max().item()
        worst = max(worst, error)
    assert worst <= 1e-5, f"branch logits vs the question asked alone: max abs error {worst:.2e}"
    # Prefix logits are the plain causal ones; a one-turn sample is the plain encoding, plainly attended.
    with torch.no_grad():
        one = items[2]
        plain = model(input_ids=one["input_ids"][None], pixel_values=[one["pixel_values"]]).logits[0]
    n = len(items[2]["input_ids"])
    error = (logits[2, :n] - plain).abs().max().item()
    assert error <= 1e-5, f"one-turn sample vs plain forward: max abs error {error:.2e}"
    # Text-only turns branch after the system prompt and user tag; the second sees nothing of the first.
    text_starts = items[1]["branch_starts"]
    decoded = [tokenizer.decode(items[1]["input_ids"][a:b]) for a, b in
               zip(text_starts, [*text_starts[1:], len(items[1]["input_ids"])])]  # fmt: skip
    assert decoded[1].startswith("Bye?<|im_end|>") and "Hello" not in decoded[1]
    assert not batch["attention_mask"][1, 0, text_starts[1], text_starts[0] : text_starts[1]].any()
    assert batch["position_ids"][1, text_starts[1]] == text_starts[0]
    assert torch.isfinite(model(**batch).loss)


def test_truncation_never_cuts_the_video(tmp_path, media):
    dataset, _ = dataset_for(write_config(tmp_path, media))
    full = dataset[0]
    dataset.settings.model_max_length = len(full["input_ids"]) - 2
    cut = dataset[0]
    assert torch.equal(cut["input_ids"], full["input_ids"][:-2])
    dataset.settings.model_max_length = 40
    with pytest.raises(InputError, match="over model_max_length 40"):
        dataset[0]


def test_lengths_come_without_decoding_and_feed_the_length_grouped_sampler(tmp_path, media):
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from videoxl2.train.trainer import part_trainer_class, training_arguments

    records = [
        {"id": "still", "image": str(media / "still.png"), "conversations": qa("<image>\nColour?", "Grey.")},
        {"id": "text", "conversations": qa("Say hello.", "Hello there! " * 12)},
    ]
    (tmp_path / "mixed.json").write_text(json.dumps(records))
    path = write_config(tmp_path, media, train_sampling_strategy="group_by_length")
    raw = yaml.safe_load(path.read_text())
    raw["data"]["datasets"].append({"json_path": str(tmp_path / "mixed.json"), "sampling_strategy": "all"})
    path.write_text(yaml.safe_dump(raw))
    dataset, model = dataset_for(path)
    lengths = dataset.lengths()
    assert lengths == [len(dataset[i]["input_ids"]) for i in range(len(dataset))]
    assert len(set(lengths)) >= 3  # videos, the still and the text differ

    config = load_config(path)
    trainer = part_trainer_class()(
        model=model, args=training_arguments(config, True), train_dataset=dataset, data_collator=Collator(0)
    )
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, LengthGroupedSampler) and sampler.lengths == lengths
    assert sorted(sampler) == list(range(len(dataset)))


def test_batch_rebalance_gives_the_random_batch_update_with_less_padding(tmp_path, media):
    """`batch_rebalance` splits each step's random samples into micro-batches by length: the same update
    as one padded batch of them (loss over the step's answer tokens), on fewer padded tokens."""
    from videoxl2.tiny import build_tiny_model
    from videoxl2.train.trainer import part_trainer_class, training_arguments

    records = [
        {"id": "still", "image": str(media / "still.png"), "conversations": qa("<image>\nColour?", "Grey.")},
        {"id": "text", "conversations": qa("Say hello.", "Hello there! " * 12)},
        {"id": "short", "conversations": qa("Yes?", "No.")},
    ]
    (tmp_path / "mixed.json").write_text(json.dumps(records))
    runs = {}
    for name, (batch, accumulation) in {"one": (6, 1), "split": (2, 3)}.items():
        path = write_config(
            tmp_path / name,
            media,
            train_sampling_strategy="batch_rebalance",
            optim="sgd",
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            max_steps=3,
            learning_rate=0.5,
            logging_steps=1,
        )
        raw = yaml.safe_load(path.read_text())
        mixed = {"json_path": str(tmp_path / "mixed.json"), "sampling_strategy": "all"}
        raw["data"]["datasets"].append(mixed)
        raw["training"]["output_dir"] = str(tmp_path / name / "out")
        path.write_text(yaml.safe_dump(raw))
        config = load_config(path)
        dataset, model = dataset_for(path)
        args = training_arguments(config, True)
        trainer = part_trainer_class()(
            model=model, args=args, train_dataset=dataset, data_collator=Collator(0)
        )
        micro = list(trainer._get_train_sampler())
        lengths = dataset.lengths()
        padded = sum(len(m) * max(lengths[i] for i in m) for m in micro)
        result = train(config)
        runs[name] = micro, padded, result.losses, parameters(result.model)

    (one, one_padded, one_losses, one_weights), (split, split_padded, split_losses, split_weights) = (
        runs["one"],
        runs["split"],
    )
    assert [sorted(m) for m in one] == [sorted(sum(split[k : k + 3], [])) for k in range(0, len(split), 3)]
    assert split_padded < one_padded, (split_padded, one_padded)
    assert np.allclose(one_losses, split_losses, atol=1e-5), (one_losses, split_losses)
    error = max((one_weights[n] - split_weights[n]).abs().max().item() for n in one_weights)
    start = parameters(build_tiny_model(seed=0, init_std=None)[0])
    moved = max((one_weights[n] - start[n]).abs().max().item() for n in one_weights)
    assert error < 1e-5 and moved > 1e-2, f"max abs weight difference {error:.2e} (weights moved {moved:.2e})"


@pytest.mark.parametrize("strategy", [None, "batch_rebalance"])
def test_two_cpu_ranks_train_the_one_process_model(tmp_path, media, strategy):
    """torchrun without GPUs joins its ranks (DDP over gloo): two 1-thread ranks of 2 samples a step give the
    losses and weights of one process of 4 (with `batch_rebalance`, of 2 micro-batches of 2). Left to the
    Trainer's defaults each rank trained its own copy."""
    import os
    import re
    import subprocess
    import sys

    from videoxl2.tiny import build_tiny_model

    records = [
        {
            "id": f"r{i}",
            "video": str(media / f"v{i % 3}.mp4"),
            "conversations": qa(f"<image>\n{QUESTION}", ANSWERS[i % 3]),
        }
        for i in range(8)
    ]
    (tmp_path / "eight.json").write_text(json.dumps(records))
    paths = {}
    one_process = {"per_device_train_batch_size": 4}
    if strategy:
        one_process = {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2}
    sampling = {"train_sampling_strategy": strategy} if strategy else {}
    for name, batches in {"one": one_process, "two": {"per_device_train_batch_size": 2}}.items():
        path = write_config(tmp_path / name, media, max_steps=2, **batches, **sampling)
        raw = yaml.safe_load(path.read_text())
        raw["data"]["datasets"] = [{"json_path": str(tmp_path / "eight.json"), "sampling_strategy": "all"}]
        raw["training"]["output_dir"] = str(tmp_path / name / "out")
        path.write_text(yaml.safe_dump(raw))
        paths[name] = path
    one = train(load_config(paths["one"]))
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*launch, "-m", "videoxl2.cli", "train", "--config", str(paths["two"])],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    reports = re.findall(r"trained 2 steps in .*, loss ([0-9.]+) -> ([0-9.]+)", done.stdout)
    assert len(reports) == 1, done.stdout[-2000:]  # rank 0 alone reports, for both ranks
    assert [float(x) for x in reports[0]] == pytest.approx([one.losses[0], one.losses[-1]], abs=1e-4)
    two = parameters(load_model(tmp_path / "two" / "out"))
    weights = parameters(one.model)
    error = max((weights[n] - two[n]).abs().max().item() for n in weights)
    start = parameters(build_tiny_model(seed=0, init_std=None)[0])
    moved = max((weights[n] - start[n]).abs().max().item() for n in weights)
    assert error < 1e-5 and moved > 1e-3, f"max abs weight difference {error:.2e} (weights moved {moved:.2e})"


def test_feature_cache_gives_the_same_training_and_skips_decoding(tmp_path, media, monkeypatch):
    """With vision and DTS frozen, stored features give the losses and weights of computing them each time;
    a second run on a warm store decodes no video at all."""
    import videoxl2.train.data as data_module

    still = [
        {"id": "still", "image": str(media / "still.png"), "conversations": qa("<image>\nColour?", "Grey.")}
    ]
    (tmp_path / "still.json").write_text(json.dumps(still))
    frozen = {"vision": False, "dts": False, "projector": True, "llm": True}
    runs = {}
    for name, cache in (("plain", False), ("cold", True), ("warm", True)):
        path = write_config(
            tmp_path / name,
            media,
            trainable=frozen,
            max_steps=3,
            logging_steps=1,
            per_device_train_batch_size=2,
        )
        raw = yaml.safe_load(path.read_text())
        still_data = {"json_path": str(tmp_path / "still.json"), "sampling_strategy": "all"}
        raw["data"]["datasets"].append(still_data)
        if cache:
            raw["feature_cache"] = str(tmp_path / "store")
        path.write_text(yaml.safe_dump(raw))
        if name == "warm":

            def no_decoding(*args, **kwargs):
                raise AssertionError("a stored video was decoded again")

            monkeypatch.setattr(data_module, "iter_frame_batches", no_decoding)
            monkeypatch.setattr(data_module, "load_image", no_decoding)
        result = train(load_config(path))
        runs[name] = result.losses, parameters(result.model)

    stored = list((tmp_path / "store").glob("*/*.safetensors"))
    assert len(stored) == 4, stored  # 3 videos and the still image, one entry each
    plain_losses, plain_weights = runs["plain"]
    for name in ("cold", "warm"):
        losses, weights = runs[name]
        error = max((weights[n] - plain_weights[n]).abs().max().item() for n in weights)
        assert np.allclose(losses, plain_losses, atol=1e-6, rtol=0), (name, losses, plain_losses)
        assert error < 1e-6, f"{name}: max abs weight difference {error:.2e} against computing features"


def test_feature_cache_is_keyed_by_the_frozen_weights_and_needs_them_frozen(tmp_path, media):
    from videoxl2.tiny import build_tiny_model
    from videoxl2.train.features import frozen_fingerprint

    first, second = build_tiny_model(seed=0)[0], build_tiny_model(seed=1)[0]
    assert frozen_fingerprint(first) == frozen_fingerprint(build_tiny_model(seed=0)[0])
    assert frozen_fingerprint(first) != frozen_fingerprint(second)
    first.projector.requires_grad_(False)
    with torch.no_grad():
        for p in first.projector.parameters():
            p.add_(1.0)  # the projector is not part of the stored features
    assert frozen_fingerprint(first) == frozen_fingerprint(build_tiny_model(seed=0)[0])

    path = write_config(tmp_path, media, trainable={"vision": True, "dts": False})
    raw = yaml.safe_load(path.read_text())
    raw["feature_cache"] = "store"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="feature_cache .* trainable.vision and trainable.dts must be"):
        load_config(path)


def parameters(model):
    return {name: p.detach().clone() for name, p in model.state_dict().items()}


def test_projector_only_trains_the_projector(tmp_path, media):
    from videoxl2.tiny import build_tiny_model

    before = parameters(build_tiny_model(seed=0, init_std=None)[0])
    result = train(load_config(write_config(tmp_path, media, trainable="projector_only", max_steps=2)))
    after = parameters(load_model(result.output_dir))
    assert result.trainable_params["projector"] > 0
    assert sum(result.trainable_params[p] for p in ("vision", "dts", "llm")) == 0
    for part, prefix in PARTS.items():
        changed = [n for n in before if n.startswith(prefix) and not torch.equal(before[n], after[n])]
        assert bool(changed) == (part == "projector"), part


def test_part_learning_rates_reach_the_optimizer(tmp_path, media):
    from videoxl2.tiny import build_tiny_model

    path = write_config(tmp_path, media, max_steps=2)
    raw = yaml.safe_load(path.read_text())
    raw["learning_rates"] = {"vision": 0.0, "dts": 1e-3}
    path.write_text(yaml.safe_dump(raw))
    config = load_config(path)
    assert config.learning_rates == {"vision": 0.0, "dts": 1e-3}
    before = parameters(build_tiny_model(seed=0, init_std=None)[0])
    after = parameters(load_model(train(config).output_dir))
    for part, prefix in PARTS.items():
        changed = [n for n in before if n.startswith(prefix) and not torch.equal(before[n], after[n])]
        assert bool(changed) == (part != "vision"), part  # rate 0 leaves the vision tower as it was

    raw["learning_rates"] = {"eyes": 1e-3}
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="learning_rates: unknown keys"):
        load_config(path)


@pytest.fixture(scope="module")
def overfit(tmp_path_factory, media):
    """30 steps on 3 samples, all parts trainable, activation checkpointing on, a checkpoint every 10."""
    folder = tmp_path_factory.mktemp("overfit")
    path = write_config(folder, media, max_steps=30, save_steps=10, activation_checkpointing=True)
    return path, train(load_config(path))


def test_loss_falls_by_half(overfit):
    _, result = overfit
    assert result.steps == 30 and len(result.losses) == 30
    assert np.mean(result.losses[-3:]) < 0.5 * result.losses[0]
    assert result.model.language_model.model.gradient_checkpointing


def test_saved_model_loads_with_the_same_logits(overfit, media):
    _, result = overfit
    dataset, _ = dataset_for(write_config(result.output_dir.parent / "again", media))
    batch = Collator(dataset.tokenizer.pad_token_id)([dataset[0], dataset[1]])
    loaded = load_model(result.output_dir)
    trained = result.model.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).logits, trained(**batch).logits, atol=1e-5)
    assert (result.output_dir / "tokenizer.json").is_file()


def test_resume_after_a_kill_continues_with_the_same_losses(overfit, tmp_path, capsys):
    config_path, uninterrupted = overfit
    # The run was killed after step 10: all that is left of it is its checkpoint.
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(uninterrupted.output_dir / "checkpoint-10", resumed_dir / "checkpoint-10")
    state_file = resumed_dir / "checkpoint-10" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["log_history"].append({"step": 10, "marker": "from the checkpoint"})  # proves the state was read
    state_file.write_text(json.dumps(state))
    code = main(["train", "--config", str(config_path), "--resume", "--output-dir", str(resumed_dir)])
    assert code == 0 and "trained 30 steps" in capsys.readouterr().out
    history = json.loads((resumed_dir / "checkpoint-30" / "trainer_state.json").read_text())["log_history"]
    losses = lambda h: {e["step"]: e["loss"] for e in h if "loss" in e and e["step"] > 10}  # noqa: E731
    expected = losses(uninterrupted.log_history)
    assert len(expected) == 20 and losses(history) == pytest.approx(expected, rel=1e-5)
    assert {"step": 10, "marker": "from the checkpoint"} in history


def test_resume_without_checkpoint_is_one_line_error(tmp_path, media, capsys):
    path = write_config(tmp_path, media)
    assert main(["train", "--config", str(path), "--resume"]) == 2
    assert "cannot resume: no checkpoint-N folder" in capsys.readouterr().err


def test_lora_trains_adapters_and_saves_merged(tmp_path, media):
    pytest.importorskip("peft", reason="LoRA needs peft (the train extra)")
    from videoxl2.tiny import build_tiny_model

    before = parameters(build_tiny_model(seed=0, init_std=None)[0])
    lora = {"r": 4, "alpha": 8, "dropout": 0.0}
    trainable = {"vision": False, "dts": False, "projector": True, "llm": True}
    result = train(load_config(write_config(tmp_path, media, trainable=trainable, lora=lora, max_steps=3)))
    llm = result.trainable_params["llm"]
    assert 0 < llm < sum(v.numel() for n, v in before.items() if n.startswith("language_model."))
    after = parameters(load_model(result.output_dir))
    assert set(after) == set(before)
    for name in before:
        if name.startswith(("vision_tower.", "dts.")) or name == "language_model.lm_head.weight":
            assert torch.equal(before[name], after[name]), name
    query = "language_model.model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(before[query], after[query])


def test_lora_target_modules_regex_reaches_only_the_named_layer():
    """A string `target_modules` is peft's regex over the LLM's module names (docs/training.md)."""
    pytest.importorskip("peft", reason="LoRA needs peft (the train extra)")
    from videoxl2.tiny import build_tiny_model
    from videoxl2.train.config import LORA_DEFAULTS
    from videoxl2.train.trainer import add_lora

    model = build_tiny_model(seed=0)[0]
    last = model.config.text_config.num_hidden_layers - 1
    add_lora(model, {**LORA_DEFAULTS, "target_modules": rf".*layers\.{last}\.(self_attn|mlp)\..*_proj"})
    adapted = {n.rsplit(".", 1)[0] for n, _ in model.language_model.named_modules() if n.endswith(".lora_A")}
    assert len(adapted) == 7 and all(f"layers.{last}." in n for n in adapted), sorted(adapted)


def test_example_configs_parse_and_deepspeed_presets_resolve():
    from videoxl2.train.config import CONFIG_DIR

    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        config = load_config(path)
        assert json.loads(open(config.training["deepspeed"]).read())["zero_optimization"]["stage"] == 2
    assert json.loads((CONFIG_DIR / "zero3.json").read_text())["zero_optimization"]["stage"] == 3


def test_cli_reports_data_errors_in_one_line(tmp_path, media, capsys):
    path = write_config(tmp_path, media)
    raw = yaml.safe_load(path.read_text())
    raw["data"]["datasets"][0]["sampling_strategy"] = "most"
    path.write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("videoxl2: error: ") and err.count("\n") == 1
    assert "videos.json: sampling_strategy 'most'" in err


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None, reason="deepspeed is installed")
def test_deepspeed_without_the_package_is_named(tmp_path, media):
    with pytest.raises(ConfigError, match="deepspeed"):
        train(load_config(write_config(tmp_path, media, deepspeed="zero3")))


def test_position_skip_moves_positions_apart_at_group_boundaries(tmp_path, media):
    """PoSE (`data.position_skip`): ids and labels unchanged; positions jump only where a group's time text
    starts or at the video's end, stay increasing, reach no further than max_position; branch positions get
    the same gaps; probability 0 leaves every sample plain; a bad setting is a ConfigError."""
    from videoxl2.errors import ConfigError
    from videoxl2.train.data import DataSettings

    turns = [*qa("<image>\nWhat colour?", "Red."), *qa("How many?", "2")]
    (tmp_path / "multi.json").write_text(json.dumps([{"id": "m", "video": str(media / "v0.mp4"),
                                                      "conversations": turns}]))  # fmt: skip
    config_path = write_config(tmp_path, media)
    raw = yaml.safe_load(config_path.read_text())
    skip = {"max_position": 5000, "probability": 1.0, "cuts": 2}
    raw["data"].update(datasets=[{"json_path": str(tmp_path / "multi.json")}], independent_turns=True,
                       position_skip=skip)  # fmt: skip
    config_path.write_text(yaml.safe_dump(raw))
    dataset, model = dataset_for(config_path)
    video_token = model.config.video_token_id
    torch.manual_seed(0)
    plain = Collator(dataset.tokenizer.pad_token_id)([{k: v for k, v in dataset[0].items()
                                                         if k != "position_offsets"}])  # fmt: skip
    moved = 0
    for _ in range(20):
        item = dataset[0]
        batch = Collator(dataset.tokenizer.pad_token_id)([item])
        assert torch.equal(batch["input_ids"], plain["input_ids"]) and torch.equal(
            batch["labels"], plain["labels"]
        )
        ids, gap = item["input_ids"], batch["position_ids"][0] - plain["position_ids"][0]
        jumps = (gap[1:] != gap[:-1]).nonzero()[:, 0] + 1
        video_end = item["branch_starts"][0]
        for j in jumps.tolist():
            assert j == video_end or (ids[j - 1] == video_token and ids[j] != video_token), j
        assert (gap[1:] >= gap[:-1]).all() and int(gap[0]) == 0
        assert int(batch["position_ids"].max()) < skip["max_position"]
        moved += bool(jumps.numel())
    assert moved >= 15, f"only {moved} of 20 draws moved any position"
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)
    dataset.settings.position_skip = dict(skip, probability=0.0)
    assert "position_offsets" not in dataset[0]
    with pytest.raises(ConfigError, match="position_skip: expected max_position"):
        DataSettings(datasets=[], position_skip={"max_positions": 10})


def test_rope_encodes_positions_anew_and_keeps_the_prompt_limit(tmp_path, media):
    """`rope:` (the context-extension step): the trained model carries the new RoPE, its rotary tables are
    those transformers builds for it, and its prompt limit stays the one it had."""
    from videoxl2.tiny import build_tiny_model

    rope = dict(rope_type="yarn", rope_theta=10000.0, factor=64.0, original_max_position_embeddings=96)
    rope.update(beta_fast=1.1, beta_slow=1.0, attention_factor=1.0)
    path = write_config(tmp_path, media, max_steps=1)
    raw = yaml.safe_load(path.read_text())
    raw["rope"] = rope
    path.write_text(yaml.safe_dump(raw))
    limit = build_tiny_model(seed=0)[0].config.context_limit
    trained = load_model(train(load_config(path)).output_dir)
    text = trained.config.text_config
    assert text.rope_parameters == rope and text.max_position_embeddings == 64 * 96
    assert trained.config.context_limit == limit
    expected = build_tiny_model(seed=0, text=dict(rope_parameters=rope, max_position_embeddings=64 * 96))[0]
    assert torch.equal(trained.llm.rotary_emb.inv_freq, expected.llm.rotary_emb.inv_freq)
    default = build_tiny_model(seed=0)[0].llm.rotary_emb.inv_freq
    assert not torch.equal(trained.llm.rotary_emb.inv_freq, default)

    raw["rope"] = {"rope_type": "yarn", "rope_theta": 10000.0}  # no factor
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="rope: not a RoPE transformers builds"):
        train(load_config(path))
    raw["rope"] = 5
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="rope must be rope_parameters"):
        load_config(path)
