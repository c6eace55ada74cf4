"""Build the backbone a config asks for, with the domain's channel count and dimensionality.

With ``model.pretrained`` naming a source that says its architecture (our run/export/checkpoint, a timm
folder, ``timm:NAME:FILE``, Meta's DINOv2), that architecture is built (with the data's channels) and the
config's own shape keys are not used; a bare weights file loads into ``model.arch``.
"""

from __future__ import annotations

import logging
from typing import Any

from foundation.config import ModelConfig
from foundation.errors import ConfigError
from foundation.models.sources import parse_source
from foundation.models.vit import ViT, build_vit, resolve_timm_backbone_args, timm_arch_name
from foundation.models.weights import load_backbone_weights

log = logging.getLogger(__name__)


def backbone_args(cfg: ModelConfig, channels: int, spatial_dims: int) -> dict[str, Any]:
    """Everything needed to rebuild the backbone later (stored in checkpoints and exports)."""
    in_chans = cfg.in_chans or channels
    dims = cfg.spatial_dims or spatial_dims
    if cfg.pretrained:
        src = parse_source(cfg.pretrained)
        if src.backbone_args is not None:
            args = dict(src.backbone_args, in_chans=in_chans)
            if args["spatial_dims"] != dims:
                raise ConfigError(
                    f"model.pretrained={cfg.pretrained!r} is a {args['spatial_dims']}D backbone, the data is {dims}D"
                )
            return args
    name = timm_arch_name(cfg.arch)
    if name is not None:
        if dims != 2:
            raise ConfigError(f"model.arch={cfg.arch!r}: timm architectures are 2D; 3D uses the recipes")
        return resolve_timm_backbone_args(name, dict(cfg.model_args), in_chans=in_chans)
    args = dict(
        arch=cfg.arch,
        in_chans=in_chans,
        spatial_dims=dims,
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        reg_tokens=cfg.reg_tokens,
        init_values=cfg.layerscale_init,
        qkv_bias=cfg.qkv_bias,
    )
    if cfg.model_args:  # only when set, so older checkpoints' backbone_args stay equal
        args["model_args"] = dict(cfg.model_args)
    return args


def build_backbone(
    cfg: ModelConfig, channels: int, spatial_dims: int, *, load_pretrained: bool = True
) -> ViT:
    args = backbone_args(cfg, channels, spatial_dims)
    pretrained = bool(load_pretrained and cfg.pretrained)
    # initialised even when weights follow: registers a file lacks start from timm's init, not from garbage
    model = build_vit(**args, drop_path_rate=cfg.drop_path_rate)
    if pretrained:
        src = parse_source(cfg.pretrained)
        if src.backbone_args is not None:
            log.info("model.pretrained %s (%s): builds %s", cfg.pretrained, src.kind, args["arch"])
        load_backbone_weights(model, src.weights or cfg.pretrained, state=src.read_state())
    return model
