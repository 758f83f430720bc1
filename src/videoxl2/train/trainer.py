"""Fine-tuning with the stock HF Trainer: model set-up, freeze policy, optional LoRA, final save.

Distribution, mixed precision, DeepSpeed, checkpoints and resuming are the Trainer's own; this file only
decides what the model is, which parts train, and that the output is a folder `load_model` reads.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError
from .config import TrainConfig
from .data import Collator, SupervisedDataset, load_samples

PART_MODULES = {"vision": "vision_tower", "dts": "dts", "projector": "projector", "llm": "language_model"}


@dataclass
class TrainResult:
    model: torch.nn.Module  # the trained model, as saved
    output_dir: Path
    steps: int
    seconds: float
    losses: list[float]
    log_history: list[dict]
    trainable_params: dict[str, int]
    main_process: bool  # global rank 0, the one that reports

    def summary(self) -> str:
        loss = f"loss {self.losses[0]:.4f} -> {self.losses[-1]:.4f}" if self.losses else "no loss logged"
        return f"trained {self.steps} steps in {self.seconds:.1f}s, {loss}; model saved to {self.output_dir}"


def build_model(config: TrainConfig, seed: int):
    """(model, tokenizer): a checkpoint folder, or a fresh tiny model seeded by `seed`."""
    from .. import load_model, load_tokenizer
    from ..errors import CheckpointError

    dtype = getattr(torch, config.model_dtype)
    overrides = config.tiny_overrides
    if overrides is None:
        path = Path(config.model)
        if not path.is_dir():
            raise CheckpointError(f"{config.source}: model {path} is not a checkpoint folder")
        # No device placement: the Trainer (or DeepSpeed ZeRO-3, partitioned) places the model.
        model = load_model(path, device=None, dtype=dtype)
        if config.rope is not None:
            set_rope(model, config.rope, f"{config.source}: rope")
        return model, load_tokenizer(config.tokenizer or path)
    from ..tiny import build_tiny_model
    from ..tokenizer import build_tiny_tokenizer

    tokenizer = load_tokenizer(config.tokenizer) if config.tokenizer else build_tiny_tokenizer()
    try:
        # Standard init unless the config says otherwise: the tests' wide init is no start for training.
        model, _ = build_tiny_model(seed, tokenizer, **{"init_std": None, **overrides})
    except TypeError as err:
        raise ConfigError(f"{config.source}: model.tiny: {err}") from err
    if config.rope is not None:
        set_rope(model, config.rope, f"{config.source}: rope")
    return model.to(dtype), tokenizer


def set_rope(model, rope: dict, where: str) -> None:
    """Encode the LLM's positions anew, weights unchanged: the context-extension step (e.g. YaRN after a
    short-context stage). The model keeps its prompt limit (`max_context_tokens`); YaRN's
    `max_position_embeddings` becomes factor x original, the ratio transformers expects of it."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    config, text = model.config, model.config.text_config
    limit, old = config.context_limit, (text.rope_parameters, text.max_position_embeddings)
    text.rope_parameters = dict(rope)
    if rope.get("factor") and rope.get("original_max_position_embeddings"):
        text.max_position_embeddings = int(rope["factor"] * rope["original_max_position_embeddings"])
    try:
        rotary = Qwen2RotaryEmbedding(config=text)
    except (KeyError, TypeError, ValueError) as err:
        text.rope_parameters, text.max_position_embeddings = old
        raise ConfigError(f"{where}: not a RoPE transformers builds ({type(err).__name__}: {err})") from err
    config.max_context_tokens = limit
    device = model.llm.rotary_emb.inv_freq.device
    model.llm.rotary_emb = rotary.to(device)


def set_trainable(model, trainable: dict[str, bool]) -> dict[str, int]:
    """Freeze or unfreeze each part; returns the trainable parameter count per part."""
    for part, name in PART_MODULES.items():
        getattr(model, name).requires_grad_(trainable[part])
    return {
        part: sum(p.numel() for p in getattr(model, name).parameters() if p.requires_grad)
        for part, name in PART_MODULES.items()
    }


