"""Starting weights from a local file: timm/safetensors state dicts, RGB -> N-channel patch embeddings.

"Continue pretraining from RGB weights on 12-band rasters" is common; the N-channel filters start as the
mean of the RGB filters scaled by 3/N (DINOv3's recipe), so the first layer's response keeps its scale.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from safetensors.torch import load_file

from foundation.errors import CheckpointError
from foundation.models.pos_embed import resample_pos_embed
from foundation.models.vit import ViT

log = logging.getLogger(__name__)

_IGNORED_PREFIXES = ("head.", "fc_norm.", "attn_pool.")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file (``weights_only=True``), or an export dir."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise CheckpointError(f"weights file {str(path)!r} does not exist")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read weights: {e}") from e
    for key in ("model", "state_dict", "teacher"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return obj


def expand_patch_embed(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Map patch-embedding filters ``(E, C_src, *k)`` to ``in_chans`` channels.

    Same count: unchanged. Otherwise every new channel starts as the mean over source channels scaled by
    ``C_src / in_chans`` (3/N for RGB), so a constant image gives the same response as before.
    """
    src = weight.shape[1]
    if src == in_chans:
        return weight
    mean = weight.mean(dim=1, keepdim=True)
    shape = [1] * weight.ndim
    shape[1] = in_chans
    return mean.repeat(*shape) * (src / in_chans)


def adapt_state_dict(state: dict[str, torch.Tensor], model: ViT) -> dict[str, torch.Tensor]:
    """Make a timm-style ViT state dict fit ``model``: drop heads, strip an embedded CLS position, resample
    the position grid and expand channels."""
    prefixes = ("backbone.", "module.", "encoder.")
    out = {}
    for key, value in state.items():
        for p in prefixes:
            if key.startswith(p):
                key = key[len(p) :]
        if key.startswith(_IGNORED_PREFIXES):
            continue
        out[key] = value
    if "pos_embed" in out:
        out["pos_embed"] = _patch_pos_embed(out, model)
    w = out.get("patch_embed.proj.weight")
    if w is not None:
        out["patch_embed.proj.weight"] = expand_patch_embed(w, model.in_chans)
    return out


def _grid_side(n: int, dims: int) -> int | None:
    side = round(n ** (1 / dims)) if n > 0 else 0
    return side if side > 0 and side**dims == n else None


def _patch_pos_embed(state: dict[str, torch.Tensor], model: ViT) -> torch.Tensor:
    """The patch part of a position table, resampled to the model's grid.

    timm tables may also hold positions for the CLS (and register) tokens (``no_embed_class=False``). The
    source's prefix count comes from its own ``cls_token``/``reg_token``; a table that is a whole grid once
    those are removed is read as carrying them.
    """
    pos = state["pos_embed"]
    n, dims = pos.shape[1], model.spatial_dims
    prefix = int("cls_token" in state) + (state["reg_token"].shape[1] if "reg_token" in state else 0)
    if prefix and _grid_side(n - prefix, dims):
        pos = pos[:, prefix:]
    side = _grid_side(pos.shape[1], dims)
    if side is None:
        raise CheckpointError(
            f"pos_embed with {n} tokens is neither a {dims}-D grid nor one plus {prefix} prefix tokens"
        )
    return resample_pos_embed(pos, (side,) * dims, tuple(model.patch_embed.grid_size))


def load_backbone_weights(model: ViT, path: str | Path) -> None:
    """Load starting weights into ``model`` or stop with the reason (never a silent random init).

    Raises:
        CheckpointError: unreadable file, or weights of another architecture.
    """
    state = adapt_state_dict(read_state_dict(path), model)
    own = model.state_dict()
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    if mismatched:
        raise CheckpointError(
            f"{path}: weights are from another architecture ({len(mismatched)} shape mismatches, e.g. "
            f"{'; '.join(mismatched[:3])}); set model.arch / model.patch_size to match"
        )
    result = model.load_state_dict(state, strict=False)
    optional = {"mask_token", "reg_token"}
    missing = [k for k in result.missing_keys if k not in optional]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{path}: weights do not match model (missing {missing[:5]}, unexpected {result.unexpected_keys[:5]})"
        )
    n = sum(math.prod(v.shape) for v in state.values())
    log.info("loaded %s parameters from %s", f"{n:,}", path)
