"""Build the backbone a config asks for, with the domain's channel count and dimensionality."""

from __future__ import annotations

from typing import Any

from foundation.config import ModelConfig
from foundation.models.vit import ViT, build_vit
from foundation.models.weights import load_backbone_weights


def backbone_args(cfg: ModelConfig, channels: int, spatial_dims: int) -> dict[str, Any]:
    """Everything needed to rebuild the backbone later (stored in checkpoints and exports)."""
    return dict(
        arch=cfg.arch,
        in_chans=cfg.in_chans or channels,
        spatial_dims=cfg.spatial_dims or spatial_dims,
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        reg_tokens=cfg.reg_tokens,
        init_values=cfg.layerscale_init,
        qkv_bias=cfg.qkv_bias,
    )


def build_backbone(
    cfg: ModelConfig, channels: int, spatial_dims: int, *, load_pretrained: bool = True
) -> ViT:
    model = build_vit(**backbone_args(cfg, channels, spatial_dims), drop_path_rate=cfg.drop_path_rate)
    if load_pretrained and cfg.pretrained:
        load_backbone_weights(model, cfg.pretrained)
    return model
