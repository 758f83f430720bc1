"""The Qwen2 decoder stack with the engine's own attention, shared by pre-fill, scoring and decoding.

We run transformers' own Qwen2 modules (norms, projections, rotary tables, MLP) layer by layer and supply
only the attention, because chunk-based pre-filling gives different queries of one block different key sets.

Every attention call goes through `attention`, which hands SDPA no tensor mask: either none, or causality
as `is_causal` / `torch.nn.attention.bias.causal_lower_right` (query i of n sees keys 0 .. m-n+i). Callers
lay their key sets out so that this is exactly the release's visibility rule. Grouped K/V heads go in as
they are (`enable_gqa=True`), never expanded. On CUDA this keeps the calls on the fused kernels: flash
attention takes no tensor mask, and torch 2.13's memory-efficient kernel takes no grouped heads, so a
boolean mask with grouped heads would fall to the math path (fp32, K/V expanded, the whole score matrix).
On CPU torch lowers the lower-right bias to an n x m mask for its flash kernel (which accepts one), so there
the queries of a large call are split into slices whose masks stay under `CPU_MASK_ELEMENTS` (each slice's
queries are again the last ones of a shorter key prefix: the same rule, exactly).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

ROPE_CHUNK = 8192  # keys rotated at a time where whole layers are rotated (bounds fp32 temporaries)
CPU_MASK_ELEMENTS = 1 << 18  # CPU: largest query x key mask torch materialises for a lower-right call


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (heads, n, D) by per-token (n, D) tables, computing in fp32 (Qwen2's formula)."""
    return (x.float() * cos + rotate_half(x.float()) * sin).to(x.dtype)


def upload(tensor: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on `device` without blocking the host: on CUDA it is copied from pinned memory
    asynchronously (the caching host allocator keeps the pinned copy alive until the copy is done)."""
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """SDPA of (heads, n, D) queries over (kv_heads, m, D) keys/values with grouped heads, no tensor mask.

    `causal`: lower-right causal, i.e. the n queries are the last n positions of the m keys (query i sees
    keys 0 .. m-n+i); otherwise every query sees every key."""
    n, m = q.shape[1], k.shape[1]
    mask, is_causal = None, False
    if causal and n > 1:
        if n == m:
            is_causal = True
        elif q.device.type == "cpu" and n * m > CPU_MASK_ELEMENTS:
            step = max(1, CPU_MASK_ELEMENTS // m)
            parts = []
            for a in range(0, n, step):
                b = min(a + step, n)  # queries a..b-1 are the last ones of keys [0, m - n + b)
                parts.append(attention(q[:, a:b], k[:, : m - n + b], v[:, : m - n + b], causal=True))
            return torch.cat(parts, 1)
        else:
            mask = causal_lower_right(n, m)
    out = F.scaled_dot_product_attention(
        q[None], k[None], v[None], attn_mask=mask, is_causal=is_causal, enable_gqa=True
    )
    return out[0]


class LayerRunner:
    """Qwen2 decoder stack with pluggable attention: `attend(layer, q, k, v) -> (heads, n, D)` gets the
    slice's rotated queries and keys and its values, and may read or write any KV it keeps itself."""

    def __init__(self, model):
        self.llm = model.llm
        config = model.config.text_config
        if getattr(config, "use_sliding_window", False):
            raise NotImplementedError("sliding-window Qwen2 configs are not supported by the engine")
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_layers = config.num_hidden_layers
        weight = model.get_input_embeddings().weight
        self.device, self.dtype = weight.device, weight.dtype
        self._check_placement()

    def _check_placement(self) -> None:
        """A model dispatched by accelerate runs here when its layers compute on one device (weights may be
        offloaded to CPU RAM or disk: the leaf hooks fetch them); the KV of layers on several GPUs is not
        placed per layer yet, so such a split is refused in one line rather than failing inside attention."""
        from ..errors import InputError
        from ..modeling.offload import execution_device

        devices = {execution_device(layer) or self.device for layer in self.llm.layers}
        devices = {torch.device(d) for d in devices} - {torch.device("meta")}
        if len(devices) > 1:
            names = ", ".join(sorted(str(d) for d in devices))
            raise InputError(
                f"the model's layers compute on several devices ({names}): the engine keeps one KV device; "
                "offload to cpu/disk instead (--device-map with one GPU and cpu/disk entries)"
            )

    def rope_tables(
        self, positions: torch.Tensor, like=None, scaled: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (n, D) in fp32 for float or integer positions (negative ones rotate backwards), on the
        device of `like` (a tensor or device; default the model's). Host positions are uploaded without
        blocking; no tensor but the tables themselves is made.

        A RoPE with an attention scaling (YaRN's mscale) multiplies the fresh queries and keys by it, as
        transformers does (`scaled=True`); keys already stored carry it, so turning them to another
        position (re-rotation, RoPE undone before pooling) must be a pure rotation (the default)."""
        device = self.device if like is None else like.device if isinstance(like, torch.Tensor) else like
        template = torch.empty(0, dtype=torch.float32, device=device)  # rotary_emb reads device and dtype
        cos, sin = self.llm.rotary_emb(template, upload(positions, device)[None].float())
        cos, sin = cos[0].float(), sin[0].float()
        scaling = float(getattr(self.llm.rotary_emb, "attention_scaling", 1.0))
        if not scaled and scaling != 1.0:
            cos, sin = cos / scaling, sin / scaling
        return cos, sin

    def rotate_(self, keys: list[torch.Tensor], turns: torch.Tensor, start: int = 0) -> None:
        """Rotate keys[layer][:, start + i] by the angle of position turns[i] (host float64), in place, for
        every layer; chunk by chunk so that tables and fp32 temporaries stay `ROPE_CHUNK` keys long.
        Chunks whose turns are all zero are left alone (rotating by zero is the identity)."""
        for a in range(0, turns.numel(), ROPE_CHUNK):
            part = turns[a : a + ROPE_CHUNK]
            if not bool(part.any()):
                continue
            cos, sin = self.rope_tables(part, keys[0])
            b = start + a + part.numel()
            for k in keys:
                k[:, start + a : b] = apply_rope(k[:, start + a : b], cos, sin)

    def project(self, layer, x: torch.Tensor):
        attn = layer.self_attn
        n = x.shape[0]
        q = attn.q_proj(x).view(n, self.heads, self.head_dim).transpose(0, 1)
        k = attn.k_proj(x).view(n, self.kv_heads, self.head_dim).transpose(0, 1)
        v = attn.v_proj(x).view(n, self.kv_heads, self.head_dim).transpose(0, 1)
        return q, k, v

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor, attend: Callable) -> torch.Tensor:
        """(n, H) embeddings at `positions` -> (n, H) last-layer hidden states (before the final norm)."""
        cos, sin = self.rope_tables(positions, hidden, scaled=True)
        for index, layer in enumerate(self.llm.layers):
            x = layer.input_layernorm(hidden)
            q, k, v = self.project(layer, x)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            out = attend(index, q, k, v)
            hidden = hidden + layer.self_attn.o_proj(out.transpose(0, 1).reshape(hidden.shape[0], -1))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return hidden
