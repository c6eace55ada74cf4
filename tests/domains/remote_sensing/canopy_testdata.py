"""Stand-in networks, checkpoint meta and options for the canopy-height map tests."""

from __future__ import annotations

from pathlib import Path

import torch

from foundation_domains.remote_sensing.canopy.mapping import MapOptions
from foundation_domains.remote_sensing.canopy.meta import CanopyMeta

TILE = 32


class _Backbone:
    patch_size = 16


class ConstantNet(torch.nn.Module):
    backbone = _Backbone()

    def predict_height(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0], 1, *x.shape[2:]), 12.25)


class FirstBand(torch.nn.Module):
    """Returns the normalised first band, so the map shows exactly what the network was fed."""

    backbone = _Backbone()

    def predict_height(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1].clone()


def meta_dict_for(channels: int, **kw) -> dict:
    """A canopy-height ``task_meta`` as finetune stores it."""
    meta = {
        "head": {"mode": "regression", "features": 8},
        "bands": None,
        "scale": "auto",
        "mean": [0.2] * channels,
        "std": [0.1] * channels,
        "in_chans": channels,
        "tile_size": TILE,
        "gsd": None,
        "max_height": 50.0,
    }
    meta.update(kw)
    return meta


def meta_for(channels: int, **kw) -> CanopyMeta:
    """The typed metadata map making gets from a model with ``meta_dict_for(channels, **kw)``."""
    return CanopyMeta.from_dict(meta_dict_for(channels, **kw), Path("test-model.pt"))


def opts(**kw) -> MapOptions:
    return MapOptions(**{"tile": TILE, "overlap": 8, "batch_size": 4, "device": "cpu", "quiet": True, **kw})


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.startswith(".")]


def write_checkpoint(path: Path) -> Path:
    """A real (random-init, vit_tiny) canopy-height model for 4-band scenes, as finetune saves it."""
    from foundation.models.vit import build_vit
    from foundation.tasks.checkpoint import save_task_model
    from foundation_domains.remote_sensing.canopy.model import build_canopy_net

    torch.manual_seed(0)
    backbone_args = {"arch": "vit_tiny", "in_chans": 4, "img_size": TILE, "patch_size": 16}
    head = {"mode": "regression", "features": 8}
    net = build_canopy_net(build_vit(**backbone_args), head)
    save_task_model(
        path,
        task="canopy-height",
        task_meta=meta_dict_for(4, head=head, gsd=10.0),
        backbone_args=backbone_args,
        net=net,
        config={},
        step=0,
    )
    return path