def add_lora(model, lora: dict) -> None:
    """Wrap the LLM (only) in peft LoRA adapters: its base weights freeze, other parts keep their policy."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise ConfigError("lora needs peft: pip install 'videoxl2[train]'") from err
    settings = LoraConfig(
        r=int(lora["r"]),
        lora_alpha=lora["alpha"],
        lora_dropout=float(lora["dropout"]),
        target_modules=lora["target_modules"],
    )
    model.language_model = get_peft_model(model.language_model, settings)


def training_arguments(config: TrainConfig, has_text_only: bool):
    from transformers import TrainingArguments

    values = dict(config.training)
    # Columns must reach the model untouched (forward takes **kwargs, so the Trainer would drop `labels`).
    values.update(remove_unused_columns=False, label_names=["labels"])
    if has_text_only and any(config.trainable[p] for p in ("vision", "dts", "projector")):
        # A text-only batch leaves the visual parts without gradients, which DDP refuses unless told.
        values.setdefault("ddp_find_unused_parameters", True)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        # Under torchrun without GPUs the Trainer joins the ranks (DDP, gloo) only when told it runs on CPU;
        # otherwise every rank silently trains a copy of its own on all the data.
        values.setdefault("use_cpu", True)
    try:
        return TrainingArguments(**values)
    except ImportError as err:  # e.g. `deepspeed:` without the deepspeed package
        raise ConfigError(f"{config.source}: training: a package is missing: {err}") from err
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{config.source}: training: {err}") from err


def resume_checkpoint(resume: bool | str | None, output_dir: str) -> str | None:
    """The checkpoint folder to resume from: True means the latest `checkpoint-N` in output_dir."""
    from transformers.trainer_utils import get_last_checkpoint

    if not resume:
        return None
    if resume is True:
        found = get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None
        if found is None:
            raise ConfigError(f"cannot resume: no checkpoint-N folder in {output_dir}")
        return found
    if not Path(resume).is_dir():
        raise ConfigError(f"cannot resume: {resume} is not a checkpoint folder")
    return str(resume)


def part_trainer_class():
    """The stock Trainer, with one optimizer group per (part, weight decay) so parts can have own rates."""
    from transformers import Trainer

    class PartTrainer(Trainer):
        def __init__(self, *args, part_rates=None, feature_store=None, haystacks=None, **kwargs):
            self.part_rates = dict(part_rates or {})
            self.feature_store = feature_store
            self.haystacks = haystacks  # train/haystack.py's pool: its needle loss joins every micro-batch's
            self.needle_losses: list[float] = []
            self.needle_step, self.micro_batches = -1, 0  # the step being drawn, its micro-batches so far
            super().__init__(*args, **kwargs)

        def compute_loss(self, model, inputs, *args, **kwargs):
            keys = inputs.pop("feature_keys", None)
            if keys is not None:
                inputs["visual_features"] = self.complete_features(
                    model, keys, inputs.pop("visual_features"), inputs.pop("pixel_values")
                )
            loss = super().compute_loss(model, inputs, *args, **kwargs)
            if self.haystacks is None or not model.training:
                return loss
            if self.state.global_step < self.haystacks.settings.start_step:
                return loss
            return loss + self.needle_term(kwargs.get("num_items_in_batch"))

        def needle_term(self, num_items_in_batch):
            """This micro-batch's share of the step's needle samples (a step's parts are its micro-batches
            on every rank), weighted so that a step adds `weight` x their mean loss to the Trainer's loss,
            however the Trainer scales for accumulation and DDP averages over ranks."""
            from .haystack import split_evenly

            settings, parts = self.haystacks.settings, self.current_gradient_accumulation_steps
            step, world = self.state.global_step, self.args.world_size
            if step != self.needle_step:
                self.needle_step, self.micro_batches = step, 0
            part = self.micro_batches * world + self.args.process_index
            self.micro_batches += 1
            count = split_evenly(settings.needles_per_step, parts * world, part)
            if count == 0:
                return 0.0
            term = self.haystacks.loss(count, step, part)
            self.needle_losses.append(float(term.detach()))
            term = term * settings.weight * count * world / settings.needles_per_step
            # The Trainer divides the loss by the accumulation steps unless the model normalised it itself.
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                self.compute_loss_func is not None
            )
            return term * parts if not scaled else term

        def log(self, logs: dict, *args, **kwargs):
            if self.haystacks is not None and "loss" in logs:  # the same steps on every rank
                mean = self.mean_needle_loss()
                if mean is not None:
                    logs["needle_loss"] = round(mean, 4)
            return super().log(logs, *args, **kwargs)

        def mean_needle_loss(self) -> float | None:
            """The needle loss since the last log over every rank's needles: each rank draws its own, and
            the log is rank 0's, like the Trainer's `loss` (which it gathers the same way)."""
            import torch

            total = torch.tensor([sum(self.needle_losses), len(self.needle_losses)], dtype=torch.float64)
            self.needle_losses = []
            if self.args.world_size > 1:
                torch.distributed.all_reduce(total)
            return float(total[0] / total[1]) if total[1] else None

        def complete_features(self, model, keys, features, pixels) -> list:
            """Stored features as they are; the others computed from their frames (frozen parts, no
            gradient) and stored for the next visit."""
            inner = self.accelerator.unwrap_model(model)
            reference = next(inner.projector.parameters())
            out = []
            for key, stored, frames in zip(keys, features, pixels):
                if stored is None:
                    with torch.no_grad():
                        stored = inner.visual_features(frames)
                    self.feature_store.put(key, stored)
                out.append(stored.to(reference.device, reference.dtype))
            return out

        def _get_train_sampler(self, train_dataset=None):
            # The stock length-aware samplers would decode every video to measure it; our dataset gives the
            # lengths from the containers' headers instead.
            dataset = self.train_dataset if train_dataset is None else train_dataset
            strategy = self.args.train_sampling_strategy
            if strategy not in ("group_by_length", "batch_rebalance") or not hasattr(dataset, "lengths"):
                return super()._get_train_sampler(train_dataset)
            from transformers.trainer_pt_utils import BatchRebalanceSampler, LengthGroupedSampler

            args = self.args
            if strategy == "group_by_length":
                return LengthGroupedSampler(
                    args.train_batch_size * args.gradient_accumulation_steps, lengths=dataset.lengths()
                )
            # Each optimizer step still draws a uniform random set of samples; only its split into
            # micro-batches follows length. With the loss summed over the step's answer tokens
            # (`num_items_in_batch`) the update is the one random batches give, with less padding.
            world = max(1, args.world_size)
            return BatchRebalanceSampler(
                lengths=dataset.lengths(),
                effective_batch_size=args.train_batch_size * args.gradient_accumulation_steps * world,
                dp_size=world,
                grad_accum=args.gradient_accumulation_steps,
                seed=args.data_seed if args.data_seed is not None else args.seed,
                rank=args.process_index if world > 1 else 0,
                drop_last=args.dataloader_drop_last,
            )

        def create_optimizer(self, model=None):
            if self.optimizer is not None or not self.part_rates:
                return super().create_optimizer(model)
            model = self.model if model is None else model
            decay = set(self.get_decay_parameter_names(model))
            groups: dict[tuple[str, bool], list] = {}
            for name, param in model.named_parameters():
                if param.requires_grad:
                    part = next((p for p, m in PART_MODULES.items() if name.startswith(m + ".")), "llm")
                    groups.setdefault((part, name in decay), []).append(param)
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            base = kwargs.pop("lr", self.args.learning_rate)
            self.optimizer = cls(
                [
                    {
                        "params": params,
                        "lr": self.part_rates.get(part, base),
                        "weight_decay": self.args.weight_decay if decays else 0.0,
                    }
                    for (part, decays), params in groups.items()
                ],
                lr=base,
                **kwargs,
            )
            return self.optimizer

    return PartTrainer


def train(config: TrainConfig, resume: bool | str | None = None) -> TrainResult:
    """Run the Trainer; `resume` is True (latest checkpoint in output_dir) or a checkpoint folder."""
    from transformers import set_seed

    seed = int(config.training.get("seed", 42))
    samples = load_samples(config.data, seed)
    args = training_arguments(config, any(s.video is None and s.image is None for s in samples))
    checkpoint = resume_checkpoint(resume, args.output_dir)  # before loading weights: fail fast
    set_seed(args.seed)
    model, tokenizer = build_model(config, args.seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad == model.config.video_token_id:
        raise ConfigError("the tokenizer pads with the visual placeholder id; give it another pad token")
    counts = set_trainable(model, config.trainable)
    if config.lora:
        add_lora(model, config.lora)
        counts["llm"] = sum(p.numel() for p in model.language_model.parameters() if p.requires_grad)
    store = None
    if config.feature_cache is not None:
        from .features import FeatureStore, frozen_fingerprint

        store = FeatureStore(config.feature_cache, frozen_fingerprint(model))
    dataset = SupervisedDataset(samples, tokenizer, model.config, config.data, feature_store=store)
    haystacks = None  # pre-filled inside trainer.train (at `start_step`), so its time is training time
    if config.haystacks is not None:
        from .haystack import HaystackPool

        haystacks = HaystackPool(
            model, tokenizer, config.haystacks, rank=args.process_index, world=args.world_size
        )
    trainer = part_trainer_class()(
        part_rates=config.learning_rates,
        feature_store=store,
        haystacks=haystacks,
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=Collator(pad),
        processing_class=tokenizer,
    )
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=checkpoint)
    seconds = time.perf_counter() - start
    if config.lora:
        model.language_model = model.language_model.merge_and_unload()
    trainer.save_model(args.output_dir)
    history = trainer.state.log_history
    return TrainResult(
        model=model,
        output_dir=Path(args.output_dir),
        steps=trainer.state.global_step,
        seconds=seconds,
        losses=[entry["loss"] for entry in history if "loss" in entry],
        log_history=history,
        trainable_params=counts,
        main_process=trainer.is_world_process_zero(),
    )
