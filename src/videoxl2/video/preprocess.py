"""SigLIP preprocessing as the release does it: RGB, bicubic resize to a square (no crop, no aspect
preservation), scale to [0, 1], normalise with mean 0.5 and std 0.5 to [-1, 1]."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..errors import InputError


def preprocess_frames(
    frames: np.ndarray, image_size: int = 384, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(B, H, W, 3) uint8 RGB -> (B, 3, image_size, image_size) float tensor in [-1, 1]."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise InputError(f"frames must be uint8 (B, H, W, 3), got {frames.dtype} {frames.shape}")
    size = (image_size, image_size)
    resized = np.stack(
        [np.asarray(Image.fromarray(f).resize(size, Image.Resampling.BICUBIC)) for f in frames]
    )
    pixels = torch.from_numpy(resized).permute(0, 3, 1, 2).float().div_(255.0)
    return pixels.sub_(0.5).div_(0.5).to(dtype)
