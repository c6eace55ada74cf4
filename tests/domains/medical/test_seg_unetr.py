"""The UNETR-style decoder on our 3D ViT: shapes for any depth, registers, channels and patch size; loading back."""

from __future__ import annotations

import pytest
import torch

from foundation.errors import CheckpointError, ConfigError
from foundation.models.vit import ViT, build_vit
from foundation.tasks.checkpoint import save_task_model
from foundation_domains.medical.segmentation.model import build_segmentation_net
from foundation_domains.medical.segmentation.task import OrganSegmentationTask
from foundation_domains.medical.segmentation.unetr import skip_blocks


def _vit(depth: int = 2, patch: int = 16, in_chans: int = 1, reg_tokens: int = 0) -> ViT:
    return ViT(
        embed_dim=48,
        depth=depth,
        num_heads=2,
        img_size=32,
        patch_size=patch,
        in_chans=in_chans,
        spatial_dims=3,
        reg_tokens=reg_tokens,
    )


@pytest.mark.parametrize(
    ("depth", "levels", "expected"),
    [
        (12, 4, [2, 5, 8, 11]),
        (4, 4, [0, 1, 2, 3]),
        (3, 4, [0, 1, 2, 2]),
        (12, 3, [3, 7, 11]),
        (1, 3, [0, 0, 0]),
    ],
)
def test_skip_blocks_are_evenly_spaced_and_end_with_the_last(depth, levels, expected):
    assert skip_blocks(depth, levels) == expected


@pytest.mark.parametrize(
    ("depth", "patch", "in_chans", "reg_tokens", "shape"),
    [
        (3, 16, 1, 0, (32, 32, 32)),
        (4, 16, 1, 4, (32, 48, 16)),  # registers dropped, anisotropic grid
        (12, 16, 2, 0, (16, 32, 32)),
        (4, 8, 2, 2, (16, 24, 8)),
    ],
)
def test_unetr_logits_match_the_input_grid(depth, patch, in_chans, reg_tokens, shape, single_thread):
    torch.manual_seed(0)
    net = build_segmentation_net(
        _vit(depth, patch, in_chans, reg_tokens), {"out_channels": 3, "feature_size": 4}
    )
    assert len(net.skip_blocks) == {16: 4, 8: 3}[patch]
    assert net.skip_blocks[-1] == depth - 1
    x = torch.randn(2, in_chans, *shape)
    logits = net(x)
    assert logits.shape == (2, 3, *shape)
    logits.square().mean().backward()  # every part gets a gradient: the skips are really used
    assert net.backbone.blocks[net.skip_blocks[0]].attn.qkv.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in net.decoder.parameters())


def test_vit_tiny_depth_12_uses_unetr_blocks():
    net = build_segmentation_net(
        build_vit("vit_tiny", in_chans=1, spatial_dims=3, img_size=64, patch_size=16), {"out_channels": 6}
    )
    assert net.skip_blocks == [2, 5, 8, 11]  # blocks 3/6/9/12, as UNETR


def test_head_and_backbone_errors_name_the_problem():
    with pytest.raises(ConfigError, match="power of two"):
        build_segmentation_net(
            ViT(embed_dim=48, depth=2, num_heads=2, img_size=36, patch_size=12, in_chans=1, spatial_dims=3),
            {"out_channels": 3},
        )
    with pytest.raises(ConfigError, match="head.featuresize is not an option of the UNETR segmentation head"):
        build_segmentation_net(_vit(), {"out_channels": 3, "featuresize": 8})
    with pytest.raises(ConfigError, match="out_channels"):
        build_segmentation_net(_vit(), {})
    with pytest.raises(ConfigError, match="3D backbone"):
        build_segmentation_net(
            build_vit("vit_tiny", in_chans=1, img_size=32, patch_size=16), {"out_channels": 3}
        )
    with pytest.raises(ConfigError, match="skip_blocks"):
        build_segmentation_net(_vit(depth=2), {"out_channels": 3, "skip_blocks": [0, 1, 2, 3]})


def test_task_load_rebuilds_the_network(tmp_path, single_thread):
    torch.manual_seed(0)
    args = dict(arch="vit_tiny", in_chans=1, spatial_dims=3, img_size=32, patch_size=16, reg_tokens=1)
    net = build_segmentation_net(build_vit(**args), {"out_channels": 4, "feature_size": 4})
    meta = {"head": dict(net.head_args), "in_chans": 1, "roi_size": [32, 32, 32], "spacing": None,
            "modality": "ct", "window": [-175, 250], "labels": {"background": 0, "a": 1, "b": 2, "c": 3},
            "num_classes": 4, "overlap": 0.5, "sw_batch_size": 2}  # fmt: skip
    path = save_task_model(
        tmp_path / "model.pt",
        task="organ-segmentation",
        task_meta=meta,
        backbone_args=args,
        net=net,
        config={},
        step=3,
    )
    model = OrganSegmentationTask().load(tmp_path)
    loaded = model.net
    assert model.meta.to_dict() == meta and not loaded.training and model.step == 3
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), net.eval()(x))
    other = save_task_model(
        tmp_path / "other.pt",
        task="canopy-height",
        task_meta={},
        backbone_args=args,
        net=net,
        config={},
        step=1,
    )
    with pytest.raises(CheckpointError, match="organ-segmentation"):
        OrganSegmentationTask().load(other)
    assert path.is_file()
