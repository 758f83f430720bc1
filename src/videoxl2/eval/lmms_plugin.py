"""lmms-eval model plugin, registered through lmms-eval's own `lmms_eval.models` entry point (no fork):

    pip install videoxl2 lmms-eval
    python -m lmms_eval --model videoxl2 \\
        --model_args pretrained=/path/Video-XL-2,max_frames_num=400,fps=1,max_fps=4,mode=bilevel \\
        --tasks videomme --batch_size 1

Model args: pretrained (checkpoint folder), device (default: this process's GPU, else cpu), dtype,
quantize=int8|int4 and quantize_vision=true (weight-only, through torchao; see docs/gpu.md),
device_map=auto|sequential|<JSON file> and offload_folder (weights spread or offloaded by accelerate),
max_frames_num / fps / max_fps (frame sampling), mode / block_size / prev_blocks / unit_size / topk /
compression / rerotate / offload / kv_dtype (engine; kv_dtype=int8: the int8 video memory). Like the
release's own wrapper, generation stops at <|im_end|> and ignores the task's `until` strings. Questions
about the same video share one pre-fill.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from loguru import logger
from tqdm.auto import tqdm

from ..errors import InputError

DEFAULT_MAX_NEW_TOKENS = 1024  # the release's wrapper, when a task sets none


def manifest():
    """The entry point's payload: `videoxl2` names the class below."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="videoxl2", simple_class_path=f"{__name__}.VideoXL2")


def _flag(name: str, value) -> bool:
    """A boolean model arg as lmms-eval passes it (a bool, or text such as "False")."""
    text = str(value).strip().lower()
    if text in ("1", "true", "yes"):
        return True
    if text in ("0", "false", "no"):
        return False
    raise InputError(f"model arg {name} must be true or false, got {value!r}")


