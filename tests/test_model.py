"""The visual path piece by piece: SigLIP as the release runs it, resize, padding, projector and pooling."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from videoxl2 import VideoXL2Config, VideoXL2ForCausalLM
from videoxl2.modeling.projector import VisionProjector
from videoxl2.modeling.vision import resize_grid, siglip_features


def test_released_size_visual_path_shapes_on_meta():
    config = VideoXL2Config.released()
    assert config.tokens_per_group == 144 and config.hidden_size == 3584
    with torch.device("meta"):
        model = VideoXL2ForCausalLM(config)
        embeds = model.encode_video(torch.empty(6, 3, 384, 384))  # 6 frames -> padded to 8 -> 2 groups
    assert embeds.shape == (2, 144, 3584)
    assert len(model.vision_tower.encoder.layers) == 26
    assert model.vision_tower.embeddings.position_embedding.weight.shape == (729, 1152)
    assert model.projector.linear_1.weight.shape == (3584, 1152)
    assert model.projector.linear_2.weight.shape == (3584, 3584)


def test_siglip_features_are_last_kept_layer_without_post_layernorm(tiny):
    model, _ = tiny
    pixels = torch.randn(3, 3, 63, 63)
    with torch.no_grad():
        ours = siglip_features(model.vision_tower, pixels)
        hidden = model.vision_tower(pixel_values=pixels, output_hidden_states=True)
    assert torch.equal(ours, hidden.hidden_states[-1])
    assert not torch.allclose(ours, hidden.last_hidden_state)  # that one has post_layernorm applied


def test_resize_27_to_24_is_bilinear_interpolation():
    features = torch.randn(2, 27 * 27, 8)
    maps = resize_grid(features, 24)
    expected = F.interpolate(
        features.transpose(1, 2).reshape(2, 8, 27, 27), size=(24, 24), mode="bilinear", align_corners=False
    )
    assert maps.shape == (2, 8, 24, 24) and torch.allclose(maps, expected)
    same = torch.randn(1, 16, 4)
    assert torch.equal(resize_grid(same, 4), same.transpose(1, 2).reshape(1, 4, 4, 4))  # already the grid


def test_projector_pools_after_projection_row_major():
    projector = VisionProjector(vision_hidden=2, text_hidden=3, grid=4, pool_stride=2)
    tokens = torch.randn(1, 16, 2)
    out = projector(tokens)
    projected = projector.linear_2(projector.act(projector.linear_1(tokens)))[0].view(4, 4, 3)
    expected = torch.stack(
        [projected[r : r + 2, c : c + 2].mean((0, 1)) for r in range(0, 4, 2) for c in range(0, 4, 2)]
    )
    assert out.shape == (1, 4, 3)
    assert torch.allclose(out[0], expected, atol=1e-6)


def test_frames_are_padded_by_repeating_the_last(tiny):
    model, _ = tiny
    pixels = torch.randn(5, 3, 63, 63)
    padded = model.pad_frames(pixels)
    assert padded.shape[0] == 8 and torch.equal(padded[5], pixels[4]) and torch.equal(padded[7], pixels[4])
    with torch.no_grad():
        five = model.encode_video(pixels)
        eight = model.encode_video(padded)
        image = model.encode_video(pixels[:1])
        four = model.encode_video(pixels[:1].expand(4, -1, -1, -1))
    assert five.shape == (2, 16, 64) and torch.equal(five, eight)
    assert torch.equal(image, four)  # a still image is 4 identical frames


def test_groups_are_independent(tiny):
    """Encoding a video in pieces (as the session streams it) gives the same embeddings."""
    model, _ = tiny
    pixels = torch.randn(12, 3, 63, 63)
    with torch.no_grad():
        whole = model.encode_video(pixels)
        parts = torch.cat([model.encode_video(pixels[:4]), model.encode_video(pixels[4:])])
    assert (whole - parts).abs().max().item() <= 1e-5


def test_forward_with_pixels_fills_placeholders(tiny):
    model, _ = tiny
    vid = model.config.video_token_id
    ids = torch.tensor([[1, 2] + [vid] * 16 + [5], [7] + [vid] * 16 + [4, 4]])
    pixels = [torch.randn(4, 3, 63, 63), torch.randn(2, 3, 63, 63)]
    labels = ids.clone()
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels, labels=labels)
    assert out.logits.shape == (2, 19, model.config.vocab_size) and torch.isfinite(out.loss)


def test_training_forward_scores_labelled_positions_with_the_plain_loss_and_gradients():
    """The training forward runs the LM head on labelled rows only; loss and every gradient must be Qwen2's
    own full-logits loss, with and without the Trainer's `num_items_in_batch`."""
    from videoxl2.tiny import build_tiny_model

    model, _ = build_tiny_model(seed=1)
    model.train()
    vid = model.config.video_token_id
    ids = torch.tensor([[1, 2] + [vid] * 16 + [5, 8, 7], [7] + [vid] * 16 + [4, 4, 10, 11]])
    pixels = [torch.randn(4, 3, 63, 63, generator=torch.Generator().manual_seed(s)) for s in (0, 1)]
    labels = torch.full_like(ids, -100)
    labels[0, 18:] = ids[0, 18:]
    labels[1, 17:19] = ids[1, 17:19]
    params = [p for p in model.parameters() if p.requires_grad]

    def run(fast: bool, num_items):
        model.zero_grad()
        if fast:
            out = model(input_ids=ids, pixel_values=pixels, labels=labels, num_items_in_batch=num_items)
        else:
            embeds = model.embed_inputs(ids, torch.cat([model.encode_video(f) for f in pixels]))
            out = model.language_model(inputs_embeds=embeds, labels=labels, num_items_in_batch=num_items)
        out.loss.backward()
        return out, [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]

    for num_items in (None, torch.tensor(9)):
        fast, fast_grads = run(True, num_items)
        plain, plain_grads = run(False, num_items)
        assert fast.logits.shape == (5, model.config.text_config.vocab_size)
        assert plain.logits.shape[:2] == ids.shape
        loss_error = (fast.loss - plain.loss).abs().item()
        grad_error = max((a - b).abs().max().item() for a, b in zip(fast_grads, plain_grads))
        assert loss_error <= 1e-6, f"loss differs by {loss_error:.2e} (num_items_in_batch={num_items})"
        assert grad_error <= 1e-6, f"gradients differ by {grad_error:.2e} (num_items={num_items})"
