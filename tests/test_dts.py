"""Tests for the Dynamic Token Synthesis module (`model.sae` of the release)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from videoxl2.modeling.dts import (
    DynamicTokenSynthesis,
    TemporalAttention,
    TemporalDownsampleConv,
    group_frames,
)

FIXTURE = Path(__file__).parent / "fixtures" / "dts_upstream.safetensors"
FIXTURE_TOL = 1e-5

# `model.sae.*` rows of the released checkpoint's parameter table (names and shapes, prefix stripped).
RELEASED_SAE_ROWS = """
temporal_encoding	4x1152
encoder.0.norm.weight	1152
encoder.0.norm.bias	1152
encoder.0.q.weight	1152x1152x1x1x1
encoder.0.q.bias	1152
encoder.0.k.weight	1152x1152x1x1x1
encoder.0.k.bias	1152
encoder.0.v.weight	1152x1152x1x1x1
encoder.0.v.bias	1152
encoder.0.proj_out.weight	1152x1152x1x1x1
encoder.0.proj_out.bias	1152
encoder.1.norm.weight	1152
encoder.1.norm.bias	1152
encoder.1.qkv.weight	3456x1152x1
encoder.1.qkv.bias	3456
encoder.1.relative_position_k.embeddings_table	129x1152
encoder.1.relative_position_v.embeddings_table	129x1152
encoder.1.proj_out.weight	1152x1152x1
encoder.1.proj_out.bias	1152
encoder.2.conv.weight	1152x1152x3x3x3
encoder.2.conv.bias	1152
encoder.3.norm.weight	1152
encoder.3.norm.bias	1152
encoder.3.q.weight	1152x1152x1x1x1
encoder.3.q.bias	1152
encoder.3.k.weight	1152x1152x1x1x1
encoder.3.k.bias	1152
encoder.3.v.weight	1152x1152x1x1x1
encoder.3.v.bias	1152
encoder.3.proj_out.weight	1152x1152x1x1x1
encoder.3.proj_out.bias	1152
encoder.4.norm.weight	1152
encoder.4.norm.bias	1152
encoder.4.qkv.weight	3456x1152x1
encoder.4.qkv.bias	3456
encoder.4.relative_position_k.embeddings_table	129x1152
encoder.4.relative_position_v.embeddings_table	129x1152
encoder.4.proj_out.weight	1152x1152x1
encoder.4.proj_out.bias	1152
encoder.5.conv.weight	1152x1152x3x3x3
encoder.5.conv.bias	1152
"""


def released_sae_shapes() -> dict[str, tuple[int, ...]]:
    rows = (line.split("\t") for line in RELEASED_SAE_ROWS.strip().splitlines())
    return {name: tuple(int(d) for d in shape.split("x")) for name, shape in rows}


def expected_shapes(c: int) -> dict[str, tuple[int, ...]]:
    """The same table as formulas of the channel count (cross-checks the literal rows above)."""
    shapes: dict[str, tuple[int, ...]] = {"temporal_encoding": (4, c)}
    for i in (0, 3):
        shapes |= {f"encoder.{i}.norm.weight": (c,), f"encoder.{i}.norm.bias": (c,)}
        for p in ("q", "k", "v", "proj_out"):
            shapes |= {f"encoder.{i}.{p}.weight": (c, c, 1, 1, 1), f"encoder.{i}.{p}.bias": (c,)}
    for i in (1, 4):
        shapes |= {
            f"encoder.{i}.norm.weight": (c,),
            f"encoder.{i}.norm.bias": (c,),
            f"encoder.{i}.qkv.weight": (3 * c, c, 1),
            f"encoder.{i}.qkv.bias": (3 * c,),
            f"encoder.{i}.relative_position_k.embeddings_table": (129, c),
            f"encoder.{i}.relative_position_v.embeddings_table": (129, c),
            f"encoder.{i}.proj_out.weight": (c, c, 1),
            f"encoder.{i}.proj_out.bias": (c,),
        }
    for i in (2, 5):
        shapes |= {f"encoder.{i}.conv.weight": (c, c, 3, 3, 3), f"encoder.{i}.conv.bias": (c,)}
    return shapes


@pytest.fixture(scope="module")
def fixture_tensors() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE)


def fixture_model(tensors: dict[str, torch.Tensor]) -> DynamicTokenSynthesis:
    state = {k.removeprefix("param."): v for k, v in tensors.items() if k.startswith("param.")}
    model = DynamicTokenSynthesis(64).eval()
    model.load_state_dict(state, strict=True)
    return model


def randomize(model: nn.Module, seed: int) -> None:
    """Fill every parameter (also the zero-initialised ones) with small seeded random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.05 * noise)
            elif name.endswith("embeddings_table") or name == "temporal_encoding":
                p.copy_(0.5 * noise)
            else:
                p.copy_(noise / p[0].numel() ** 0.5)


# ---------------------------------------------------------------------------------------------------------
# 1. equivalence with the upstream module (fixture made by running upstream SiglipAE at 64 channels)


