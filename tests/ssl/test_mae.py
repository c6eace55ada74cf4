"""MAE: patch layout vs the backbone, masked-only loss, seeded masks, decoder plumbing, 3D, errors."""

from __future__ import annotations

import math

import pytest
import torch

from foundation.config import CropsConfig, SSLConfig
from foundation.errors import ConfigError
from foundation.models.vit import ViT, build_vit
from foundation.ssl.mae import (
    MAE,
    MAEDecoder,
    MAEMaskSeeds,
    make_mae,
    masked_patch_loss,
    patchify,
    seeded_masking,
    unpatchify,
)

CFG = SSLConfig(method="mae", decoder_dim=32, decoder_depth=1, decoder_heads=2)


def tiny_vit(in_chans: int = 3, spatial_dims: int = 2, img_size: int = 32, patch_size: int = 8, **kw) -> ViT:
    torch.manual_seed(0)
    return build_vit(
        "vit_tiny",
        in_chans=in_chans,
        patch_size=patch_size,
        img_size=img_size,
        spatial_dims=spatial_dims,
        **kw,
    )


def tiny_mae(cfg: SSLConfig = CFG, **kw) -> MAE:
    model = MAE(tiny_vit(**kw), cfg, total_steps=10)
    return model.eval()  # no dropout anyway; eval makes intent explicit


