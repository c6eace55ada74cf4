"""Backbones out and back in: ``model.safetensors`` + timm ``config.json``.

A 2D export loads with ``timm.create_model("local-dir:DIR", pretrained=True)`` and no project code: the
config names a registered timm architecture and passes every shape argument as ``model_args``. 3D
backbones have no timm counterpart; they are written the same way and load with :func:`load_backbone`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from foundation.errors import CheckpointError
from foundation.models.vit import ARCHS, ViT, build_vit
from foundation.models.weights import read_state_dict
from foundation.outputs import building_dir, check_output_dir
from foundation.train import checkpoint as ckpt

_TIMM_ARCH = "vit_base_patch16_224"  # any registered ViT entry point: model_args override every shape


def timm_model_args(backbone: ViT) -> dict[str, Any]:
    args = dict(backbone.timm_args)
    args["img_size"] = int(backbone.patch_embed.img_size[0])
    return args


EXPORT_KIND = "export"


def export_backbone(
    backbone: ViT,
    backbone_args: dict[str, Any],
    out_dir: Path,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    extra: dict[str, Any] | None = None,
    overwrite: bool = False,
    inputs: Sequence[Path] = (),
) -> Path:
    """Write ``out_dir/{model.safetensors,config.json}``: built in a temporary folder, read back and compared,
    then renamed into place. An existing ``out_dir`` must be empty or an export of ours (``overwrite``), and
    neither be nor hold one of ``inputs`` (the run being exported)."""
    out_dir = Path(out_dir)
    check_output_dir(out_dir, EXPORT_KIND, overwrite=overwrite, inputs=inputs)
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items() if k != "mask_token"}
    size = backbone_args["img_size"]
    spatial = (size,) * backbone.spatial_dims
    config = {
        "architecture": _TIMM_ARCH if backbone.spatial_dims == 2 else "foundation_vit3d",
        "num_features": backbone.embed_dim,
        "pretrained_cfg": {
            "input_size": [backbone.in_chans, *spatial],
            "mean": [float(m) for m in mean],
            "std": [float(s) for s in std],
            "num_classes": 0,
            "interpolation": "bicubic",
            "crop_pct": 1.0,
        },
        "model_args": timm_model_args(backbone),
        "foundation": {"backbone_args": backbone_args, **(extra or {})},
    }
    with building_dir(out_dir, EXPORT_KIND, overwrite=overwrite) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        _verify_export(tmp, state, config)
    return out_dir


def _verify_export(folder: Path, state: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """Read the written files back: the same tensors, the same config (a short write raises here)."""
    written = read_state_dict(folder / "model.safetensors")
    if written.keys() != state.keys() or any(not torch.equal(written[k], state[k]) for k in state):
        raise CheckpointError(f"{folder / 'model.safetensors'}: read back differs from what was written")
    if json.loads((folder / "config.json").read_text()) != json.loads(json.dumps(config)):
        raise CheckpointError(f"{folder / 'config.json'}: read back differs from what was written")


def _from_export(path: Path) -> tuple[ViT, dict[str, Any]]:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / 'config.json'}: not a readable export config ({e})") from e
    args = config.get("foundation", {}).get("backbone_args")
    if args is None:  # a plain timm export: rebuild from model_args
        m = config["model_args"]
        arch = next(
            (
                a
                for a, (d, n, h) in ARCHS.items()
                if (d, n, h) == (m["embed_dim"], m["depth"], m["num_heads"])
            ),
            None,
        )
        if arch is None:
            raise CheckpointError(f"{path}: unsupported architecture {m}")
        args = dict(
            arch=arch,
            in_chans=m.get("in_chans", 3),
            spatial_dims=2,
            img_size=m.get("img_size", 224),
            patch_size=m.get("patch_size", 16),
            reg_tokens=m.get("reg_tokens", 0),
            init_values=m.get("init_values"),
            qkv_bias=m.get("qkv_bias", True),
        )
    model = build_vit(**args, init_weights=False)
    try:
        result = model.load_state_dict(read_state_dict(path / "model.safetensors"), strict=False)
    except RuntimeError as e:
        raise CheckpointError(
            f"{path}: weights are from another architecture than its config.json: {e}"
        ) from e
    if [k for k in result.missing_keys if k != "mask_token"] or result.unexpected_keys:
        raise CheckpointError(f"{path}: weights do not match its config.json ({result})")
    meta = {"backbone_args": args, **config.get("pretrained_cfg", {}), "source": str(path)}
    return model, meta


def _from_checkpoint(path: Path) -> tuple[ViT, dict[str, Any]]:
    state = ckpt.load_checkpoint(path)
    args = state.get("backbone_args")
    prefix = state.get("export_prefix")
    if args is None or prefix is None:
        raise CheckpointError(f"{path} is not a checkpoint written by `foundation pretrain`")
    model = build_vit(**args, init_weights=False)
    weights = {k[len(prefix) :]: v for k, v in state["model"].items() if k.startswith(prefix)}
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: backbone weights do not load: {e}") from e
    meta = {
        "backbone_args": args,
        **state.get("normalization", {}),
        "source": str(path),
        "step": state["step"],
    }
    return model, meta


def resolve_backbone_source(path: str | Path) -> Path:
    """A run folder (its export, else its latest checkpoint), an export folder, or a checkpoint file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"--backbone {str(path)!r} does not exist")
    if path.is_dir():
        if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
            return path
        if (path / "export" / "config.json").is_file():
            return path / "export"
        latest = ckpt.latest_checkpoint(path)
        if latest is not None:
            return latest
        raise CheckpointError(
            f"{path} holds neither an export (config.json + model.safetensors) nor checkpoints"
        )
    return path


def load_backbone(path: str | Path) -> tuple[ViT, dict[str, Any]]:
    """Load a backbone from a run folder, export folder or checkpoint file, with its metadata
    (``backbone_args``, ``mean``, ``std``)."""
    src = resolve_backbone_source(path)
    if src.is_dir():
        return _from_export(src)
    return _from_checkpoint(src)


def random_like(meta: dict[str, Any]) -> ViT:
    """An untrained backbone of the same architecture (the ``--random-init`` baseline)."""
    torch.manual_seed(0)
    return build_vit(**meta["backbone_args"])
