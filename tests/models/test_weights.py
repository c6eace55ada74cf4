"""Starting weights: file formats, RGB -> N-channel expansion, timm-style position embeddings, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from timm.models import adapt_input_conv
from timm.models.vision_transformer import VisionTransformer

from foundation.errors import CheckpointError
from foundation.models.pos_embed import resample_pos_embed
from foundation.models.vit import ViT, build_vit
from foundation.models.weights import (
    _adapt_channels,
    expand_patch_embed,
    load_backbone_weights,
    read_state_dict,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny(seed: int, arch: str = "vit_tiny", **kwargs) -> ViT:
    torch.manual_seed(seed)
    args = dict(in_chans=3, patch_size=8, img_size=32)
    args.update(kwargs)
    return build_vit(arch, **args).eval()


def images(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def save_safetensors(model: torch.nn.Module, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def source() -> ViT:
    return tiny(seed=1, reg_tokens=2)


@pytest.mark.parametrize("n", [1, 2, 4, 5, 6, 12])
def test_expand_patch_embed_is_timms_adapt_input_conv(n: int) -> None:
    w = torch.randn(6, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    kept = w.clone()
    out = expand_patch_embed(w, n)
    assert out.shape == (6, n, 4, 4)
    torch.testing.assert_close(out, adapt_input_conv(n, w.clone()), rtol=0, atol=0)
    torch.testing.assert_close(w, kept, rtol=0, atol=0)  # the source is not changed in place
    if n == 1:
        torch.testing.assert_close(out[:, 0], w.sum(dim=1))  # grey: the RGB filters summed
    else:
        for c in range(n):  # cyclic: R, G, B, R, ... cut to N, each x 3/N
            torch.testing.assert_close(out[:, c], w[:, c % 3] * 3 / n)
    # 3D kernels (timm takes 4-D only): the same rule on every depth slice
    w3d = torch.randn(6, 3, 2, 3, 3, generator=torch.Generator().manual_seed(1))
    out3d = expand_patch_embed(w3d, n)
    assert out3d.shape == (6, n, 2, 3, 3)
    for d in range(2):
        torch.testing.assert_close(out3d[:, :, d], adapt_input_conv(n, w3d[:, :, d].clone()), rtol=0, atol=0)


def test_expand_patch_embed_same_count_and_half_precision() -> None:
    w = torch.randn(6, 3, 4, 4)
    assert expand_patch_embed(w, 3) is w  # same count: unchanged
    half = w.to(torch.bfloat16)
    out = expand_patch_embed(half, 6)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, adapt_input_conv(6, half.clone()), rtol=0, atol=0)


@pytest.mark.parametrize(("src", "n"), [(4, 6), (4, 1), (12, 4), (2, 3)])
def test_non_rgb_source_follows_the_same_rule(src: int, n: int) -> None:
    w = torch.randn(5, src, 2, 2, generator=torch.Generator().manual_seed(src))
    out = expand_patch_embed(w, n)
    if n == 1:
        expected = w.sum(dim=1, keepdim=True)
    else:
        expected = torch.cat([w[:, c % src : c % src + 1] for c in range(n)], dim=1) * (src / n)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    try:  # newer timm takes the source's channel count; then it must agree
        theirs = adapt_input_conv(n, w.clone(), base_chans=src)
    except TypeError:
        return
    torch.testing.assert_close(_adapt_channels(w, n), theirs, rtol=0, atol=0)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_rgb_repeated_twice_gives_the_rgb_model(tmp_path: Path, spatial_dims: int) -> None:
    """RGB -> 6 channels by adapt_input_conv: filters [R, G, B, R, G, B] x 1/2, so the bands [x, x] give the
    RGB model's patch embedding of x, and so all its features; grey (N = 1, filters summed) is [g, g, g]."""
    size = 32 if spatial_dims == 2 else 16
    rgb = tiny(seed=1, spatial_dims=spatial_dims, img_size=size)
    path = save_safetensors(rgb, tmp_path / "rgb.safetensors")
    six = tiny(seed=2, in_chans=6, spatial_dims=spatial_dims, img_size=size)
    grey = tiny(seed=3, in_chans=1, spatial_dims=spatial_dims, img_size=size)
    load_backbone_weights(six, path)
    load_backbone_weights(grey, path)
    x = images(2, 3, *(size,) * spatial_dims)
    g = images(2, 1, *(size,) * spatial_dims, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(
            six.patch_embed(torch.cat([x, x], dim=1)), rgb.patch_embed(x), rtol=1e-5, atol=1e-5
        )
        torch.testing.assert_close(
            six.forward_features(torch.cat([x, x], dim=1)), rgb.forward_features(x), rtol=1e-5, atol=1e-5
        )
        torch.testing.assert_close(
            grey.forward_features(g),
            rgb.forward_features(g.expand(-1, 3, *g.shape[2:])),
            rtol=1e-5,
            atol=1e-5,
        )
    torch.testing.assert_close(six.blocks[3].mlp.fc1.weight, rgb.blocks[3].mlp.fc1.weight)


def test_load_safetensors_reproduces_outputs(tmp_path: Path, source: ViT) -> None:
    path = save_safetensors(source, tmp_path / "w.safetensors")
    target = tiny(seed=2, reg_tokens=2)
    x = images(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(target(x), source(x))
        load_backbone_weights(target, path)
        torch.testing.assert_close(target.forward_features(x), source.forward_features(x), rtol=0, atol=0)


def test_load_torch_file_with_model_wrapper(tmp_path: Path, source: ViT) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save({"model": source.state_dict(), "epoch": 3}, path)
    assert set(read_state_dict(path)) == set(source.state_dict())
    target = tiny(seed=3, reg_tokens=2)
    load_backbone_weights(target, path)
    x = images(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)


def test_load_prefixed_and_headed_state(tmp_path: Path, source: ViT) -> None:
    state = {f"backbone.{k}": v for k, v in source.state_dict().items() if k != "mask_token"}
    state["backbone.head.weight"] = torch.zeros(10, 192)  # classifier heads are ignored
    path = tmp_path / "prefixed.pt"
    torch.save({"state_dict": state}, path)
    target = tiny(seed=3, reg_tokens=2)
    load_backbone_weights(target, path)
    torch.testing.assert_close(target.pos_embed, source.pos_embed)


def test_rgb_weights_into_four_channel_model(tmp_path: Path) -> None:
    rgb = tiny(seed=1)
    path = save_safetensors(rgb, tmp_path / "rgb.safetensors")
    four = tiny(seed=4, in_chans=4)
    load_backbone_weights(four, path)
    w = rgb.patch_embed.proj.weight
    torch.testing.assert_close(four.patch_embed.proj.weight, adapt_input_conv(4, w.detach().clone()))
    torch.testing.assert_close(four.cls_token, rgb.cls_token)
    with torch.no_grad():
        assert four(images(2, 4, 32, 32)).shape == (2, 192)


def test_other_architecture_refused(tmp_path: Path) -> None:
    path = save_safetensors(tiny(seed=1, arch="vit_small"), tmp_path / "small.safetensors")
    with pytest.raises(CheckpointError, match="another architecture"):
        load_backbone_weights(tiny(seed=2), path)
    patch16 = save_safetensors(tiny(seed=1, patch_size=16), tmp_path / "p16.safetensors")
    with pytest.raises(CheckpointError, match=r"another architecture.*patch_embed\.proj\.weight"):
        load_backbone_weights(tiny(seed=2), patch16)


def test_missing_keys_refused(tmp_path: Path, source: ViT) -> None:
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("blocks.11.")}
    path = tmp_path / "partial.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(CheckpointError, match=r"missing \['blocks\.11\."):
        load_backbone_weights(tiny(seed=2, reg_tokens=2), path)


def test_missing_and_corrupt_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(CheckpointError, match="does not exist"):
        load_backbone_weights(tiny(seed=0), missing)
    corrupt = tmp_path / "bad.pt"
    corrupt.write_bytes(b"definitely not a torch file")
    with pytest.raises(CheckpointError, match="cannot read weights"):
        load_backbone_weights(tiny(seed=0), corrupt)
    not_a_dict = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], not_a_dict)
    with pytest.raises(CheckpointError, match="expected a state dict, found list"):
        read_state_dict(not_a_dict)


