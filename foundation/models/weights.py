"""Starting weights into a built backbone through timm's own checkpoint filter.

``checkpoint_filter_fn`` converts Meta's DINOv2 keys (``register_tokens``, SwiGLU ``w12``/``w3``) and
resamples position tables and patch kernels; what is ours: dropping a classifier head (said once),
refusing a position table laid out for another ``no_embed_class`` (the silent-wrong-answer case), and RGB
-> N-channel patch embeddings: every new channel starts as the mean of the RGB filters scaled by 3/N
(DINOv3's recipe), so the first layer's response keeps its scale. The change of channels is logged.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from timm.models.vision_transformer import checkpoint_filter_fn

from foundation.errors import CheckpointError
from foundation.models.pos_embed import resample_pos_embed
from foundation.models.state_files import read_state_dict
from foundation.models.vit import ViT

log = logging.getLogger(__name__)

__all__ = ["adapt_state_dict", "expand_patch_embed", "load_backbone_weights", "read_state_dict"]

_PREFIXES = ("backbone.", "module.", "encoder.")
_HEAD = ("head.", "head_dist.")


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


def _grid_side(n: int, dims: int) -> int | None:
    side = round(n ** (1 / dims)) if n > 0 else 0
    return side if side > 0 and side**dims == n else None


def _strip(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for p in _PREFIXES:
            if key.startswith(p):
                key = key[len(p) :]
        out[key] = value
    heads = sorted(k for k in out if k.startswith(_HEAD))
    if heads:
        log.warning(
            "%s: classifier head dropped (%s); the backbone's features are used", source, ", ".join(heads)
        )
    return {k: v for k, v in out.items() if not k.startswith(_HEAD)}


def _check_pos_layout(state: dict[str, torch.Tensor], model: ViT, source: str) -> None:
    """Refuse a 2D position table whose prefix positions do not match the model's ``no_embed_class``."""
    pos = state.get("pos_embed")
    if pos is None or model.pos_embed is None or "register_tokens" in state:  # Meta+registers: timm converts
        return
    n = pos.shape[1]
    prefix = int("cls_token" in state) + (state["reg_token"].shape[1] if "reg_token" in state else 0)
    grid_n = math.prod(model.patch_embed.grid_size)
    if n in (grid_n, grid_n + prefix):  # the model's own grid decides when both readings are grids
        has_prefix_pos = prefix > 0 and n == grid_n + prefix
    else:
        has_prefix_pos = prefix > 0 and _grid_side(n - prefix, 2) is not None and _grid_side(n, 2) is None
    if has_prefix_pos == (not model.no_embed_class and model.num_prefix_tokens > 0):
        return
    if has_prefix_pos:
        what, fix = "holds positions for its CLS/register tokens (no_embed_class=False)", "false"
    else:
        what, fix = "holds patch positions only (no_embed_class=True)", "true"
    raise CheckpointError(
        f"{source}: pos_embed {tuple(pos.shape)} {what}, unlike the model; build the model with "
        f"model_args no_embed_class={fix} (model.model_args), or give the weights with their architecture "
        f"(a folder with config.json, or timm:NAME:PATH)"
    )


def _adapt_3d(state: dict[str, torch.Tensor], model: ViT, source: str) -> dict[str, torch.Tensor]:
    pos = state.get("pos_embed")
    if pos is not None:
        side = _grid_side(pos.shape[1], 3)
        if side is None:
            raise CheckpointError(f"{source}: pos_embed with {pos.shape[1]} tokens is not a 3-D grid")
        state["pos_embed"] = resample_pos_embed(pos, (side,) * 3, tuple(model.patch_embed.grid_size))
    return state


def adapt_state_dict(
    state: dict[str, torch.Tensor], model: ViT, source: str = "weights"
) -> dict[str, torch.Tensor]:
    """Make a timm, Meta DINOv2 or own state dict fit ``model`` (keys, position grid, channels)."""
    state = _strip(state, source)
    mask_token = state.get("mask_token")
    if model.spatial_dims == 3:
        state = _adapt_3d(state, model, source)
    else:
        _check_pos_layout(state, model, source)
        w = state.get("patch_embed.proj.weight")
        if w is not None and (w.ndim != 4 or tuple(w.shape[2:]) != (model.patch_size,) * 2):
            # timm would resample the kernel (FlexiViT); a wrong model.patch_size must not pass silently
            raise CheckpointError(
                f"{source}: weights are from another architecture: patch_embed.proj.weight {tuple(w.shape)} "
                f"vs patch size {model.patch_size}; set model.patch_size to match"
            )
        try:
            state = checkpoint_filter_fn(state, model)
        except (RuntimeError, ValueError, AssertionError) as e:
            raise CheckpointError(f"{source}: weights do not fit the architecture: {e}") from e
    if mask_token is not None and mask_token.numel() == model.embed_dim:
        state["mask_token"] = mask_token.reshape(1, -1)  # kept for iBOT; timm's DINOv2 conversion drops it
    w = state.get("patch_embed.proj.weight")
    if w is not None and w.shape[1] != model.in_chans:
        log.warning(
            "%s: patch embedding expanded from %d to %d input channels (mean of the filters x %d/%d)",
            source,
            w.shape[1],
            model.in_chans,
            w.shape[1],
            model.in_chans,
        )
        state["patch_embed.proj.weight"] = expand_patch_embed(w, model.in_chans)
    return state


def load_backbone_weights(model: ViT, path: str | Path, state: dict[str, torch.Tensor] | None = None) -> None:
    """Load starting weights into ``model`` or stop with the reason (never a silent random init).

    Raises:
        CheckpointError: unreadable file, or weights of another architecture.
    """
    source = str(path)
    state = adapt_state_dict(read_state_dict(path) if state is None else state, model, source)
    own = model.state_dict()
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    if mismatched:
        raise CheckpointError(
            f"{source}: weights are from another architecture ({len(mismatched)} shape mismatches, e.g. "
            f"{'; '.join(mismatched[:3])}); set model.arch / model.patch_size to match"
        )
    result = model.load_state_dict(state, strict=False)
    optional = {"mask_token", "reg_token"}
    missing = [k for k in result.missing_keys if k not in optional]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{source}: weights do not match model (missing {missing[:5]}, unexpected {result.unexpected_keys[:5]})"
        )
    if "reg_token" in result.missing_keys:
        log.warning(
            "%s: has no register tokens; the model's %d start untrained", source, model.num_reg_tokens
        )
    n = sum(math.prod(v.shape) for v in state.values())
    log.info("loaded %s parameters from %s", f"{n:,}", source)
