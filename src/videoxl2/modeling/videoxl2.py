"""VideoXL2ForCausalLM: SigLIP -> DTS -> projector+pool -> Qwen2, as one transformers model.

Every piece is a stock or small module; this file only wires them. Frames become visual embeddings group by
group (4 frames -> `config.tokens_per_group` embeddings), and those embeddings replace the placeholder ids in
the token stream before the language model runs. Groups are independent through the whole visual path, so a
long video can be encoded in any batches and the result is the same.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel, Qwen2ForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..config import VideoXL2Config
from ..errors import InputError
from .dts import DynamicTokenSynthesis, group_frames
from .projector import VisionProjector
from .vision import build_vision_tower, resize_grid, siglip_features


class VideoXL2ForCausalLM(PreTrainedModel):
    config_class = VideoXL2Config
    base_model_prefix = ""
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Qwen2DecoderLayer", "SiglipEncoderLayer"]
    _supports_sdpa = True
    # The eval code of the release builds an unused `text_mlp`; a checkpoint may carry it.
    _keys_to_ignore_on_load_unexpected = [r"^text_mlp\."]

    def __init__(self, config: VideoXL2Config):
        super().__init__(config)
        vision = config.vision_config
        self.vision_tower = build_vision_tower(vision)
        self.dts = DynamicTokenSynthesis(
            vision.hidden_size,
            frames=config.frames_per_group,
            max_relative_position=config.dts_max_relative_position,
        )
        self.projector = VisionProjector(
            vision.hidden_size, config.hidden_size, config.vision_grid, config.pool_stride
        )
        self.language_model = Qwen2ForCausalLM(config.text_config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Sub-models initialise themselves; DTS and projector keep PyTorch's defaults."""

    # -- transformers plumbing ------------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Embedding:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Linear:
        return self.language_model.get_output_embeddings()

    @property
    def llm(self) -> nn.Module:
        """The Qwen2 decoder stack (embeddings, layers, final norm), for the engine; through a peft wrapper
        (training with `lora:`) too, whose own `.model` is the whole causal LM."""
        language_model = self.language_model
        if hasattr(language_model, "get_base_model"):
            language_model = language_model.get_base_model()
        return language_model.model

    # -- the visual path ------------------------------------------------------------------------------
    def pad_frames(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Repeat the last frame up to a multiple of 4 (a still image becomes 4 identical frames).

        The release pads in its chunked paths but trims in its plain path; we pad everywhere so one video
        always gives the same tokens.
        """
        if pixel_values.ndim != 4:
            raise InputError(f"pixel_values must be (frames, 3, H, W), got shape {tuple(pixel_values.shape)}")
        frames = pixel_values.shape[0]
        if frames == 0:
            raise InputError("no frames to encode")
        missing = -frames % self.config.frames_per_group
        if missing:
            pixel_values = torch.cat([pixel_values, pixel_values[-1:].expand(missing, -1, -1, -1)])
        return pixel_values

    def encode_video(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(F, 3, S, S) preprocessed frames -> (ceil(F/4), tokens_per_group, hidden) visual embeddings."""
        return self.project(self.visual_features(pixel_values))

    def visual_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(F, 3, S, S) frames -> (ceil(F/4), grid tokens, vision hidden): vision tower and DTS, before the
        projector. Separate so training with both frozen can store these once per video (`feature_cache`)."""
        config = self.config
        size = config.vision_config.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            raise InputError(
                f"pixel_values must be (frames, 3, {size}, {size}), got {tuple(pixel_values.shape)}"
            )
        pixel_values = self.pad_frames(pixel_values)
        maps = []
        for start in range(0, pixel_values.shape[0], config.vision_batch_size):
            batch = pixel_values[start : start + config.vision_batch_size]
            features = siglip_features(self.vision_tower, batch)
            maps.append(resize_grid(features, config.vision_grid))
        groups = group_frames(torch.cat(maps), config.frames_per_group)
        return torch.cat(
            [
                self.dts(groups[start : start + config.dts_batch_size])
                for start in range(0, groups.shape[0], config.dts_batch_size)
            ]
        )

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """`visual_features` output -> visual embeddings in the LLM's width and dtype."""
        step = self.config.dts_batch_size
        out = [self.projector(features[start : start + step]) for start in range(0, features.shape[0], step)]
        return torch.cat(out).to(self.get_input_embeddings().weight.dtype)

    def embed_inputs(self, input_ids: torch.Tensor, video_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with the placeholder rows replaced by visual embeddings, in order."""
        embeds = self.get_input_embeddings()(input_ids)
        slots = input_ids == self.config.video_token_id
        needed = int(slots.sum())
        given = 0 if video_embeds is None else video_embeds.shape[0] * video_embeds.shape[1]
        if needed != given:
            raise InputError(
                f"input has {needed} visual placeholder tokens but {given} visual embeddings were given"
            )
        if needed:
            embeds = embeds.masked_scatter(slots.unsqueeze(-1), video_embeds.to(embeds.dtype).reshape(-1))
        return embeds

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | list[torch.Tensor] | None = None,
        video_embeds: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        visual_features: list[torch.Tensor] | None = None,
        **kwargs,
    ):
        """Plain causal forward over a full sequence (training, the dense reference).

        `pixel_values` (frames of one video, or a list with one entry per video of the batch, in row order)
        or ready `video_embeds` fill the placeholder positions of `input_ids`, row by row. `visual_features`
        (one `visual_features` output per video, in row order) stand for frames whose vision side is frozen:
        only the projector runs on them.
        Everything else (`attention_mask`, `position_ids`, `past_key_values`, `labels`, ...) goes to Qwen2; a
        4-D boolean `attention_mask` (custom visibility, True = may attend) is made additive first. A training
        forward with `labels` scores only the labelled positions (`scored_loss`).
        """
        if inputs_embeds is None:
            if input_ids is None:
                raise InputError("give input_ids or inputs_embeds")
            if video_embeds is None and visual_features is not None:
                video_embeds = torch.cat([self.project(features) for features in visual_features])
            elif video_embeds is None and pixel_values is not None:
                videos = pixel_values if isinstance(pixel_values, (list, tuple)) else [pixel_values]
                video_embeds = torch.cat([self.encode_video(frames) for frames in videos])
            inputs_embeds = self.embed_inputs(input_ids, video_embeds)
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.ndim == 4 and mask.dtype == torch.bool:
            kwargs["attention_mask"] = self.additive_mask(mask, inputs_embeds.dtype)
        if kwargs.get("labels") is not None and self.training and torch.is_grad_enabled():
            return self.scored_loss(inputs_embeds, **kwargs)
        return self.language_model(inputs_embeds=inputs_embeds, **kwargs)

    def scored_loss(self, inputs_embeds: torch.Tensor, labels: torch.Tensor, **kwargs):
        """Qwen2's causal-LM loss with the LM head run on the labelled positions only.

        Visual and prompt tokens carry no label, yet a plain forward projects every one of them onto the
        vocabulary: (batch, length, vocab) logits, gigabytes at the released 151k vocabulary and a long video.
        The loss (and so every gradient) is the same; `logits` holds the scored rows only, (scored, vocab).
        """
        targets = nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
        scored = targets != -100
        hidden = self.llm(inputs_embeds=inputs_embeds, **kwargs).last_hidden_state
        logits = self.get_output_embeddings()(hidden[scored])
        loss = self.language_model.loss_function(
            logits=logits,
            labels=None,
            shift_labels=targets[scored],
            vocab_size=self.config.text_config.vocab_size,
            **kwargs,
        )
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def additive_mask(self, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A custom (batch, 1, L, L) boolean mask (True = may attend; training's independent turns) as the
        additive float mask that transformers' eager and SDPA attention both take as given."""
        if self.config.text_config._attn_implementation not in ("eager", "sdpa"):
            raise InputError(
                "a 4-D attention mask (independent turns) needs attn_implementation eager or sdpa, not "
                f"{self.config.text_config._attn_implementation}"
            )
        blocked = torch.finfo(dtype).min
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, blocked)

    # -- the seed API ---------------------------------------------------------------------------------
    def chat(
        self,
        video_path,
        tokenizer,
        question: str,
        chat_history=None,
        return_history: bool = False,
        max_num_frames: int = 512,
        sample_fps: float | None = 1,
        max_sample_fps: float | None = None,
        generation_config: dict | None = None,
    ):
        """Answer `question` about a video (or image) file, as the release's remote code does.

        The engine mode comes from the config (`engine_mode`, or the seed's `enable_sparse` /
        `enable_chunk_prefill` switches). With `return_history=True` returns (answer, history) where history
        is the list of (question, answer) pairs to pass back as `chat_history`.
        """
        from ..engine.session import VideoSession

        session = VideoSession.from_path(
            self,
            tokenizer,
            video_path,
            max_num_frames=max_num_frames,
            sample_fps=sample_fps,
            max_sample_fps=max_sample_fps,
        )
        answer = session.ask(question, history=chat_history, generation_config=generation_config)
        if return_history:
            from ..prompt import normalize_history

            return answer.text, [*normalize_history(chat_history), (question, answer.text)]
        return answer.text
