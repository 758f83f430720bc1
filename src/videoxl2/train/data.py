"""Training data: the release's data YAML and LLaVA-style annotation JSON, laid out exactly as inference does.

A data YAML lists annotation files, each with a sampling rule:

    datasets:
      - json_path: videos.json          # a JSON list (or .jsonl) of samples
        sampling_strategy: random:50%   # all | first:N | end:N | random:N (N a count or P%); P% = random:P%
    video_folder: /data/videos          # roots for relative media paths (default: the JSON's own folder)
    image_folder: /data/images

A sample is `{"id", "video": path | "image": path | neither, "conversations": [{"from": "human"|"gpt",
"value": ...}, ...]}`. Its tokens are the inference layout: `build_prompt`'s ChatML for the first turn,
`build_layout`'s `Time {t}s:` + placeholders for the video, then answers and later turns piece by piece as
`build_prompt` writes them. Only answers and their closing `<|im_end|>\\n` are supervised (the release also
supervises every turn's `<|im_start|>`/`<|im_end|>\\n`, which teaches the model nothing about answers).

With `independent_turns: true` (data settings) every turn of a sample is trained as if it were asked alone:
the media prefix is laid out once and each question + answer follows it as a branch that sees the prefix and
itself only (a tree attention mask, positions restarting after the prefix). One encoding of a video then
trains several single-question answers with exactly the tokens, positions and visibility an inference
question has, and no answer can be copied from another turn.

With `position_skip: {max_position: P, probability: p, cuts: c}` (data settings; PoSE, arXiv 2309.10400) a
video sample is, with probability p, laid out with its position ids pushed apart: at c group boundaries
drawn at random (before a group's time text, or between the last group and the question) every later token
moves up by a random gap, the gaps summing to at most P minus the sample's length. The tokens and the
attention stay the same; the relative distances a question sees reach those of a video of P tokens, which a
model trained on short videos has never met (the bundled demo model names a needle in 100% of 64-frame
haystacks, 30% once a 600-position gap follows the needle).
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import ConfigError, InputError, MediaNotFoundError
from ..prompt import IMAGE_MARKER, build_layout, build_prompt, check_clip_start
from ..video import (
    expand_to_square,
    iter_frame_batches,
    load_image,
    plan_sampling,
    preprocess_frames,
    probe_video,
)

IGNORE_INDEX = -100
_STRATEGY = re.compile(r"^(?:(first|end|random):)?(\d+)(%?)$")
_LIST_LIMIT = 20


@dataclass
class DataSettings:
    """The `data:` section of a training config (or a data YAML): where samples come from, how frames are
    sampled (the release's `video_fps` / `frames_upbound` / `fps_upbound`) and the longest sequence."""

    datasets: list[dict]
    video_folder: Path | None = None
    image_folder: Path | None = None
    video_fps: float | None = 1.0
    frames_upbound: int = 16
    fps_upbound: float | None = None
    model_max_length: int = 8192
    check_media: bool = True  # stat every media file at start (one error listing all missing ones)
    independent_turns: bool = False  # every turn a branch after the media prefix, as if asked alone
    position_skip: dict | None = None  # {max_position, probability, cuts}: PoSE gaps (module notes)

    def __post_init__(self):
        if self.position_skip is not None:
            skip = {"probability": 1.0, "cuts": 2, **self.position_skip}
            unknown = sorted(set(skip) - {"max_position", "probability", "cuts"})
            if unknown or "max_position" not in skip:
                raise ConfigError(
                    f"data.position_skip: expected max_position (and probability, cuts), got {sorted(skip)}"
                )
            if not (0 <= skip["probability"] <= 1 and skip["cuts"] >= 1 and skip["max_position"] > 0):
                raise ConfigError(f"data.position_skip: out of range: {skip}")
            self.position_skip = skip


@dataclass
class Sample:
    id: str
    where: str  # "file.json[index]", for messages
    turns: list[tuple[str, str]]
    video: Path | None = None
    image: Path | None = None
    scale: float = 1.0  # the release's `scale`: multiplies timestamps (synthetic grounding data)
    clip_start: float = 0.0  # seconds added to every timestamp: a clip keeps its source video's times


def read_yaml(path: Path) -> dict:
    try:
        import yaml
    except ImportError as err:
        raise ConfigError("reading training configs needs pyyaml: pip install 'videoxl2[train]'") from err
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError as err:
        raise ConfigError(f"{path}: no such file") from err
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: not readable YAML ({err})") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def sample_records(records, strategy: str, rng: random.Random, where: str) -> list:
    """Apply one sampling rule: `all`, `first:N`, `end:N`, `random:N` (N a count or `P%` of the file)."""
    strategy = str(strategy).strip()
    if strategy == "all":
        return list(records)
    match = _STRATEGY.match(strategy)
    if not match:
        raise ConfigError(
            f"{where}: sampling_strategy {strategy!r} is not all, first:N, end:N, random:N (N a count or P%)"
        )
    kind, number, percent = match.groups()
    count = math.ceil(int(number) * len(records) / 100) if percent else int(number)
    kind = kind or "random"
    if kind == "first":
        return list(records[:count])
    if kind == "end":
        return list(records[-count:]) if count else []
    return rng.sample(list(records), min(count, len(records)))


def read_annotations(path: Path) -> list:
    try:
        text = path.read_text()
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        records = json.loads(text)
    except FileNotFoundError as err:
        raise ConfigError(f"{path}: no such annotation file") from err
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(records, list):
        raise ConfigError(f"{path}: expected a JSON list of samples")
    return records


def parse_turns(conversations, where: str, has_media: bool) -> list[tuple[str, str]]:
    """(question, answer) pairs from LLaVA `conversations`; one `<image>` at most, in the first question."""
    if not isinstance(conversations, list) or not conversations:
        raise InputError(f"{where}: 'conversations' must be a non-empty list")
    if isinstance(conversations[0], dict) and conversations[0].get("from") == "gpt":
        conversations = conversations[1:]  # the release drops a leading answer too
    roles = [c.get("from") if isinstance(c, dict) else None for c in conversations]
    expected = ["human", "gpt"] * (len(conversations) // 2)
    if not roles or roles != expected or any(not isinstance(c.get("value"), str) for c in conversations):
        raise InputError(
            f"{where}: conversations must alternate human/gpt turns with string values, "
            f"starting with human and ending with gpt (got {roles})"
        )
    values = [c["value"] for c in conversations]
    markers = [v.count(IMAGE_MARKER) for v in values]
    if sum(markers) > (1 if has_media else 0) or any(markers[1:]):
        raise InputError(
            f"{where}: {IMAGE_MARKER} may appear once, in the first question, and only with a video or image"
        )
    return list(zip(values[0::2], values[1::2]))


def load_samples(settings: DataSettings, seed: int) -> list[Sample]:
    """Every sample the data settings select, validated; missing media are listed in one error."""
    samples: list[Sample] = []
    for number, spec in enumerate(settings.datasets):
        if not isinstance(spec, dict) or "json_path" not in spec:
            raise ConfigError(f"data: datasets[{number}] needs a json_path")
        path = Path(spec["json_path"])
        records = read_annotations(path)
        rng = random.Random(f"{seed}/{number}")
        chosen = sample_records(range(len(records)), spec.get("sampling_strategy", "all"), rng, f"{path}")
        for index in chosen:
            samples.append(make_sample(records[index], f"{path}[{index}]", path.parent, settings))
    if not samples:
        raise ConfigError("data: the datasets select no samples")
    if not settings.check_media:
        return samples
    media = {p for s in samples for p in (s.video, s.image) if p is not None}
    missing = sorted(str(p) for p in media if not p.is_file())
    if missing:
        more = f" ... and {len(missing) - _LIST_LIMIT} more" if len(missing) > _LIST_LIMIT else ""
        raise MediaNotFoundError(
            f"data: {len(missing)} media files not found: {', '.join(missing[:_LIST_LIMIT])}{more}"
        )
    return samples


def make_sample(record, where: str, json_folder: Path, settings: DataSettings) -> Sample:
    if not isinstance(record, dict):
        raise InputError(f"{where}: a sample must be a JSON object")
    media = {}
    for key, root in (("video", settings.video_folder), ("image", settings.image_folder)):
        value = record.get(key)
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if value is None:
            continue
        if not isinstance(value, str):
            raise InputError(f"{where}: '{key}' must be one path (several per sample are not supported)")
        media[key] = Path(root or json_folder) / value
    if len(media) > 1:
        raise InputError(f"{where}: a sample has a video or an image, not both")
    turns = parse_turns(record.get("conversations"), where, bool(media))
    clip_start = check_clip_start(record.get("clip_start", 0.0), where)
    scale = float(record.get("scale", 1.0))
    return Sample(str(record.get("id", where)), where, turns, scale=scale, clip_start=clip_start, **media)


def encode_sample(
    tokenizer, turns: list[tuple[str, str]], group_seconds: list[float] | None, config
) -> tuple[list[int], list[int], int]:
    """Token ids, labels and the end of the video part (0 without one) of a conversation.

    The first turn is `build_layout(build_prompt(question))`: byte for byte what `VideoSession` feeds the
    model. Answers are tokenised on their own, as the release does and as generation produces them.
    """

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    prompt = build_prompt(turns[0][0])
    if group_seconds is None:
        before, after = prompt.split(IMAGE_MARKER)
        ids, video_end = encode(before + after.removeprefix("\n")), 0
    else:
        layout = build_layout(
            tokenizer, prompt, group_seconds, config.tokens_per_group, config.video_token_id
        )
        ids, video_end = layout.input_ids.tolist(), layout.video_end
    labels = [IGNORE_INDEX] * len(ids)
    closing = encode("<|im_end|>\n")
    for number, (_, answer) in enumerate(turns):
        if number:
            # The next user turn exactly as build_prompt writes it after the history so far.
            (question, previous), history = turns[number - 1], turns[: number - 1]
            done = build_prompt(question, history) + f"{previous}<|im_end|>\n"
            piece = encode(build_prompt(turns[number][0], turns[:number])[len(done) :])
            ids += piece
            labels += [IGNORE_INDEX] * len(piece)
        answer_ids = encode(answer) + closing
        ids += answer_ids
        labels += answer_ids
    return ids, labels, video_end


def encode_branches(
    tokenizer, turns: list[tuple[str, str]], group_seconds: list[float] | None, config
) -> tuple[list[int], list[int], list[int]]:
    """Token ids, labels and branch starts of a conversation whose turns are independent questions.

    `ids[:starts[0]]` is the shared prefix (system prompt, user tag and the video: everything before the
    text that follows `<image>`); branch `i` runs from `starts[i]` to the next start and holds question `i`
    and its answer with the tokens a single-question prompt gives them (`build_layout`'s suffix, as
    `VideoSession` feeds it). A one-turn conversation is the plain `encode_sample` with one branch.
    """

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    if len(turns) == 1:  # one branch: plain causal attention over the plain encoding
        ids, labels, video_end = encode_sample(tokenizer, turns, group_seconds, config)
        return ids, labels, [video_end]
    before = build_prompt(turns[0][0]).split(IMAGE_MARKER)[0]
    if group_seconds is None:
        ids = encode(before)
    else:
        ids = build_layout(tokenizer, before + IMAGE_MARKER, group_seconds, config.tokens_per_group,
                           config.video_token_id).input_ids.tolist()  # fmt: skip
    labels = [IGNORE_INDEX] * len(ids)
    closing, starts = encode("<|im_end|>\n"), []
    for question, answer in turns:
        after = build_prompt(question).split(IMAGE_MARKER)[1]
        piece = encode(after if group_seconds is not None else after.removeprefix("\n"))
        answer_ids = encode(answer) + closing
        starts.append(len(ids))
        ids += piece + answer_ids
        labels += [IGNORE_INDEX] * len(piece) + answer_ids
    return ids, labels, starts


def branch_ids(length: int, starts: list[int] | None) -> torch.Tensor:
    """Per token: -1 in the shared prefix (or everywhere for a plain conversation), else its branch."""
    out = torch.full((length,), -1, dtype=torch.long)
    for number, start in enumerate(starts or []):
        out[start:] = number
    return out


class SupervisedDataset(torch.utils.data.Dataset):
    """Samples decoded on access: frames sampled as at inference, preprocessed for SigLIP, tokenised."""

    def __init__(self, samples: list[Sample], tokenizer, config, settings: DataSettings, feature_store=None):
        self.samples = samples
        self.tokenizer = tokenizer
        self.config = config
        self.settings = settings
        self.feature_store = feature_store  # a FeatureStore: stored frozen-side features replace decoding

    def __len__(self) -> int:
        return len(self.samples)

    def plan(self, sample: Sample):
        """The frames a video sample will use (read from the container's header, nothing decoded)."""
        s = self.settings
        info = probe_video(sample.video)
        return plan_sampling(info.num_frames, info.avg_fps, s.frames_upbound, s.video_fps, s.fps_upbound)

    def group_seconds(self, sample: Sample, plan) -> list[float]:
        return [
            t * sample.scale + sample.clip_start for t in plan.timestamps[:: self.config.frames_per_group]
        ]

    def frames(self, sample: Sample, plan=None) -> tuple[torch.Tensor | None, list[float] | None]:
        """Preprocessed frames and group start times; a still image is one frame at 0 s (padded to 4)."""
        size = self.config.vision_config.image_size
        if sample.image is not None:
            return preprocess_frames(expand_to_square(load_image(sample.image))[None], image_size=size), [0.0]
        if sample.video is None:
            return None, None
        plan = plan or self.plan(sample)
        # Preprocess batch by batch: raw frames of a long high-resolution video would not fit in memory.
        batches = iter_frame_batches(sample.video, plan.indices)
        pixels = torch.cat([preprocess_frames(batch, image_size=size) for batch in batches])
        return pixels, self.group_seconds(sample, plan)

    def stored(self, sample: Sample) -> tuple[str | None, torch.Tensor | None, list[float] | None, object]:
        """(store key, stored features or None, group times, frame plan) of a media sample; no decoding."""
        if self.feature_store is None or (sample.video is None and sample.image is None):
            return None, None, None, None
        plan = self.plan(sample) if sample.video is not None else None
        key = self.feature_store.key(
            sample.video or sample.image, plan.indices if plan else [0], self.config.vision_config.image_size
        )
        seconds = self.group_seconds(sample, plan) if plan else [0.0]
        return key, self.feature_store.get(key), seconds, plan

    def lengths(self) -> list[int]:
        """Every sample's token count, without decoding a frame: what `group_by_length` sorts batches by, so
        a batch of short videos is not padded to a long one's length (padding is most of the LLM's work
        when lengths vary 12x, as in the demo model's data)."""
        out = []
        for sample in tqdm(self.samples, desc="sample lengths", unit="sample", leave=False):
            if sample.image is not None:
                seconds = [0.0]
            elif sample.video is not None:
                seconds = self.group_seconds(sample, self.plan(sample))
            else:
                seconds = None
            ids = self.encode(sample, seconds)[0]
            out.append(min(len(ids), self.settings.model_max_length))
        return out

    def encode(self, sample: Sample, seconds) -> tuple[list[int], list[int], int, list[int] | None]:
        """(ids, labels, end of the video part, branch starts or None) as the settings lay turns out."""
        if not self.settings.independent_turns:
            return (*encode_sample(self.tokenizer, sample.turns, seconds, self.config), None)
        ids, labels, starts = encode_branches(self.tokenizer, sample.turns, seconds, self.config)
        return ids, labels, starts[0] if seconds is not None else 0, starts

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        key, features, seconds, plan = self.stored(sample)
        pixels = None
        if features is None:
            pixels, seconds = self.frames(sample, plan)
        ids, labels, video_end, starts = self.encode(sample, seconds)
        limit = self.settings.model_max_length
        if len(ids) > limit:
            # Cut the tail only: a cut inside the video would orphan visual embeddings.
            if video_end > limit or all(x == IGNORE_INDEX for x in labels[:limit]):
                raise InputError(
                    f"{sample.where} (id {sample.id}): {len(ids)} tokens, over model_max_length {limit} "
                    "before the first answer: lower frames_upbound or raise model_max_length"
                )
            ids, labels = ids[:limit], labels[:limit]
            starts = None if starts is None else [s for s in starts if s < limit]
        item = {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "pixel_values": pixels,
        }
        if starts is not None:
            item["branch_starts"] = starts
        if self.settings.position_skip is not None and seconds is not None:
            offsets = position_gaps(ids, video_end, self.config.video_token_id, self.settings.position_skip)
            if offsets is not None:
                item["position_offsets"] = offsets
        if key is not None:
            item.update(feature_key=key, visual_features=features)
        return item


def position_gaps(ids: list[int], video_end: int, video_token_id: int, skip: dict) -> torch.Tensor | None:
    """Per-token position offsets of one PoSE draw (module notes), or None when this sample is left as it is.
    Cuts fall where a group's time text begins (the token after a run of visual placeholders: groups 2 on)
    or at the video's end; drawn with torch's generator, which the data loader seeds."""
    if float(torch.rand(())) >= skip["probability"]:
        return None
    visual = torch.tensor(ids[:video_end]) == video_token_id
    if not bool(visual.any()):
        return None
    ends = (visual[:-1] & ~visual[1:]).nonzero()[:, 0] + 1  # first token after each visual run
    boundaries = torch.cat([ends, torch.tensor([video_end])]).unique()
    room = int(skip["max_position"]) - len(ids)
    if room <= 0:
        return None
    cuts = boundaries[torch.randint(len(boundaries), (int(skip["cuts"]),))]
    gaps = torch.randint(room + 1, (int(skip["cuts"]),))
    gaps = (gaps.float() * room / max(int(gaps.sum()), room)).long()  # the sum stays within room
    offsets = torch.zeros(len(ids), dtype=torch.long)
    for cut, gap in zip(cuts.tolist(), gaps.tolist()):
        offsets[cut:] += gap
    return offsets


@dataclass
class Collator:
    """Right-pads a batch; `pixel_values` is the list of per-sample frame tensors in row order (text-only
    rows have none), which is what `VideoXL2ForCausalLM.forward` expects. With a feature store the media
    rows also give `feature_keys` and `visual_features` (None where not stored yet, frames given instead),
    which the trainer completes and stores before the forward.

    Items with `branch_starts` (independent turns) make the batch carry a 4-D boolean attention mask
    (batch, 1, L, L; True = may attend) and `position_ids`: a branch token sees the shared prefix and the
    earlier tokens of its own branch, and its positions continue from the prefix's end. Padding sees only
    padding (a query that sees nothing would make the attention NaN)."""

    pad_token_id: int

    def __call__(self, items: list[dict]) -> dict:
        length = max(len(item["input_ids"]) for item in items)
        ids = torch.full((len(items), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(items), length), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            ids[row, :n], labels[row, :n], mask[row, :n] = item["input_ids"], item["labels"], 1
        batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        if any("branch_starts" in item for item in items):
            batch.update(self.branch_masks(items, length))
        if any("position_offsets" in item for item in items):
            positions = batch.get("position_ids", torch.arange(length).repeat(len(items), 1))
            for row, item in enumerate(items):
                if "position_offsets" in item:
                    positions[row, : len(item["position_offsets"])] += item["position_offsets"]
            batch["position_ids"] = positions
        media = [i for i in items if (i.get("pixel_values"), i.get("visual_features")) != (None, None)]
        if any("feature_key" in item for item in media):
            batch["feature_keys"] = [item["feature_key"] for item in media]
            batch["visual_features"] = [item["visual_features"] for item in media]
            batch["pixel_values"] = [item["pixel_values"] for item in media]
        elif media:
            batch["pixel_values"] = [item["pixel_values"] for item in media]
        return batch

    @staticmethod
    def branch_masks(items: list[dict], length: int) -> dict:
        masks = torch.zeros((len(items), 1, length, length), dtype=torch.bool)
        positions = torch.arange(length).repeat(len(items), 1)
        causal = torch.ones((length, length), dtype=torch.bool).tril()
        for row, item in enumerate(items):
            n, starts = len(item["input_ids"]), item.get("branch_starts") or []
            branch = torch.full((length,), -2, dtype=torch.long)  # -2: padding
            branch[:n] = branch_ids(n, starts)
            masks[row, 0] = causal & ((branch[None, :] == -1) | (branch[None, :] == branch[:, None]))
            masks[row, 0, n:, :n] = False
            for start, end in zip(starts, [*starts[1:], n]):
                positions[row, start:end] = torch.arange(end - start) + starts[0]
        return {"attention_mask": masks, "position_ids": positions}
