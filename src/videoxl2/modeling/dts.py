"""Dynamic Token Synthesis (DTS): fuses each group of 4 frame feature maps into one map of tokens.

The release stores this module as `model.sae` (upstream class `SiglipAE`). Its layout is

    + learnable per-frame-slot encoding
    -> [spatial attention (3-D) -> temporal attention -> strided temporal conv] x 2

which takes a group (G, C, T=4, H, W) down to (G, C, 1, H, W), returned as (G, H*W, C) tokens.

Parameter names mirror the released state dict (`temporal_encoding`, `encoder.0` ... `encoder.5`), so the
checkpoint loads with `strict=True` once the `model.sae.` prefix is stripped. Several numerical details
look accidental but were baked into the trained weights; each is reproduced on purpose and documented
where it happens (see the spec's "weight-compatibility quirks" 1-3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DynamicTokenSynthesis",
    "RelativePositionTable",
    "SpatialAttention3d",
    "TemporalAttention",
    "TemporalDownsampleConv",
    "group_frames",
]

_NORM_EPS = 1e-6


def group_frames(features: torch.Tensor, frames: int = 4) -> torch.Tensor:
    """Turn per-frame maps (F, C, H, W) into DTS groups (F // frames, C, frames, H, W).

    Quirk 1: the release groups frames with a plain reshape of the contiguous tensor, *not* by moving the
    frame axis behind the channels. Within a group the `frames * C` (frame, channel) maps are read in
    storage order (frame-major) and refilled as (channel, time), so DTS channel `c` at time `t` is the
    group's flat map number `frames * c + t`, i.e. original frame `(frames*c + t) // C`, channel
    `(frames*c + t) % C`. The checkpoint was trained on this scrambled layout, so we keep it.
    """
    if features.dim() != 4:
        raise ValueError(f"expected per-frame features (F, C, H, W), got shape {tuple(features.shape)}")
    n, c, h, w = features.shape
    if frames < 1 or n % frames != 0:
        raise ValueError(f"frame count {n} is not a positive multiple of {frames}; pad the frames first")
    # reshape == view of a contiguous copy: same element order as upstream's `.view`
    return features.reshape(n // frames, c, frames, h, w)


class SpatialAttention3d(nn.Module):
    """Single-head self-attention over the H*W positions of each frame (`encoder.0` / `encoder.3`).

    Quirk 3: the GroupNorm sees the whole 5-D tensor, so each group's mean/variance is pooled over all
    frames of the clip jointly (not per frame), while the attention itself stays within one frame.
    q/k/v/out are 1x1x1 Conv3d (the release's parameter shapes); the logits are scaled by C^-1/2.
    """

    def __init__(self, channels: int, norm_groups: int = 32):
        super().__init__()
        self.norm = nn.GroupNorm(norm_groups, channels, eps=_NORM_EPS)
        self.q = nn.Conv3d(channels, channels, kernel_size=1)
        self.k = nn.Conv3d(channels, channels, kernel_size=1)
        self.v = nn.Conv3d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv3d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, c, t, h, w = x.shape
        normed = self.norm(x)

        def per_frame_tokens(y: torch.Tensor) -> torch.Tensor:
            # (G, C, T, H, W) -> (G*T, 1, H*W, C): one single-head attention problem per (group, frame),
            # 4-D as SDPA's fused kernels (flash, memory-efficient) expect; 3-D input takes the math path
            return y.permute(0, 2, 3, 4, 1).reshape(g * t, 1, h * w, c)

        q = per_frame_tokens(self.q(normed))
        k = per_frame_tokens(self.k(normed))
        v = per_frame_tokens(self.v(normed))
        attended = F.scaled_dot_product_attention(q, k, v, scale=c**-0.5)
        attended = attended.reshape(g, t, h, w, c).permute(0, 4, 1, 2, 3)
        return x + self.proj_out(attended)


class RelativePositionTable(nn.Module):
    """Learned embedding per clipped relative offset `key - query` in [-max, max] (2*max + 1 rows)."""

    def __init__(self, dim: int, max_relative_position: int = 64):
        super().__init__()
        self.max_relative_position = max_relative_position
        self.embeddings_table = nn.Parameter(torch.empty(2 * max_relative_position + 1, dim))
        nn.init.xavier_uniform_(self.embeddings_table)

    def forward(self, length: int) -> torch.Tensor:
        """(length, length, dim) tensor whose [i, j] entry embeds offset j - i (query i, key j)."""
        pos = torch.arange(length, device=self.embeddings_table.device)
        offset = (pos[None, :] - pos[:, None]).clamp(-self.max_relative_position, self.max_relative_position)
        return self.embeddings_table[offset + self.max_relative_position]


class TemporalAttention(nn.Module):
    """Single-head attention along time at every spatial position (`encoder.1` / `encoder.4`).

    Each (group, h, w) location is a sequence of T vectors laid out as (C, T). The GroupNorm is taken on
    that (G*H*W, C, T) tensor, so statistics are per location over its channel group and all frames.
    q/k/v come from one Conv1d of kernel 1 (`qkv`, chunked in q, k, v order); q and k are each scaled by
    C^-1/4. Relative-position embeddings enter both the logits and the values.

    Quirk 2: the key-side relative term is transposed relative to the textbook formula. Upstream adds
    `(C^-1/4 q_j) . R_k[j, i]` to logit (i, j) (query i, key j), where R[a, b] embeds offset b - a,
    instead of `q_i . R_k[i, j]`; it is also scaled by C^-1/4 only, not C^-1/2. The value term is the
    usual `sum_j w[i, j] R_v[i, j]`. The softmax runs in float32 and is cast back.
    Upstream zero-initialises `qkv` and `proj_out` (the block starts as the identity); we do the same.
    """

    def __init__(self, channels: int, max_relative_position: int = 64, norm_groups: int = 32):
        super().__init__()
        self.norm = nn.GroupNorm(norm_groups, channels, eps=_NORM_EPS)
        self.qkv = nn.Conv1d(channels, 3 * channels, kernel_size=1)
        self.relative_position_k = RelativePositionTable(channels, max_relative_position)
        self.relative_position_v = RelativePositionTable(channels, max_relative_position)
        self.proj_out = nn.Conv1d(channels, channels, kernel_size=1)
        for conv in (self.qkv, self.proj_out):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, c, t, h, w = x.shape
        seq = x.permute(0, 3, 4, 1, 2).reshape(g * h * w, c, t)
        q, k, v = self.qkv(self.norm(seq)).chunk(3, dim=1)  # each (N, C, T)
        scale = c**-0.25
        q = q * scale
        k = k * scale
        rel_k = self.relative_position_k(t)  # (T, T, C), [a, b] embeds offset b - a
        rel_v = self.relative_position_v(t)

        logits = torch.einsum("nci,ncj->nij", q, k)
        # quirk 2: logit (i, j) gets q_j . rel_k[j, i]  (textbook would be q_i . rel_k[i, j])
        logits = logits + torch.einsum("ncj,jic->nij", q, rel_k)
        weights = torch.softmax(logits.float(), dim=-1).to(logits.dtype)

        out = torch.einsum("nij,ncj->nci", weights, v) + torch.einsum("nij,ijc->nci", weights, rel_v)
        out = self.proj_out(out)
        return x + out.reshape(g, h, w, c, t).permute(0, 3, 4, 1, 2)


class TemporalDownsampleConv(nn.Module):
    """3x3x3 Conv3d with stride (2, 1, 1) that halves time and keeps H, W (`encoder.2` / `encoder.5`).

    Quirk 3: "same" padding is asymmetric in time. The total padding per axis is kernel - stride, i.e.
    1 frame in time and 2 in space; the odd frame goes to the *front* (time padded 1 before, 0 after) and
    space gets 1/1. Padding replicates edge values. Upstream pads in float32 and casts back (replicate
    padding once lacked half-precision kernels); this is lossless, and we keep it for fidelity.
    """

    kernel_size = (3, 3, 3)
    stride = (2, 1, 1)

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, self.kernel_size, stride=self.stride, padding=0)
        pads: list[int] = []
        for k, s in reversed(list(zip(self.kernel_size, self.stride))):  # F.pad lists the last axis first
            total = k - s
            pads += [total - total // 2, total // 2]  # the larger half in front
        self._pad = tuple(pads)  # (w: 1, 1, h: 1, 1, t: 1, 0)

    @classmethod
    def output_frames(cls, frames: int) -> int:
        """Frames after this layer (0 if the input is too short for the kernel)."""
        padded = frames + cls.kernel_size[0] - cls.stride[0]
        if padded < cls.kernel_size[0]:
            return 0
        return (padded - cls.kernel_size[0]) // cls.stride[0] + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padded = F.pad(x.float(), self._pad, mode="replicate").to(x.dtype)
        return self.conv(padded)


class DynamicTokenSynthesis(nn.Module):
    """The release's DTS (`model.sae`): (G, C, frames, H, W) frame groups -> (G, H*W, C) tokens.

    `temporal_encoding` (frames x C) gives each frame slot of a group a learned offset before the two
    attention + downsampling stages. Note that because of the raw-reshape grouping (`group_frames`), a
    "frame slot" here is not a real frame but an interleaved slice of the group's frame-channel maps.
    Tokens come out row-major over (H, W). All parameters, including the zero-initialised ones, are
    overwritten by the released weights; construction also works under `torch.device("meta")`.
    """

    def __init__(
        self, channels: int, frames: int = 4, max_relative_position: int = 64, norm_groups: int = 32
    ):
        super().__init__()
        remaining = frames
        for _ in range(2):
            remaining = TemporalDownsampleConv.output_frames(remaining)
        if remaining != 1:
            raise ValueError(f"frames={frames} is not reduced to exactly one by the two stride-2 stages")
        self.channels = channels
        self.frames = frames
        self.temporal_encoding = nn.Parameter(torch.randn(frames, channels))
        self.encoder = nn.Sequential(
            SpatialAttention3d(channels, norm_groups),
            TemporalAttention(channels, max_relative_position, norm_groups),
            TemporalDownsampleConv(channels),
            SpatialAttention3d(channels, norm_groups),
            TemporalAttention(channels, max_relative_position, norm_groups),
            TemporalDownsampleConv(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or x.shape[1] != self.channels or x.shape[2] != self.frames:
            raise ValueError(
                f"expected (G, {self.channels}, {self.frames}, H, W) frame groups, got {tuple(x.shape)}"
            )
        # temporal_encoding[t, c] is added at channel c, time t, for every group and position
        slot_offsets = self.temporal_encoding.to(x.dtype).t()[None, :, :, None, None]
        fused = self.encoder(x + slot_offsets)  # (G, C, 1, H, W)
        return fused.squeeze(2).permute(0, 2, 3, 1).flatten(1, 2)