class VideoXL2(lmms):
    """Video-XL-2 for lmms-eval's simple (doc_to_visual) tasks: one video or image(s) per question."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        dtype: str | None = None,
        quantize: str | None = None,
        quantize_vision: bool | str = False,
        device_map: str | None = None,
        offload_folder: str | None = None,
        max_frames_num: int = 512,
        fps: float | None = 1.0,
        max_fps: float | None = 4.0,
        mode: str | None = None,
        block_size: int | None = None,
        prev_blocks: int | None = None,
        unit_size: int | None = None,
        topk: int | None = None,
        compression: int | None = None,
        rerotate: bool | str | None = None,
        offload: bool = False,
        kv_dtype: str | None = None,
        batch_size: int | str = 1,
        **unused,
    ):
        super().__init__()
        from .. import load_model, load_tokenizer
        from ..engine.settings import EngineSettings
        from ..modeling.offload import parse_device_map

        if unused:
            logger.warning(f"videoxl2: ignoring model args {sorted(unused)}")
        if int(batch_size) != 1:
            logger.warning("videoxl2: answers one question at a time (batch_size is ignored)")
        self._rank = int(os.environ.get("RANK", "0"))
        self._world_size = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda":  # each data-parallel process on its own GPU
            device = f"cuda:{local_rank}"
        self._device = torch.device(device)
        self.model = load_model(
            pretrained,
            device=self._device,
            dtype=dtype,
            quantize=quantize,
            quantize_vision=_flag("quantize_vision", quantize_vision),
            device_map=None if device_map is None else parse_device_map(device_map),
            offload_folder=offload_folder,
        )
        if device_map is not None:  # where the embeddings (and so the engine's KV) are
            self._device = self.model.get_input_embeddings().weight.device
        self.tokenizer = load_tokenizer(pretrained)
        self.settings = EngineSettings.from_config(
            self.model.config,
            mode=mode,
            block_size=block_size,
            prev_blocks=prev_blocks,
            unit_size=unit_size,
            topk=topk,
            compression=compression,
            rerotate=None if rerotate is None else _flag("rerotate", rerotate),
            offload=offload or None,
            kv_dtype=kv_dtype,
        )
        self.sampling = dict(
            max_num_frames=int(max_frames_num),
            sample_fps=float(fps) if fps else None,
            max_sample_fps=float(max_fps) if max_fps else None,
        )
        self._session_key = None
        self._session = None

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return 1

    # -- visuals --------------------------------------------------------------------------------------------
    def _visuals(self, doc_to_visual, doc_id, task, split) -> list:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        flat = []
        for item in visuals if isinstance(visuals, (list, tuple)) else [visuals]:
            flat.extend(item if isinstance(item, (list, tuple)) else [item])
        if not flat:
            raise InputError(f"{task} doc {doc_id}: videoxl2 needs a video or an image with each question")
        return flat

    def _session_for(self, visuals: list):
        """The pre-filled session for these visuals: a video path (the first, if several), an image path, or
        in-memory images (each a 1 s frame, as the release treats image lists). The last one is kept, so
        consecutive questions about one video share its pre-fill."""
        from ..engine.session import VideoSession

        key = str(visuals[0]) if isinstance(visuals[0], (str, os.PathLike)) else None
        if key is not None and key == self._session_key:
            return self._session
        self._session_key, self._session = None, None
        if key is not None:
            if len(visuals) > 1:
                logger.warning(f"videoxl2: {len(visuals)} visuals given, using the first ({key})")
            session = VideoSession.from_path(
                self.model, self.tokenizer, key, settings=self.settings, progress=False, **self.sampling
            )
        else:
            frames = square_frames(visuals)
            session = VideoSession.from_frames(
                self.model,
                self.tokenizer,
                frames,
                [float(i) for i in range(len(frames))],
                settings=self.settings,
                progress=False,
            )
        self._session_key, self._session = key, session
        return session

    @staticmethod
    def _generation(gen_kwargs: dict | None) -> dict:
        """lmms-eval's generation kwargs as ours: greedy unless sampling with a temperature above 0."""
        gen_kwargs = dict(gen_kwargs or {})
        options = {"max_new_tokens": int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)}
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        if gen_kwargs.get("do_sample") and temperature > 0:
            options.update(
                do_sample=True, temperature=temperature, top_p=float(gen_kwargs.get("top_p") or 1.0)
            )
        if gen_kwargs.get("num_beams") is not None:
            options["num_beams"] = int(gen_kwargs["num_beams"])
        return options

    def _answer(self, context: str, gen_kwargs, visuals: list) -> str:
        with torch.inference_mode():
            session = self._session_for(visuals)
            return session.ask(context, generation_config=self._generation(gen_kwargs)).text

    # -- lmms-eval API ------------------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answers in request order; asked grouped by video so each video is pre-filled once."""
        jobs = []
        for index, request in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            jobs.append((index, context, gen_kwargs, self._visuals(doc_to_visual, doc_id, task, split)))
        jobs.sort(key=lambda job: str(job[3][0]) if isinstance(job[3][0], (str, os.PathLike)) else "")
        answers: list[str] = [""] * len(requests)
        for index, context, gen_kwargs, visuals in tqdm(jobs, desc="videoxl2", disable=self.rank != 0):
            answers[index] = self._answer(context, gen_kwargs, visuals)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), answers[index])
        return answers

    def generate_until_multi_round(self, requests: list[Instance]) -> list:
        """Each round asks about the doc's visuals afresh; the task's doc_to_text gives the next round's
        visuals and text from the answers so far, and says when to stop."""
        results = []
        for request in tqdm(requests, desc="videoxl2", disable=self.rank != 0):
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            visuals = self._visuals(doc_to_visual, doc_id, task, split)
            rounds, info, round_idx = [], None, 0
            while True:
                if round_idx > 0:
                    visuals, context, terminal, rounds, info = doc_to_text(
                        doc, previous_output=list(rounds), round_idx=round_idx, previous_round_info=info
                    )
                    rounds = list(rounds)
                    if terminal:
                        break
                rounds.append(self._answer(context, gen_kwargs, visuals))
                round_idx += 1
            results.append(tuple(rounds))
        return results

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Log-probability of each continuation after its context (as the assistant's reply), and whether
        greedy decoding would have produced it."""
        results = []
        for request in tqdm(requests, desc="videoxl2", disable=self.rank != 0):
            context, target, doc_to_visual, doc_id, task, split = request.args
            continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
            session = self._session_for(self._visuals(doc_to_visual, doc_id, task, split))
            results.append(continuation_logprob(session, context, str(continuation)))
        return results


def square_frames(images: list) -> np.ndarray:
    """In-memory images (PIL or arrays) padded to squares (the release's still-image handling) and brought
    to the first one's size, as one (F, S, S, 3) uint8 array."""
    from PIL import Image

    from ..video import expand_to_square

    squares = [
        expand_to_square(np.asarray(image.convert("RGB") if hasattr(image, "convert") else image))
        for image in images
    ]
    side = squares[0].shape[0]
    return np.stack(
        [
            s if s.shape[0] == side else np.asarray(Image.fromarray(s).resize((side, side), Image.BICUBIC))
            for s in squares
        ]
    )


@torch.inference_mode()
def continuation_logprob(session, context: str, continuation: str) -> tuple[float, bool]:
    """Sum of log-probabilities of `continuation`'s tokens after the prompt for `context`, computed on the
    engine's cache for the question (dense, or bi-level with the units the question selects), token by
    token as generation would see them."""
    from ..engine.decode import run_on_cache
    from ..engine.runner import LayerRunner
    from ..engine.select import choose_units, score_units

    model, settings = session.model, session.settings
    question_ids = session.question_ids(context)
    target = session.tokenizer(continuation, add_special_tokens=False)["input_ids"]
    if not target:
        return 0.0, True
    total = session.layout.video_end + question_ids.numel() + len(target)
    if total > model.config.context_limit:
        raise InputError(f"context and continuation need {total} tokens, over {model.config.context_limit}")
    memory = session.prefill()
    dense_units = None
    if settings.mode == "bilevel":
        scores = score_units(model, memory, question_ids)
        dense_units = choose_units(scores, settings.topk)
    runner = LayerRunner(model)
    with memory.question_cache(
        session.runner,
        dense_units,
        rerotate=settings.rerotate and settings.mode == "bilevel",
        device=session.device,
        reserve=question_ids.numel() + len(target),
    ) as cache:
        logits = run_on_cache(runner, model, cache, question_ids)
        logprob, greedy = 0.0, True
        for position, token in enumerate(target):
            scores = logits.float().log_softmax(-1)
            logprob += float(scores[token])
            greedy = greedy and int(scores.argmax()) == token
            if position + 1 < len(target):
                logits = run_on_cache(runner, model, cache, torch.tensor([token]))
    return logprob, greedy
