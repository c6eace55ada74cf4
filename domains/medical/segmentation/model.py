"""The segmentation network: our 3D ViT as ``.backbone`` under a UNETR-style decoder, and loading it back.

``SegmentationMeta.head`` (a JSON-able dict) plus the checkpoint's ``backbone_args`` rebuild the network exactly, so
``foundation segment``, ``foundation evaluate`` and a MONAI bundle all construct it the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from foundation.config import reject_unknown_keys
from foundation.errors import ConfigError
from foundation.models.vit import ViT, build_vit
from foundation.tasks.loaded import LoadedTask, load_task_model
from foundation_domains.medical.segmentation.meta import TASK_NAME, SegmentationMeta
from foundation_domains.medical.segmentation.unetr import UNETRDecoder, decoder_levels, skip_blocks

HEAD_DEFAULTS: dict[str, Any] = {
    "type": "unetr",
    "out_channels": None,  # classes including background; required
    "feature_size": 16,
    "norm_name": "instance",
    "res_block": True,
    "dropout": 0.0,
    "skip_blocks": None,  # 0-based block indices; default: evenly spaced, ending with the last block
}


def head_config(head: dict[str, Any], backbone: ViT) -> dict[str, Any]:
    """``head`` with defaults filled in and checked against ``backbone``.

    Raises:
        ConfigError: unknown keys, a missing class count, or skip blocks that do not fit the backbone.
    """
    reject_unknown_keys(head, HEAD_DEFAULTS, "head", "the UNETR segmentation head")
    cfg = {**HEAD_DEFAULTS, **head}
    if cfg["type"] != "unetr":
        raise ConfigError(f"segmentation head type {cfg['type']!r} is not one of ['unetr']")
    if not isinstance(cfg["out_channels"], int) or cfg["out_channels"] < 2:
        raise ConfigError(
            f"segmentation head out_channels={cfg['out_channels']!r} must be the class count (background included, >= 2)"
        )
    if backbone.spatial_dims != 3:
        raise ConfigError(
            f"organ segmentation needs a 3D backbone; this one has spatial_dims={backbone.spatial_dims}"
        )
    levels = decoder_levels(backbone.patch_size)
    depth = len(backbone.blocks)
    if cfg["skip_blocks"] is None:
        cfg["skip_blocks"] = skip_blocks(depth, levels)
    blocks = [int(b) for b in cfg["skip_blocks"]]
    if len(blocks) != levels or not all(0 <= b < depth for b in blocks):
        raise ConfigError(
            f"skip_blocks={blocks!r}: need {levels} block indices in [0, {depth - 1}] for patch size "
            f"{backbone.patch_size} and depth {depth}"
        )
    cfg["skip_blocks"] = blocks
    return cfg


class SegmentationNet(nn.Module):
    """``forward(x: B x C x D x H x W) -> logits B x K x D x H x W``; sides must be multiples of the patch size."""

    def __init__(self, backbone: ViT, head: dict[str, Any]) -> None:
        super().__init__()
        self.head_args = head_config(head, backbone)
        self.backbone = backbone
        self.skip_blocks = self.head_args["skip_blocks"]
        self.decoder = UNETRDecoder(
            in_chans=backbone.in_chans,
            embed_dim=backbone.embed_dim,
            patch_size=backbone.patch_size,
            out_channels=self.head_args["out_channels"],
            feature_size=self.head_args["feature_size"],
            norm_name=self.head_args["norm_name"],
            res_block=self.head_args["res_block"],
            dropout=self.head_args["dropout"],
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features, grid = self.backbone.get_intermediate_layers(x, self.skip_blocks)
        return self.decoder(x, features, grid)


def build_segmentation_net(backbone: ViT, head: dict[str, Any]) -> SegmentationNet:
    """The network ``head`` (``SegmentationMeta.head``) describes, on ``backbone``."""
    return SegmentationNet(backbone, head)


def load_segmentation(path: str | Path) -> LoadedTask[SegmentationMeta]:
    """A fine-tuned organ-segmentation model (file, run folder or training checkpoint) in eval mode, and its
    :class:`SegmentationMeta` (``OrganSegmentationTask.load``).

    Raises:
        CheckpointError: unreadable, not an organ-segmentation model, broken metadata, or weights that do not fit.
    """

    def build(backbone_args: dict[str, Any], meta: SegmentationMeta) -> SegmentationNet:
        return build_segmentation_net(build_vit(**backbone_args, init_weights=False), meta.head)

    return load_task_model(path, TASK_NAME, SegmentationMeta.from_dict, build)
