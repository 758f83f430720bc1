"""Projector: the release's `mlp2x_gelu` (Linear, GELU, Linear) per token, then 2x2 average pooling.

Pooling comes *after* the projector (quirk 4): 576 projected tokens of a group become 144.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class VisionProjector(nn.Module):
    def __init__(self, vision_hidden: int, text_hidden: int, grid: int, pool_stride: int):
        super().__init__()
        self.grid = grid
        self.pool_stride = pool_stride
        self.linear_1 = nn.Linear(vision_hidden, text_hidden)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(text_hidden, text_hidden)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(G, grid*grid, C_vision) -> (G, (grid/stride)^2, C_text), pooled tokens in row-major order."""
        groups = tokens.shape[0]
        x = self.linear_2(self.act(self.linear_1(tokens)))
        x = x.view(groups, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        x = F.avg_pool2d(x, kernel_size=self.pool_stride, stride=self.pool_stride)
        return x.flatten(2).transpose(1, 2).contiguous()
