"""A disk store of the frozen vision side's output, so each video is decoded and encoded once per run.

With the vision tower and DTS frozen (the demo model's stages 2-3, LLaVA-style projector/LLM tuning), every
visit of a video recomputes the same tensor; over several epochs that, and decoding the video for it, is a
large share of a CPU step. The store keeps `visual_features` (before the trainable projector) per video.
Entries live under a folder named by a hash of the frozen weights and the settings that shape the features,
so a store can be shared by runs (stage 3 reuses stage 2's) and never serves features of other weights.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch

from ..errors import ConfigError


def frozen_fingerprint(model) -> str:
    """Hash of what determines `visual_features`: vision tower and DTS weights, grid, group size."""
    digest = hashlib.sha256()
    config = model.config
    shape = (config.vision_config.image_size, config.vision_grid, config.frames_per_group)
    digest.update(repr(shape).encode())
    for prefix, module in (("vision_tower", model.vision_tower), ("dts", model.dts)):
        for name, tensor in sorted(module.state_dict().items()):
            value = tensor.detach().to("cpu").contiguous()
            digest.update(f"{prefix}.{name}:{value.dtype}:{tuple(value.shape)}".encode())
            digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()[:16]


class FeatureStore:
    """`get(key)` / `put(key, features)` over one folder per frozen-weights fingerprint; writes are atomic
    (a temporary file renamed into place), so a killed run or parallel ranks never leave a torn entry."""

    def __init__(self, root: Path, fingerprint: str):
        self.folder = Path(root) / fingerprint
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"feature_cache: cannot create {self.folder}: {err}") from err

    @staticmethod
    def key(media: Path, frame_indices, image_size: int) -> str:
        """Names one media file (path, size, modification time) sampled at given frames and size."""
        stat = Path(media).stat()
        text = f"{Path(media).resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{list(frame_indices)}|{image_size}"
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def get(self, key: str) -> torch.Tensor | None:
        from safetensors.torch import load_file

        path = self.path(key)
        return load_file(path)["features"] if path.is_file() else None

    def put(self, key: str, features: torch.Tensor) -> None:
        from safetensors.torch import save_file

        handle, temporary = tempfile.mkstemp(dir=self.folder, suffix=".part")
        os.close(handle)
        try:
            save_file({"features": features.detach().to("cpu").contiguous()}, temporary)
            os.replace(temporary, self.path(key))
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)
