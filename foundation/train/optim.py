"""AdamW parameter groups: layer-wise lr decay, patch-embedding lr multiplier, no decay on biases/norms/tokens,
and a flag for the head's last layer (frozen for the first steps in DINOv2)."""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from foundation.config import OptimConfig
from foundation.models.vit import ViT


def build_param_groups(
    trainable: list[tuple[str, nn.Parameter]], backbone: ViT | None, backbone_prefix: str, cfg: OptimConfig
) -> list[dict]:
    """Group ``trainable`` (name, param) pairs by (lr multiplier, wd multiplier, last-layer flag).

    Args:
        trainable: the student's named parameters.
        backbone: the student backbone, for layer ids (lr decay ``layer_decay ** (depth + 1 - layer_id)``);
            None for a head trained on precomputed features.
        backbone_prefix: name prefix of backbone parameters inside ``trainable``.
    """
    n_layers = len(backbone.blocks) + 1 if backbone is not None else 0
    no_wd = backbone.no_weight_decay() if backbone is not None else set()
    groups: dict[tuple, list[nn.Parameter]] = defaultdict(list)
    for name, param in trainable:
        if not param.requires_grad:
            continue
        lr_mult = 1.0
        local = (
            name[len(backbone_prefix) :]
            if backbone is not None and name.startswith(backbone_prefix)
            else None
        )
        if local is not None:
            lr_mult = cfg.layer_decay ** (n_layers - backbone.layer_id(local))
            if local.startswith("patch_embed"):
                lr_mult *= cfg.patch_embed_lr_mult
        leaf = name.rsplit(".", 1)[-1]
        skip_wd = (
            param.ndim <= 1 or leaf in no_wd or (local is not None and local in no_wd) or leaf == "gamma"
        )
        is_last_layer = "last_layer" in name
        groups[(lr_mult, 0.0 if skip_wd else 1.0, is_last_layer)].append(param)
    return [
        {
            "params": params,
            "lr_mult": lr_m,
            "wd_mult": wd_m,
            "is_last_layer": last,
            "lr": 0.0,
            "weight_decay": 0.0,
        }
        for (lr_m, wd_m, last), params in sorted(groups.items(), key=lambda kv: kv[0])
    ]


def build_optimizer(param_groups: list[dict], cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    # The fused kernel exists for CPU and CUDA and is several times faster than the per-tensor loop.
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(param_groups, betas=tuple(cfg.betas), fused=fused)


def apply_schedules(optimizer: torch.optim.Optimizer, lr: float, wd: float, freeze_last_layer: bool) -> None:
    """Set every group's lr and weight decay for this step."""
    for group in optimizer.param_groups:
        group["lr"] = 0.0 if (freeze_last_layer and group["is_last_layer"]) else lr * group["lr_mult"]
        group["weight_decay"] = wd * group["wd_mult"]
