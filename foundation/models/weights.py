"""Starting weights into a built backbone through timm's own checkpoint filter.

``checkpoint_filter_fn`` converts Meta's DINOv2 keys (``register_tokens``, SwiGLU ``w12``/``w3``) and
resamples position tables and patch kernels; what is ours: dropping a classifier head (said once),
refusing a position table laid out for another ``no_embed_class`` (the silent-wrong-answer case), and
logging the change of channels. RGB -> N-channel patch embeddings are timm's own ``adapt_input_conv``: the
RGB filters repeated cyclically, cut to N and scaled by 3/N (summed for N = 1), so an image whose bands
repeat its RGB channels (N a multiple of 3, or grey for N = 1) gives the RGB model's patch embedding.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from timm.models import adapt_input_conv
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
    """Map patch-embedding filters ``(E, C_src, *k)`` to ``in_chans`` channels by timm's ``adapt_input_conv``.

    Same count: unchanged. An RGB source goes through timm's function itself: the filters repeated
    cyclically, cut to ``in_chans`` and scaled by ``3 / in_chans``; for ``in_chans == 1`` summed. A 3D
    kernel ``(E, 3, p, p, p)`` is flattened to 4-D for it (timm takes Conv2d weights only; its rule acts on
    the channel axis alone, so this is exact). Other source counts: :func:`_adapt_channels`.
    """
    src = weight.shape[1]
    if src == in_chans:
        return weight
    if src != 3:
        return _adapt_channels(weight, in_chans)
    flat = weight.reshape(*weight.shape[:3], -1)  # (E, 3, p, p) as is; (E, 3, p, p, p) -> (E, 3, p, p * p)
    out = adapt_input_conv(in_chans, flat)
    return out.reshape(weight.shape[0], in_chans, *weight.shape[2:])


def _adapt_channels(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """``adapt_input_conv``'s rule for a source of ``C != 3`` channels (e.g. our own 12-band run given to
    4-band data): summed for one channel, else the filters repeated cyclically, cut to ``in_chans`` and
    scaled by ``C / in_chans``. timm's function assumes an RGB source (a 3-channel target returns a
    ``C``-channel weight unchanged, others raise) and takes ``base_chans`` only in newer timm releases."""
    src, dtype = weight.shape[1], weight.dtype
    w = weight.float()
    if in_chans == 1:
        out = w.sum(dim=1, keepdim=True)
    else:
        reps = [1] * w.ndim
        reps[1] = math.ceil(in_chans / src)
        out = w.repeat(*reps)[:, :in_chans] * (src / in_chans)
    return out.to(dtype)


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
        src, n = w.shape[1], model.in_chans
        rule = (
            f"the {src} filters summed"
            if n == 1
            else f"the {src} filters repeated cyclically, cut to {n} and scaled by {src}/{n}"
        )
        log.warning(
            "%s: patch embedding expanded from %d to %d input channels (timm's adapt_input_conv: %s)",
            source,
            src,
            n,
            rule,
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
