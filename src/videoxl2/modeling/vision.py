"""Vision tower: transformers' SigLIP, run the way the release runs it.

The release deletes SigLIP's last encoder layer and reads the output of the last kept layer *before*
`post_layernorm` (the layer norm weights stay in the checkpoint but are never applied). The 27x27 patch grid
is then bilinearly resized to 24x24 so that the DTS and the 2x2 pooling see the grid they were trained on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import SiglipVisionModel


def build_vision_tower(config) -> SiglipVisionModel:
    """SigLIP with `config.num_hidden_layers` layers (the kept ones) and no pooling head."""
    config.vision_use_head = False
    return SiglipVisionModel(config)


def siglip_features(tower: SiglipVisionModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """(F, 3, S, S) pixels -> (F, P, C) features of the last kept layer, without post_layernorm."""
    hidden = tower.embeddings(pixel_values.to(tower.embeddings.patch_embedding.weight.dtype))
    return tower.encoder(inputs_embeds=hidden).last_hidden_state


def resize_grid(features: torch.Tensor, grid: int) -> torch.Tensor:
    """(F, P, C) with P a square patch count -> (F, C, grid, grid), bilinear (align_corners=False) in fp32."""
    frames, patches, channels = features.shape
    side = int(round(patches**0.5))
    if side * side != patches:
        raise ValueError(f"vision features have {patches} patches, not a square grid")
    maps = features.transpose(1, 2).reshape(frames, channels, side, side)
    if side == grid:
        return maps
    resized = F.interpolate(maps.float(), size=(grid, grid), mode="bilinear", align_corners=False)
    return resized.to(features.dtype)
