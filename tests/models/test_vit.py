"""The ViT backbone: token layout, position-embedding resampling, 3D patches, masks, MAE's visible path,
intermediate layers, input checks, layer ids and timm state-dict compatibility."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from foundation.errors import ConfigError
from foundation.models.pos_embed import resample_pos_embed
from foundation.models.vit import ARCHS, ViT, build_vit

pytestmark = pytest.mark.usefixtures("single_thread")

TESTED_ARCHS = [a for a in ARCHS if a not in ("vit_giant", "vit_large")]


def tiny(**kwargs) -> ViT:
    torch.manual_seed(0)
    args = dict(in_chans=3, patch_size=8, img_size=32)
    args.update(kwargs)
    return build_vit("vit_tiny", **args).eval()


@pytest.fixture(scope="module")
def model() -> ViT:
    m = tiny(reg_tokens=4)
    with torch.no_grad():  # a non-zero mask token, so masking is visible in the tokens
        m.mask_token.normal_(generator=torch.Generator().manual_seed(1))
    return m


def images(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", TESTED_ARCHS)
def test_forward_dict_shapes(arch: str) -> None:
    dim, depth, heads = ARCHS[arch]
    torch.manual_seed(0)
    m = build_vit(arch, in_chans=3, patch_size=8, img_size=32, reg_tokens=4).eval()
    assert m.embed_dim == dim and len(m.blocks) == depth and m.blocks[0].attn.num_heads == heads
    assert m.num_prefix_tokens == 5
    assert m.pos_embed.shape == (1, 16, dim)  # patches only
    if arch == "vit_base":
        return  # constructing is enough for the larger one
    with torch.no_grad():
        out = m.forward_dict(images(2, 3, 32, 32))
        cls = m(images(2, 3, 32, 32))
    assert out["cls"].shape == (2, dim)
    assert out["registers"].shape == (2, 4, dim)
    assert out["patch"].shape == (2, 16, dim)
    torch.testing.assert_close(cls, out["cls"])


def test_no_registers() -> None:
    m = tiny()
    with torch.no_grad():
        out = m.forward_dict(images(1, 3, 32, 32))
    assert out["registers"].shape == (1, 0, 192) and out["patch"].shape == (1, 16, 192)


def test_unknown_arch_refused() -> None:
    with pytest.raises(ConfigError, match="vit_huge"):
        build_vit("vit_huge", in_chans=3)
    with pytest.raises(ConfigError, match="spatial_dims=4"):
        build_vit("vit_tiny", in_chans=3, spatial_dims=4)


def test_non_square_input_uses_interpolated_pos_embed(model: ViT) -> None:
    x = images(2, 3, 32, 48)
    with torch.no_grad():
        out = model.forward_dict(x)
        assert out["patch"].shape == (2, 4 * 6, 192)
        tokens, grid = model.prepare_tokens(x)
        raw, raw_grid = model.embed_patches(x)
    assert grid == raw_grid == (4, 6)
    expected = resample_pos_embed(model.pos_embed, (4, 4), (4, 6))
    assert expected.shape == (1, 24, 192)
    torch.testing.assert_close(tokens[:, 5:] - raw, expected.expand(2, -1, -1))
    # the model's own grid needs no resampling
    assert torch.equal(model.patch_pos_embed((4, 4)), model.pos_embed)


def test_3d_input() -> None:
    m = tiny(in_chans=1, spatial_dims=3, patch_size=8, img_size=16, reg_tokens=2)
    assert m.pos_embed.shape == (1, 8, 192)
    with torch.no_grad():
        out = m.forward_dict(images(2, 1, 16, 16, 16))
        assert out["cls"].shape == (2, 192)
        assert out["registers"].shape == (2, 2, 192)
        assert out["patch"].shape == (2, 8, 192)
        cuboid = m.forward_dict(images(1, 1, 16, 16, 24))
    assert cuboid["patch"].shape == (1, 2 * 2 * 3, 192)
    with pytest.raises(ValueError, match="5-D input with 1 channels"):
        m(images(1, 1, 16, 16))


def test_masks_replace_tokens_by_mask_token(model: ViT) -> None:
    x = images(2, 3, 32, 32)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, [0, 5, 9]] = True
    with torch.no_grad():
        plain_tokens, _ = model.prepare_tokens(x)
        masked_tokens, _ = model.prepare_tokens(x, masks)
        pos = model.pos_embed[0]
        for j in (0, 5, 9):
            torch.testing.assert_close(masked_tokens[0, 5 + j], model.mask_token[0] + pos[j])
        keep = ~masks[0]
        torch.testing.assert_close(masked_tokens[0, 5:][keep], plain_tokens[0, 5:][keep])
        torch.testing.assert_close(masked_tokens[1], plain_tokens[1])

        plain = model.forward_dict(x)
        masked = model.forward_dict(x, masks)
        none_masked = model.forward_dict(x, torch.zeros(2, 16, dtype=torch.bool))
    assert not torch.allclose(masked["cls"][0], plain["cls"][0])  # the masked sample changes
    torch.testing.assert_close(masked["cls"][1], plain["cls"][1])  # the other does not
    torch.testing.assert_close(masked["patch"][1], plain["patch"][1])
    for key in ("cls", "registers", "patch"):
        torch.testing.assert_close(none_masked[key], plain[key], rtol=0, atol=0)


def test_forward_visible_all_indices_equals_forward_features(model: ViT) -> None:
    x = images(2, 3, 32, 32)
    keep = torch.arange(16).expand(2, -1)
    with torch.no_grad():
        full = model.forward_features(x)
        visible, grid = model.forward_visible(x, keep)
    assert grid == (4, 4)
    assert visible.shape == full.shape == (2, 1 + 4 + 16, 192)
    torch.testing.assert_close(visible, full, atol=1e-5, rtol=1e-5)


def test_forward_visible_follows_index_order(model: ViT) -> None:
    x = images(2, 3, 32, 32)
    perm = torch.stack([torch.randperm(16, generator=torch.Generator().manual_seed(s)) for s in (0, 1)])
    with torch.no_grad():
        full = model.forward_features(x)
        shuffled, _ = model.forward_visible(x, perm)
        subset, _ = model.forward_visible(x, perm[:, :6])
    # attention is permutation-equivariant and positions are added before the gather
    expected = torch.stack([full[b, 5:][perm[b]] for b in range(2)])
    torch.testing.assert_close(shuffled[:, 5:], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shuffled[:, :5], full[:, :5], atol=1e-5, rtol=1e-5)
    assert subset.shape == (2, 5 + 6, 192)
    assert not torch.allclose(subset[:, 0], full[:, 0], atol=1e-4)  # fewer tokens: another CLS


def test_get_intermediate_layers(model: ViT) -> None:
    x = images(2, 3, 32, 32)
    with torch.no_grad():
        outs, grid = model.get_intermediate_layers(x, [2, 5, 11])
        reversed_outs, _ = model.get_intermediate_layers(x, [11, 2])
        raw, _ = model.get_intermediate_layers(x, [11], norm=False)
        final = model.forward_dict(x)["patch"]
    assert grid == (4, 4)
    assert len(outs) == 3 and all(o.shape == (2, 16, 192) for o in outs)
    torch.testing.assert_close(outs[-1], final, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reversed_outs[0], outs[2])
    torch.testing.assert_close(reversed_outs[1], outs[0])
    assert not torch.allclose(outs[0], outs[1])
    torch.testing.assert_close(model.norm(raw[0]), final, atol=1e-5, rtol=1e-5)


def test_input_checks(model: ViT) -> None:
    with pytest.raises(ValueError, match="4-D input with 3 channels, got shape \\(1, 4, 32, 32\\)"):
        model(images(1, 4, 32, 32))
    with pytest.raises(ValueError, match="3 channels"):
        model(images(3, 32, 32))
    with pytest.raises(ValueError, match=r"input size \(30, 32\) is not divisible by the patch size 8"):
        model(images(1, 3, 30, 32))


def test_layer_id_mapping(model: ViT) -> None:
    depth = len(model.blocks)
    assert model.layer_id("cls_token") == 0
    assert model.layer_id("reg_token") == 0
    assert model.layer_id("pos_embed") == 0
    assert model.layer_id("mask_token") == 0
    assert model.layer_id("patch_embed.proj.weight") == 0
    assert model.layer_id("blocks.0.attn.qkv.weight") == 1
    assert model.layer_id("blocks.10.mlp.fc1.bias") == 11
    assert model.layer_id(f"blocks.{depth - 1}.norm2.weight") == depth
    assert model.layer_id("norm.weight") == depth + 1
    ids = {model.layer_id(n) for n, _ in model.named_parameters()}
    assert ids == set(range(depth + 2))


def test_no_weight_decay_names(model: ViT) -> None:
    assert model.no_weight_decay() == {"pos_embed", "cls_token", "reg_token", "mask_token"}


@pytest.mark.parametrize("kwargs", [dict(reg_tokens=4), dict(in_chans=5, init_values=1e-5), dict()])
def test_state_dict_keys_are_timms(kwargs: dict) -> None:
    ours = tiny(**kwargs)
    timm_model = VisionTransformer(**ours.timm_args)
    theirs = timm_model.state_dict()
    mine = {k: v for k, v in ours.state_dict().items() if k != "mask_token"}
    assert "mask_token" in ours.state_dict()
    assert set(theirs) == set(mine)
    assert {k: tuple(v.shape) for k, v in theirs.items()} == {k: tuple(v.shape) for k, v in mine.items()}
    # and the weights load straight into timm with the same output
    timm_model.load_state_dict(mine)
    timm_model.eval()
    x = images(2, ours.in_chans, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(timm_model(x), ours(x), atol=1e-5, rtol=1e-5)


def test_recipe_cls_token_starts_at_the_position_embedding_scale() -> None:
    """Recipes carry no CLS position (no_embed_class): the CLS token stands for DINOv2's token + position, so it
    starts at std 0.02. At timm's 1e-6 the final norm blew the CLS gradients up ~1e5-fold (grad norm ~5e5 at
    init with LayerScale 1e-5) and the first optimiser steps made every image's CLS the same."""
    torch.manual_seed(0)
    model = build_vit("vit_tiny", in_chans=3, img_size=32, patch_size=8, init_values=1e-5)
    assert 0.015 < float(model.cls_token.std()) < 0.025
    cls = model.forward_dict(torch.randn(8, 3, 32, 32))["cls"]
    torch.nn.functional.normalize(cls, dim=-1)[:, 0].sum().backward()
    grad_norm = torch.sqrt(sum((p.grad**2).sum() for p in model.parameters() if p.grad is not None))
    assert float(grad_norm) < 1e3, float(grad_norm)