@pytest.mark.parametrize("reg_tokens", [0, 4])
def test_timm_pos_embed_with_class_position_kept_not_dropped(tmp_path: Path, reg_tokens: int) -> None:
    """The silent wrong answer of old: CLS/register positions were cut off. Now a model without them refuses
    by name, and one built with ``no_embed_class=False`` gives timm's features exactly."""
    torch.manual_seed(5)
    timm_model = VisionTransformer(
        img_size=32, patch_size=8, in_chans=3, embed_dim=192, depth=12, num_heads=3, reg_tokens=reg_tokens
    ).eval()  # timm's default: the class (and register) tokens carry positions, and a 1000-class head
    assert timm_model.pos_embed.shape == (1, 1 + reg_tokens + 16, 192)
    path = save_safetensors(timm_model, tmp_path / "timm.safetensors")
    with pytest.raises(CheckpointError, match=r"timm\.safetensors: pos_embed .*no_embed_class=False"):
        load_backbone_weights(tiny(seed=6, reg_tokens=reg_tokens), path)
    ours = tiny(seed=6, reg_tokens=reg_tokens, model_args={"no_embed_class": False})
    load_backbone_weights(ours, path)
    x = images(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            ours.forward_features(x), timm_model.forward_features(x), rtol=0, atol=1e-5
        )


def test_pos_embed_resampled_to_another_grid(tmp_path: Path) -> None:
    big = tiny(seed=1, img_size=64)  # 8x8 grid
    path = save_safetensors(big, tmp_path / "big.safetensors")
    small = tiny(seed=2, img_size=32)  # 4x4 grid
    load_backbone_weights(small, path)
    assert small.pos_embed.shape == (1, 16, 192)
    torch.testing.assert_close(small.pos_embed, resample_pos_embed(big.pos_embed, (8, 8), (4, 4)))


def test_timm_pos_embed_with_many_register_positions(tmp_path: Path) -> None:
    """25 rows read both as a 5x5 grid and as 9 prefix + 4x4: the model's grid decides."""
    torch.manual_seed(5)
    timm_model = VisionTransformer(
        img_size=32, patch_size=8, in_chans=3, embed_dim=192, depth=12, num_heads=3, reg_tokens=8
    ).eval()
    path = save_safetensors(timm_model, tmp_path / "timm.safetensors")
    with pytest.raises(CheckpointError, match="no_embed_class=False"):
        load_backbone_weights(tiny(seed=6, reg_tokens=8), path)
    ours = tiny(seed=6, reg_tokens=8, model_args={"no_embed_class": False})
    load_backbone_weights(ours, path)
    torch.testing.assert_close(ours.pos_embed, timm_model.pos_embed)
