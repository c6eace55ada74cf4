"""Where a backbone comes from: one parser for every ``--backbone``/``--checkpoint``/``model.pretrained``.

Accepted (no network at run time, ever):

- this project's run folder (its ``export/``, else its latest checkpoint), export folder, checkpoint file or
  sharded checkpoint folder (``train.parallel=fsdp``);
- a timm / Hugging Face model folder: ``config.json`` with ``architecture`` (+ ``model_args``,
  ``pretrained_cfg``) and ``model.safetensors`` or ``pytorch_model.bin`` (``timm.models.save_for_hf``, hub
  snapshots);
- ``timm:NAME:FILE``: a bare ``.safetensors``/``.bin``/``.pth`` of timm architecture NAME (mean/std from
  timm's pretrained config for NAME);
- Meta's DINOv2 ``.pth`` (``dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth``), recognised by its keys;
- (``model.pretrained`` only) a bare weights file of the configured ``model.arch``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch

from foundation.errors import CheckpointError, ConfigError
from foundation.models.state_files import WEIGHT_FILES, read_state_dict, weights_in_folder
from foundation.models.vit import TIMM_PREFIX, check_timm_name, resolve_timm_backbone_args

_HUB_PREFIXES = ("hf-hub:", "hf_hub:", "hf:")
_META_SIZES = {384: "small", 768: "base", 1024: "large", 1536: "giant"}


@dataclass(frozen=True)
class BackboneSource:
    """What a source string names. ``backbone_args`` None: bare weights, the config's model.arch decides."""

    given: str
    kind: str  # export | checkpoint | timm-folder | timm-file | meta-dinov2 | weights
    backbone_args: dict[str, Any] | None
    weights: Path | None  # the file to read weights from (None: ``state`` already read)
    pretrained_cfg: dict[str, Any] = field(default_factory=dict)
    state: dict[str, torch.Tensor] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. a checkpoint's step and normalisation

    def read_state(self) -> dict[str, torch.Tensor]:
        return self.state if self.state is not None else read_state_dict(self.weights)


def _how_to_give(name: str) -> str:
    return (
        f"no network is used: download it once (e.g. `huggingface-cli download timm/{name} --local-dir DIR`) "
        f"and give DIR (a folder with config.json), or timm:{name.split('.')[0]}:/path/to/weights.safetensors"
    )


def _timm_pretrained_cfg(name: str) -> dict[str, Any]:
    cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=True)
    if cfg is None:
        return {}
    return {
        k: list(v) if isinstance(v, tuple) else v
        for k, v in cfg.to_dict().items()
        if k in ("mean", "std", "input_size")
    }


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable config.json ({e})") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: config.json is not an object")
    return config


def _from_folder(folder: Path, given: str) -> BackboneSource:
    config = _read_config(folder / "config.json")
    pretrained_cfg = config.get("pretrained_cfg") or {}
    ours = (config.get("foundation") or {}).get("backbone_args")
    if ours is not None:
        return BackboneSource(given, "export", dict(ours), folder / "model.safetensors", pretrained_cfg)
    name = config.get("architecture")
    if not isinstance(name, str):
        hint = " (a transformers config.json; give the timm layout)" if "model_type" in config else ""
        raise CheckpointError(f"{folder / 'config.json'}: names no timm 'architecture'{hint}")
    try:
        check_timm_name(name, where=str(folder / "config.json"))
        args = resolve_timm_backbone_args(name, dict(config.get("model_args") or {}))
    except ConfigError as e:
        raise CheckpointError(str(e)) from e
    return BackboneSource(given, "timm-folder", args, weights_in_folder(folder), pretrained_cfg)


def _meta_dinov2(state: dict[str, torch.Tensor]) -> str | None:
    """The timm name of a Meta DINOv2 state dict (``mask_token`` + patch 14), or None."""
    w = state.get("patch_embed.proj.weight")
    if "mask_token" not in state or w is None or tuple(w.shape[2:]) != (14, 14):
        return None
    size = _META_SIZES.get(int(w.shape[0]))
    if size is None:
        return None
    return f"vit_{size}_patch14_{'reg4_' if 'register_tokens' in state else ''}dinov2"


