"""Read a state dict from the files published backbones come in, executing nothing.

``.safetensors``; a torch file (``.bin``/``.pth``/``.pt``) loaded with ``weights_only=True`` (a pickle that
holds anything but tensors and plain containers is refused, not run); a folder holding ``model.safetensors``
or ``pytorch_model.bin`` (timm's ``save_for_hf`` and Hugging Face snapshots). Training checkpoints that wrap
the weights (``model``/``state_dict``/``teacher``) and Meta's chunked DINOv2 blocks are unwrapped.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from foundation.errors import CheckpointError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_CHUNKED = re.compile(r"^blocks\.\d+\.(\d+\.)")  # Meta's block_chunks layout: blocks.<chunk>.<index>.


def weights_in_folder(folder: Path) -> Path:
    """The weights file of a model folder, or a CheckpointError naming what is looked for."""
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(
        f"{folder}: holds no weights ({' or '.join(WEIGHT_FILES)}); put the weights file next to its config.json"
    )


def _torch_file(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = [line.strip() for line in str(e).splitlines() if "Unsupported global" in line]
        if not refused:
            raise CheckpointError(f"{path}: cannot read weights: {str(e).strip().splitlines()[-1]}") from e
        raise CheckpointError(
            f"{path}: not a plain state dict: torch.load(weights_only=True) refused it and nothing in it was run "
            f"({refused[0]}); save the weights with torch.save(model.state_dict()) or as .safetensors"
        ) from e
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read weights: {e}") from e


def _unchunk(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``blocks.<chunk>.<i>.x`` -> ``blocks.<i>.x``: Meta's chunks pad with Identity, so ``i`` is global."""
    if not any(_CHUNKED.match(k) for k in state):
        return state
    return {_CHUNKED.sub(r"blocks.\1", k): v for k, v in state.items()}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors``, a torch file (``weights_only=True``) or a model folder.

    Raises:
        CheckpointError: missing, unreadable, refused pickle, or not a dict of tensors.
    """
    path = Path(path)
    if path.is_dir():
        path = weights_in_folder(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        try:
            return _unchunk(load_file(str(path)))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot read weights: {e}") from e
    obj = _torch_file(path)
    for key in ("model", "state_dict", "teacher"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: expected a state dict of tensors; {bad[:3]} are not tensors")
    return _unchunk(obj)