def test_fixture_provenance():
    with safe_open(FIXTURE, "pt") as f:
        meta = f.metadata()
    assert meta["upstream_repo"] == "VectorSpaceLab/Video-XL"
    assert len(meta["upstream_commit"]) == 40


@pytest.mark.parametrize("case", ["", "_rect"])
def test_matches_upstream_fixture(fixture_tensors, case):
    model = fixture_model(fixture_tensors)
    with torch.no_grad():
        out = model(fixture_tensors["input" + case])
    ref = fixture_tensors["output" + case]
    assert out.shape == ref.shape
    err = (out - ref).abs().max().item()
    assert err <= FIXTURE_TOL, f"max abs error vs upstream {err:.3e} > {FIXTURE_TOL:.0e}"


@pytest.mark.parametrize(("dtype", "tol"), [(torch.bfloat16, 0.1), (torch.float16, 0.01)])
def test_half_precision_close_to_upstream(fixture_tensors, dtype, tol):
    model = fixture_model(fixture_tensors).to(dtype)
    with torch.no_grad():
        out = model(fixture_tensors["input"].to(dtype))
    assert out.dtype == dtype
    err = (out.float() - fixture_tensors["output"]).abs().max().item()
    assert err <= tol, f"{dtype}: max abs error vs fp32 upstream {err:.3e}"


