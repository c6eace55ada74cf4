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
from foundation.models.sources import BackboneSource, parse_source
from foundation.models.state_files import WEIGHT_FILES, read_state_dict
from foundation.models.vit import ViT, build_vit, build_vit_to_load
from foundation.models.weights import load_backbone_weights
from foundation.outputs import building_dir, check_output_dir
from foundation.train import checkpoint as ckpt


def timm_model_args(backbone: ViT) -> dict[str, Any]:
    """What ``timm.create_model(backbone.timm_name, **args)`` needs to build this very variant."""
    args = dict(backbone.timm_args)
    args["img_size"] = int(backbone.patch_embed.img_size[0])
    args["in_chans"] = int(backbone.in_chans)
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
        "architecture": backbone.timm_name if backbone.spatial_dims == 2 else "foundation_vit3d",
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


def _load_exact(model: ViT, state: dict[str, torch.Tensor], source: BackboneSource) -> None:
    """Our own exports and checkpoints hold exactly the model's keys (an export leaves out mask_token)."""
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise CheckpointError(
            f"{source.given}: weights are from another architecture than its config: {e}"
        ) from e
    if [k for k in result.missing_keys if k != "mask_token"] or result.unexpected_keys:
        raise CheckpointError(f"{source.given}: weights do not match its config ({result})")


def resolve_backbone_source(path: str | Path) -> Path:
    """The file or folder the weights of a source come from (run folder -> its export or latest checkpoint)."""
    src = parse_source(path)
    if src.weights is None:  # a checkpoint: its own file
        given = Path(src.given)
        return given if given.is_file() else ckpt.latest_checkpoint(given) or given
    return src.weights.parent if src.weights.name in WEIGHT_FILES else src.weights


def load_backbone(path: str | Path) -> tuple[ViT, dict[str, Any]]:
    """Load a backbone from any source :mod:`foundation.models.sources` accepts, with its metadata
    (``backbone_args``, ``mean``/``std`` of the weights where known, ``source``, ``kind``).

    Raises:
        CheckpointError: see :func:`parse_source`; a bare weights file that names no architecture.
    """
    src = parse_source(path)
    if src.backbone_args is None:
        raise CheckpointError(
            f"{src.given}: a bare weights file does not say its architecture; give it as timm:NAME:{src.given} "
            f"(e.g. timm:vit_small_patch14_dinov2:{src.given}), or a folder with its config.json"
        )
    model = build_vit_to_load(**src.backbone_args)  # every parameter but mask/register tokens is loaded
    state = src.read_state()
    if src.kind in ("export", "checkpoint"):
        _load_exact(model, state, src)
    else:
        load_backbone_weights(model, src.weights or src.given, state=state)
    cfg = {k: src.pretrained_cfg[k] for k in ("mean", "std", "input_size") if k in src.pretrained_cfg}
    meta = {
        "backbone_args": src.backbone_args,
        **cfg,
        **{k: v for k, v in src.extra.items() if v is not None},
        "source": str(resolve_backbone_source(path)),
        "kind": src.kind,
    }
    return model, meta


def random_like(meta: dict[str, Any], seed: int = 0) -> ViT:
    """An untrained backbone of the same architecture (the ``--random-init`` baseline), initialised from ``seed``
    on a forked RNG: the same seed gives the same twin, and the caller's random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_vit(**meta["backbone_args"])