def _from_file(path: Path, given: str) -> BackboneSource:
    if path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        obj = _checkpoint_of_ours(path)
        if obj is not None:
            prefix = obj["export_prefix"]
            state = {k[len(prefix) :]: v for k, v in obj["model"].items() if k.startswith(prefix)}
            extra = {"step": obj.get("step"), **obj.get("normalization", {})}
            return BackboneSource(
                given, "checkpoint", dict(obj["backbone_args"]), None, state=state, extra=extra
            )
    state = read_state_dict(path)
    name = _meta_dinov2(state)
    if name is None:
        return BackboneSource(given, "weights", None, path, state=state)
    args = resolve_timm_backbone_args(name, {})
    return BackboneSource(given, "meta-dinov2", args, path, _timm_pretrained_cfg(name), state=state)


def _from_sharded(path: Path, given: str) -> BackboneSource:
    """A sharded (FSDP/DCP) checkpoint folder: its exported backbone assembled from every rank's shards, in
    this process alone (no process group)."""
    from foundation.train import dcp  # the training package imports models; import late

    meta = dcp.read_meta(path)
    state = dcp.read_tensors(path, meta["export_prefix"])
    extra = {"step": meta.get("step"), **meta.get("normalization", {})}
    return BackboneSource(given, "checkpoint", dict(meta["backbone_args"]), None, state=state, extra=extra)


def _checkpoint_of_ours(path: Path) -> dict[str, Any] | None:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None  # read_state_dict gives the reason
    if isinstance(obj, dict) and "backbone_args" in obj and "export_prefix" in obj and "model" in obj:
        return obj
    return None


def _timm_spec(spec: str) -> BackboneSource:
    name, _, file = spec[len(TIMM_PREFIX) :].partition(":")
    try:
        check_timm_name(name.split(".")[0], where=spec)
    except ConfigError as e:
        raise CheckpointError(str(e)) from e
    if not file:
        raise CheckpointError(f"{spec!r} names no weights file; {_how_to_give(name)}")
    path = Path(file)
    if path.is_dir():
        path = weights_in_folder(path)
    if not path.is_file():
        raise CheckpointError(f"{spec!r}: weights file {file!r} does not exist")
    args = resolve_timm_backbone_args(name.split(".")[0], {})
    return BackboneSource(spec, "timm-file", args, path, _timm_pretrained_cfg(name))


def parse_source(spec: str | Path) -> BackboneSource:
    """Find out what ``spec`` names; reads config files, and the weights only where they say what they are.

    Raises:
        CheckpointError: it does not exist, names a hub model without a local file, or is unreadable.
    """
    given = str(spec)
    if given.startswith(TIMM_PREFIX):
        return _timm_spec(given)
    if given.startswith(_HUB_PREFIXES):
        raise CheckpointError(
            f"{given!r} is a hub name; {_how_to_give(given.split(':', 1)[1].split('/')[-1])}"
        )
    path = Path(given)
    if not path.exists():
        hint = f"; {_how_to_give(given)}" if timm.is_model(given.split(".")[0]) else ""
        raise CheckpointError(f"{given!r} does not exist{hint}")
    if path.is_file():
        return _from_file(path, given)
    if (path / ".metadata").is_file():
        return _from_sharded(path, given)
    if (path / "config.json").is_file():
        return _from_folder(path, given)
    if (path / "export" / "config.json").is_file():
        return _from_folder(path / "export", given)
    from foundation.train import checkpoint as ckpt  # the training package imports models; import late

    latest = ckpt.latest_checkpoint(path)
    if latest is not None:
        return _from_sharded(latest, given) if latest.is_dir() else _from_file(latest, given)
    if any((path / name).is_file() for name in WEIGHT_FILES):
        raise CheckpointError(f"{path}: holds weights but no config.json; give it as timm:NAME:{path}")
    raise CheckpointError(
        f"{path} holds neither an export or model folder (config.json + weights) nor checkpoints"
    )