def seeds(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


# -- patchify / unpatchify ---------------------------------------------------------------------------------
@pytest.mark.parametrize("channels", [1, 5, 7])
@pytest.mark.parametrize("spatial", [(8, 12), (4, 8, 12)])
def test_round_trip_any_channels_2d_3d(channels: int, spatial: tuple[int, ...]) -> None:
    x = torch.randn(2, channels, *spatial)
    p = 4
    patches = patchify(x, p)
    grid = tuple(s // p for s in spatial)
    assert patches.shape == (2, math.prod(grid), p ** len(spatial) * channels)
    assert torch.equal(unpatchify(patches, p, grid, channels), x)


@pytest.mark.parametrize("spatial", [(3, 4), (2, 3, 4)])
def test_patch_k_is_constant_k_in_raster_order(spatial: tuple[int, ...]) -> None:
    p, c = 2, 3
    grid_values = torch.arange(math.prod(spatial), dtype=torch.float32).reshape(spatial)
    image = grid_values
    for axis in range(len(spatial)):  # blow each grid cell up into a p^d block
        image = image.repeat_interleave(p, dim=axis)
    image = image.expand(1, c, *image.shape)
    patches = patchify(image, p)[0]
    expected = torch.arange(math.prod(spatial), dtype=torch.float32)[:, None].expand_as(patches)
    assert torch.equal(patches, expected)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_patch_order_matches_backbone_patch_embed(spatial_dims: int) -> None:
    """Token n of the backbone is a linear map of patchify row n (same order across and within patches)."""
    c, p = 5, 4
    vit = tiny_vit(
        in_chans=c, spatial_dims=spatial_dims, img_size=8 if spatial_dims == 3 else 12, patch_size=p
    )
    size = (8, 12, 4) if spatial_dims == 3 else (12, 8)
    x = torch.randn(2, c, *size)
    tokens, grid = vit.embed_patches(x)
    assert grid == tuple(s // p for s in size)
    conv = vit.patch_embed.proj
    # conv weight (E, C, p, ...) -> (E, p, ..., C) to match patchify's (pixels, channel) layout
    weight = conv.weight.movedim(1, -1).reshape(conv.weight.shape[0], -1)
    expected = patchify(x, p) @ weight.T + conv.bias
    torch.testing.assert_close(tokens, expected, atol=1e-4, rtol=1e-4)


def test_patchify_errors() -> None:
    with pytest.raises(ValueError, match="not divisible by the patch size 4"):
        patchify(torch.zeros(1, 3, 8, 10), 4)
    with pytest.raises(ValueError, match="not divisible by the patch size 4"):
        patchify(torch.zeros(1, 1, 8, 8, 6), 4)
    with pytest.raises(ValueError, match="expects"):
        patchify(torch.zeros(3, 8, 8), 4)
    with pytest.raises(ValueError, match="do not match"):
        unpatchify(torch.zeros(1, 4, 48), 4, (2, 2), channels=2)


# -- loss ----------------------------------------------------------------------------------------------------
def test_masked_patch_loss_by_hand() -> None:
    pred = torch.tensor([[[1.0, 1.0], [0.0, 0.0], [2.0, 0.0]]])
    target = torch.tensor([[[0.0, 0.0], [5.0, 5.0], [0.0, 4.0]]])
    mask = torch.tensor([[True, False, True]])
    # raw: patch 0 -> (1 + 1) / 2 = 1; patch 2 -> (4 + 16) / 2 = 10; patch 1 visible -> ignored
    assert masked_patch_loss(pred, target, mask, norm_pix=False).item() == pytest.approx(5.5)
    # normalised targets, unbiased var: patch 0 is constant -> target 0, error (1 + 1) / 2 = 1;
    # patch 2 [0, 4]: mean 2, var 8 -> target [-2, 2] / sqrt(8 + 1e-6)
    t = torch.tensor([-2.0, 2.0]) / math.sqrt(8 + 1e-6)
    patch2 = ((torch.tensor([2.0, 0.0]) - t) ** 2).mean().item()
    assert masked_patch_loss(pred, target, mask, norm_pix=True).item() == pytest.approx((1.0 + patch2) / 2)


def test_masked_patch_loss_ignores_visible_and_is_float32() -> None:
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 6, 4, generator=g)
    target = torch.randn(2, 6, 4, generator=g)
    mask = torch.tensor([[True, False, True, False, False, True], [False, True, True, False, True, False]])
    base = masked_patch_loss(pred, target, mask, norm_pix=True)
    pred2, target2 = pred.clone(), target.clone()
    pred2[~mask] += 10.0
    target2[~mask] = torch.randn_like(target2[~mask])
    assert torch.equal(masked_patch_loss(pred2, target2, mask, norm_pix=True), base)
    target2[0, 0, 0] += 1.0  # one value of a masked patch (a constant shift would be normalised away)
    assert masked_patch_loss(pred2, target2, mask, norm_pix=True) != base
    half = masked_patch_loss(pred.bfloat16(), target, mask, norm_pix=False)
    assert half.dtype == torch.float32


def test_model_loss_only_sees_masked_patches() -> None:
    """With the decoder output fixed, pixels of visible patches do not move the loss; masked ones do."""
    model = tiny_mae(in_chans=2)
    pred = torch.zeros(2, 16, 8 * 8 * 2)
    model.decoder.forward = lambda tokens, restore_idx, grid: pred  # type: ignore[method-assign]
    image = torch.randn(2, 2, 32, 32, generator=torch.Generator().manual_seed(1))
    s = seeds(11, 12)
    _, mask, _ = seeded_masking(s, 2, 16, CFG.mask_ratio, torch.device("cpu"))
    assert mask.sum(1).tolist() == [12, 12]
    base = model({"image": image, "mask_seed": s}, step=0)["loss"]
    # by hand: zero prediction vs normalised targets -> mean over masked patches of mean(t_norm^2)
    t = patchify(image, 8)
    t = (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(base, t.pow(2).mean(-1)[mask].mean())

    grid_mask = mask.reshape(2, 4, 4)
    visible = (~grid_mask[0]).nonzero()[0].tolist()
    masked = grid_mask[0].nonzero()[0].tolist()
    changed = image.clone()
    changed[0, :, visible[0] * 8 : visible[0] * 8 + 8, visible[1] * 8 : visible[1] * 8 + 8] += 3.0
    assert torch.equal(model({"image": changed, "mask_seed": s}, step=0)["loss"], base)
    changed[0, :, masked[0] * 8 : masked[0] * 8 + 8, masked[1] * 8 : masked[1] * 8 + 8] *= -2.0
    assert model({"image": changed, "mask_seed": s}, step=0)["loss"] != base


def test_gradient_of_prediction_is_zero_on_visible_patches() -> None:
    model = tiny_mae(in_chans=1)
    captured = {}
    forward = model.decoder.forward

    def spy(tokens, restore_idx, grid):
        out = forward(tokens, restore_idx, grid)
        out.retain_grad()
        captured["pred"] = out
        return out

    model.decoder.forward = spy  # type: ignore[method-assign]
    s = seeds(3, 4, 5)
    model({"image": torch.randn(3, 1, 32, 32), "mask_seed": s}, step=0)["loss"].backward()
    _, mask, _ = seeded_masking(s, 3, 16, CFG.mask_ratio, torch.device("cpu"))
    grad = captured["pred"].grad
    assert torch.all(grad[~mask] == 0)
    assert torch.all(grad[mask].abs().sum(-1) > 0)


# -- masking / seeds -----------------------------------------------------------------------------------------
def test_same_seed_same_loss_and_mask() -> None:
    model = tiny_mae()
    image = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    a = model({"image": image, "mask_seed": seeds(7, 8)}, step=5)
    b = model({"image": image, "mask_seed": seeds(7, 8)}, step=5)
    c = model({"image": image, "mask_seed": seeds(7, 9)}, step=5)
    assert torch.equal(a["loss"], b["loss"]) and torch.equal(a["mse"], a["loss"])
    assert not torch.equal(a["loss"], c["loss"])
    assert not a["mse"].requires_grad and a["loss"].requires_grad


def test_seeded_mask_is_per_sample_and_rank_independent() -> None:
    """A sample's mask depends only on its own seed, not on which other samples share its batch (rank)."""
    cpu = torch.device("cpu")
    keep, mask, restore = seeded_masking(seeds(1, 2, 3, 4), 4, 16, 0.75, cpu)
    keep2, mask2, _ = seeded_masking(seeds(3, 4), 2, 16, 0.75, cpu)
    assert torch.equal(mask[2:], mask2) and torch.equal(keep[2:], keep2)
    assert not torch.equal(mask[0], mask[1])
    assert keep.shape == (4, 4) and mask.sum().item() == 4 * 12
    assert torch.equal(torch.gather(mask, 1, keep), torch.zeros(4, 4, dtype=torch.bool))
    # unshuffling [kept, masked] with restore_idx gives back the original order
    shuffled = torch.cat([keep, torch.sort(mask.nonzero()[:, 1].reshape(4, 12), dim=1).values], dim=1)
    assert torch.equal(
        torch.sort(torch.gather(shuffled, 1, restore), dim=1).values, torch.arange(16).expand(4, -1)
    )
    with pytest.raises(ValueError, match="3 seeds for a batch of 4"):
        seeded_masking(seeds(1, 2, 3), 4, 16, 0.75, cpu)


def test_fallback_without_seed_runs() -> None:
    out = tiny_mae()({"image": torch.randn(2, 3, 32, 32)}, step=0)
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])


def test_mask_seeds_callable_and_make_mae() -> None:
    sampler = MAEMaskSeeds()
    a = sampler({"image": None}, torch.Generator().manual_seed(0))["mask_seed"]
    b = sampler({"image": None}, torch.Generator().manual_seed(0))["mask_seed"]
    assert a.dtype == torch.int64 and a.ndim == 0 and torch.equal(a, b) and 0 <= int(a) < 2**62
    model, extra = make_mae(tiny_vit(), CFG, CropsConfig(), total_steps=3)
    assert isinstance(model, MAE) and isinstance(extra, MAEMaskSeeds)


# -- interface / decoder -------------------------------------------------------------------------------------
def test_engine_interface() -> None:
    model = tiny_mae()
    assert MAE.backbone_prefix == "encoder."
    assert model.student_backbone is model.encoder and model.export_backbone() is model.encoder
    names = [n for n, _ in model.trainable_named_parameters()]
    assert names == [n for n, _ in model.named_parameters()]
    assert "encoder.patch_embed.proj.weight" in names and "decoder.mask_token" in names
    assert model.update_teacher(3) == {}


def test_decoder_pos_embed_is_fixed_buffer() -> None:
    model = tiny_mae()
    dec = model.decoder
    assert "decoder.pos_embed" not in dict(model.named_parameters())
    assert "decoder.pos_embed" not in model.state_dict()  # derived from the grid, never saved
    assert dec.pos_embed.shape == (1, 16, 32) and not dec.pos_embed.requires_grad
    other = dec.position_embedding((3, 5), torch.device("cpu"))
    assert other.shape == (1, 15, 32) and dec.position_embedding((3, 5), torch.device("cpu")) is other
    assert 0.015 < dec.mask_token.std().item() < 0.025


def test_decoder_keeps_prefix_tokens_and_unshuffles() -> None:
    torch.manual_seed(0)
    dec = MAEDecoder(8, 16, 1, 2, patch_size=2, in_chans=3, spatial_dims=2, num_prefix_tokens=3, grid=(2, 2))
    restore = torch.tensor([[2, 0, 3, 1]])  # visible tokens are patches 1 and 3, in that order
    tokens = torch.randn(1, 3 + 2, 8)
    out = dec(tokens, restore, (2, 2))
    assert out.shape == (1, 4, 12)
    # the prefix tokens are attended to: changing them changes the predictions
    changed = tokens.clone()
    changed[:, :3] += 1.0
    assert not torch.allclose(dec(changed, restore, (2, 2)), out)
    # with no blocks, each prediction depends only on its own token: patch 1 <- visible token 0
    dec.blocks = torch.nn.Sequential()
    out = dec(tokens, restore, (2, 2))
    moved = tokens.clone()
    moved[:, 3] += 1.0
    diff = (dec(moved, restore, (2, 2)) - out).abs().sum(-1)[0]
    assert diff[1] > 0 and diff[0] == 0 and diff[2] == 0 and diff[3] == 0


def test_registers_and_other_input_size() -> None:
    model = tiny_mae(reg_tokens=2)
    out = model({"image": torch.randn(2, 3, 48, 40), "mask_seed": seeds(1, 2)}, step=0)
    assert torch.isfinite(out["loss"])


def test_3d_forward_backward() -> None:
    model = tiny_mae(in_chans=1, spatial_dims=3, img_size=16, patch_size=4).train()
    out = model({"image": torch.randn(2, 1, 16, 16, 16), "mask_seed": seeds(5, 6)}, step=0)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    for name in ("encoder.patch_embed.proj.weight", "decoder.pred.weight", "decoder.mask_token"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert model.decoder.pred.out_features == 4**3 * 1


# -- errors --------------------------------------------------------------------------------------------------
def test_wrong_channel_count_raises() -> None:
    model = tiny_mae(in_chans=4)
    with pytest.raises(ValueError, match=r"3 channels.*in_chans=4.*does not match the data"):
        model({"image": torch.randn(1, 3, 32, 32)}, step=0)
    with pytest.raises(ValueError, match="not divisible by the patch size 8"):
        model({"image": torch.randn(1, 4, 32, 36)}, step=0)


@pytest.mark.parametrize("ratio", [0.0, 1.0, 1.5])
def test_bad_mask_ratio_refused(ratio: float) -> None:
    with pytest.raises(ConfigError, match="ssl.mask_ratio"):
        SSLConfig(mask_ratio=ratio)
