"""The DPT canopy-height head on our ViT: shapes for any depth / patch / registers, both output modes, and the
model file round trip map making relies on."""

from __future__ import annotations

import pytest
import torch

from foundation.errors import CheckpointError, ConfigError
from foundation.models.vit import ViT, build_vit
from foundation.tasks.checkpoint import save_task_model
from foundation_domains.remote_sensing.canopy.head import HeadOptions, default_layers
from foundation_domains.remote_sensing.canopy.model import CanopyNet, build_canopy_net
from foundation_domains.remote_sensing.canopy.task import CanopyHeightTask


def _vit(depth: int = 3, patch: int = 8, regs: int = 0, chans: int = 4) -> ViT:
    return ViT(
        embed_dim=32, depth=depth, num_heads=2, img_size=32, patch_size=patch, in_chans=chans, reg_tokens=regs
    )


@pytest.mark.parametrize(
    ("depth", "patch", "regs", "mode", "size"),
    [
        (3, 8, 0, "bins", (32, 48)),
        (12, 16, 4, "regression", (64, 48)),
        (3, 16, 1, "bins", (80, 80)),  # odd patch grid (5 x 5)
        (3, 14, 0, "regression", (42, 56)),  # patch size that is not a power of two
        (3, 4, 0, "bins", (16, 24)),
    ],
)
def test_outputs_have_the_input_resolution(depth, patch, regs, mode, size, single_thread):
    net = build_canopy_net(_vit(depth, patch, regs), {"mode": mode, "features": 16, "bins": 8})
    x = torch.randn(2, 4, *size)
    out = net(x)
    assert out.shape == (2, 8 if mode == "bins" else 1, *size)
    heights = net.predict_height(x)
    assert heights.shape == (2, 1, *size)
    assert heights.dtype == torch.float32
    assert (heights >= 0).all() and (heights <= 96).all()
    assert torch.isfinite(heights).all()


def test_bins_prediction_is_the_expectation_over_bin_centres(single_thread):
    net = build_canopy_net(_vit(), {"mode": "bins", "bins": 5, "max_height": 40.0, "features": 8})
    assert net.bin_centers.tolist() == [0.0, 10.0, 20.0, 30.0, 40.0]
    logits = torch.full((1, 5, 2, 2), -1e4)
    logits[:, 3] = 0.0  # all mass on 30 m
    logits[0, :, 0, 0] = 0.0  # uniform: mean of the centres, 20 m
    heights = net.heights_from_output(logits)
    assert heights[0, 0].flatten().tolist() == pytest.approx([20.0, 30.0, 30.0, 30.0])


@pytest.mark.parametrize("mode", ["bins", "regression"])
def test_every_trainable_parameter_gets_a_gradient(mode, single_thread):
    """DDP (without find_unused_parameters) waits for a gradient of every parameter that requires one; it wraps
    the TaskModel the engine trains."""
    from foundation.tasks import TaskModel

    net = TaskModel(
        build_canopy_net(_vit(regs=2), {"mode": mode, "features": 8, "bins": 4}), lambda p, b: {}
    ).net
    net(torch.randn(1, 4, 32, 32)).mean().backward()
    missing = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    assert net.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert net.head.reassemble[0][0].weight.grad.abs().sum() > 0
    assert not net.backbone.mask_token.requires_grad  # masked pretraining only


def test_default_layers_are_evenly_spaced_and_end_with_the_last_block():
    assert default_layers(12) == [2, 5, 8, 11]
    assert default_layers(24) == [5, 11, 17, 23]
    assert default_layers(3) == [0, 1, 2, 2]
    assert default_layers(1) == [0, 0, 0, 0]


def test_head_options_are_checked_by_name():
    with pytest.raises(ConfigError, match=r"task\.options\.head\.bogus"):
        HeadOptions.from_options({"bogus": 1})
    with pytest.raises(ConfigError, match=r"mode='depth'"):
        HeadOptions.from_options({"mode": "depth"})
    with pytest.raises(ConfigError, match="must name 4 blocks"):
        HeadOptions.from_options({"layers": [1, 2]})
    with pytest.raises(ConfigError, match="depth 3"):
        build_canopy_net(_vit(depth=3), {"layers": [0, 1, 2, 5]})
    assert HeadOptions.from_options({"layers": [0, 1, 2, 2]}).to_dict()["layers"] == [0, 1, 2, 2]


def test_task_load_rebuilds_the_saved_network(tmp_path, single_thread):
    torch.manual_seed(0)
    args = dict(arch="vit_tiny", in_chans=3, img_size=32, patch_size=16, reg_tokens=2)
    head = HeadOptions(mode="bins", features=8, bins=4).to_dict()
    net = build_canopy_net(build_vit(**args), head).eval()
    meta = {"head": head, "bands": None, "scale": 255.0, "mean": [0.5] * 3, "std": [0.2] * 3, "in_chans": 3,
            "tile_size": 32, "gsd": 10.0, "max_height": 96.0}  # fmt: skip
    path = save_task_model(
        tmp_path / "model.pt",
        task="canopy-height",
        task_meta=meta,
        backbone_args=args,
        net=net,
        config={},
        step=1,
    )
    model = CanopyHeightTask().load(tmp_path)
    loaded = model.net
    assert isinstance(loaded, CanopyNet) and not loaded.training
    assert model.meta.to_dict() == meta and model.source == path and model.step == 1
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        assert torch.equal(loaded.predict_height(x), net.predict_height(x))

    save_task_model(
        path, task="organ-segmentation", task_meta=meta, backbone_args=args, net=net, config={}, step=1
    )
    with pytest.raises(CheckpointError, match="'canopy-height' model"):
        CanopyHeightTask().load(path)