def test_spatial_attention_hands_sdpa_4d_tensors(fixture_tensors, monkeypatch):
    """SDPA's fused CUDA kernels take (batch, heads, tokens, dim); 3-D input would fall to the math path."""
    shapes = []
    original = F.scaled_dot_product_attention

    def recording(q, k, v, *args, **kwargs):
        shapes.append((q.dim(), k.dim(), v.dim(), kwargs.get("attn_mask")))
        return original(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    model = fixture_model(fixture_tensors)
    with torch.no_grad():
        out = model(fixture_tensors["input"])
    assert shapes and all(s == (4, 4, 4, None) for s in shapes), shapes
    assert (out - fixture_tensors["output"]).abs().max().item() <= FIXTURE_TOL


# ---------------------------------------------------------------------------------------------------------
# 2. quirk 1: grouping is a raw reshape


def test_group_frames_is_raw_reshape():
    n_frames, c, h, w = 8, 3, 2, 1
    feats = torch.arange(n_frames * c * h * w, dtype=torch.float32).view(n_frames, c, h, w)
    groups = group_frames(feats, frames=4)
    assert groups.shape == (2, c, 4, h, w)
    for g in range(2):
        # the group's 4*C (frame, channel) maps in storage order: frame-major
        sequence = feats[4 * g : 4 * g + 4].reshape(4 * c, h, w)
        for ch in range(c):
            for t in range(4):
                assert torch.equal(groups[g, ch, t], sequence[4 * ch + t]), (g, ch, t)
    # ...which is not the "natural" layout with time holding whole frames
    natural = feats.view(2, 4, c, h, w).transpose(1, 2)
    assert not torch.equal(groups, natural)
    # same result for a non-contiguous input with the same logical values
    assert torch.equal(group_frames(feats.transpose(2, 3).contiguous().transpose(2, 3)), groups)


def test_group_frames_rejects_partial_group():
    with pytest.raises(ValueError):
        group_frames(torch.zeros(6, 3, 2, 2), frames=4)


# ---------------------------------------------------------------------------------------------------------
# 3. released size: names and shapes, meta-device construction and forward


def test_released_size_on_meta_device():
    released = released_sae_shapes()
    assert released == expected_shapes(1152)
    with torch.device("meta"):
        model = DynamicTokenSynthesis(1152)
        x = torch.empty(24, 1152, 4, 24, 24)
    state = model.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == released
    assert all(v.is_meta for v in state.values())
    out = model(x)
    assert out.shape == (24, 576, 1152)


def test_rejects_bad_configuration_and_input():
    with pytest.raises(ValueError):
        DynamicTokenSynthesis(64, frames=3)  # 3 -> 1 -> (kernel does not fit)
    model = DynamicTokenSynthesis(32, norm_groups=8)
    with pytest.raises(ValueError):
        model(torch.zeros(1, 32, 2, 3, 3))


# ---------------------------------------------------------------------------------------------------------
# 4. behaviour: determinism, init, and the temporal attention's relative-position terms


def tiny_model(seed: int = 0) -> DynamicTokenSynthesis:
    model = DynamicTokenSynthesis(32, norm_groups=8).eval()
    randomize(model, seed)
    return model


def test_deterministic_and_relative_terms_matter():
    x = torch.randn(2, 32, 4, 3, 4, generator=torch.Generator().manual_seed(7))
    model = tiny_model()
    with torch.no_grad():
        first = model(x)
        assert first.shape == (2, 12, 32)
        assert torch.equal(first, model(x))
        assert torch.equal(first, tiny_model()(x))
        for name in (
            "encoder.1.relative_position_k",
            "encoder.1.relative_position_v",
            "encoder.4.relative_position_k",
        ):
            table = model.get_submodule(name).embeddings_table
            saved = table.clone()
            table.add_(0.5 * torch.randn(table.shape, generator=torch.Generator().manual_seed(3)))
            changed = (model(x) - first).abs().max().item()
            table.copy_(saved)
            assert changed > 1e-2, f"perturbing {name} barely changed the output ({changed:.2e})"
        assert torch.equal(first, model(x))


def test_fresh_temporal_attention_is_identity():
    block = TemporalAttention(32, norm_groups=8)
    x = torch.randn(2, 32, 4, 3, 3)
    assert torch.equal(block(x), x)


def naive_temporal_attention(block: TemporalAttention, x: torch.Tensor, transposed: bool) -> torch.Tensor:
    """Loop-by-loop float64 reference; `transposed` selects the release's key-side relative term."""
    g, c, t, h, w = x.shape
    seq = x.double().permute(0, 3, 4, 1, 2).reshape(-1, c, t)
    norm = block.norm
    normed = F.group_norm(seq, norm.num_groups, norm.weight.double(), norm.bias.double(), norm.eps)
    qkv = F.conv1d(normed, block.qkv.weight.double(), block.qkv.bias.double())
    q, k, v = qkv[:, :c], qkv[:, c : 2 * c], qkv[:, 2 * c :]
    max_rel = block.relative_position_k.max_relative_position

    def rel(table: torch.Tensor, query: int, key: int) -> torch.Tensor:
        return table.double()[min(max(key - query, -max_rel), max_rel) + max_rel]

    table_k = block.relative_position_k.embeddings_table
    table_v = block.relative_position_v.embeddings_table
    logits = torch.zeros(seq.shape[0], t, t, dtype=torch.float64)
    for i in range(t):
        for j in range(t):
            logits[:, i, j] = (q[:, :, i] * k[:, :, j]).sum(1) / c**0.5
            if transposed:
                logits[:, i, j] += (q[:, :, j] * rel(table_k, j, i)).sum(1) * c**-0.25
            else:  # textbook (Shaw et al.): q_i . (k_j + a_ij) / sqrt(c)
                logits[:, i, j] += (q[:, :, i] * rel(table_k, i, j)).sum(1) / c**0.5
    weights = logits.softmax(-1)
    mixed = torch.zeros_like(q)
    for i in range(t):
        for j in range(t):
            mixed[:, :, i] += weights[:, i, j, None] * (v[:, :, j] + rel(table_v, i, j))
    out = F.conv1d(mixed, block.proj_out.weight.double(), block.proj_out.bias.double())
    return x.double() + out.reshape(g, h, w, c, t).permute(0, 3, 4, 1, 2)


def test_temporal_attention_matches_naive_transposed_reference():
    block = TemporalAttention(32, norm_groups=8)
    randomize(block, seed=11)
    x = torch.randn(2, 32, 4, 2, 3, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours = block(x).double()
        quirk = naive_temporal_attention(block, x, transposed=True)
        textbook = naive_temporal_attention(block, x, transposed=False)
    assert (ours - quirk).abs().max().item() < 1e-5
    assert (ours - textbook).abs().max().item() > 1e-2


class _Swap(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def test_fixture_rejects_alternatives_to_each_quirk(fixture_tensors):
    """The fixture is sensitive to quirks 2 and 3: the plausible alternatives do not reproduce it."""
    x, ref = fixture_tensors["input"], fixture_tensors["output"]

    def error(model: DynamicTokenSynthesis) -> float:
        with torch.no_grad():
            return (model(x) - ref).abs().max().item()

    # the float64 loop reference with the transposed key term reproduces upstream...
    model = fixture_model(fixture_tensors)
    for i in (1, 4):
        block = model.encoder[i]
        model.encoder[i] = _Swap(lambda y, b=block: naive_temporal_attention(b, y, True).float())
    assert error(model) < 1e-4
    # ...the textbook relative-key term does not
    model = fixture_model(fixture_tensors)
    for i in (1, 4):
        block = model.encoder[i]
        model.encoder[i] = _Swap(lambda y, b=block: naive_temporal_attention(b, y, False).float())
    assert error(model) > 1e-2

    # time padded at the back instead of the front
    model = fixture_model(fixture_tensors)
    for i in (2, 5):
        conv: TemporalDownsampleConv = model.encoder[i]
        conv._pad = (1, 1, 1, 1, 0, 1)
    assert error(model) > 1e-2

    # GroupNorm statistics per frame instead of over all frames jointly
    model = fixture_model(fixture_tensors)
    for i in (0, 3):
        norm = model.encoder[i].norm

        def per_frame(y: torch.Tensor, n: nn.GroupNorm = norm) -> torch.Tensor:
            g, c, t, h, w = y.shape
            frames = y.transpose(1, 2).reshape(g * t, c, h, w)
            return n(frames).reshape(g, t, c, h, w).transpose(1, 2)

        model.encoder[i].norm = _Swap(per_frame)
    assert error(model) > 1e-2
