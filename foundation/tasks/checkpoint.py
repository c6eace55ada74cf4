"""Fine-tuned task models on disk: ``RUN/model.pt`` holds the network and what inference needs, nothing else.

``--checkpoint`` accepts that file, a run folder (its ``model.pt``, else its latest training checkpoint) or a
training checkpoint ``RUN/checkpoints/step_*.pt``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from foundation.errors import CheckpointError
from foundation.train import checkpoint as ckpt

MODEL_FILE = "model.pt"
_NET_PREFIX = "net."


@dataclass
class TaskCheckpoint:
    """A fine-tuned network's weights and metadata (``task_meta`` is what the task stored in its TaskParts)."""

    task: str
    task_meta: dict[str, Any]
    backbone_args: dict[str, Any]
    net_state: dict[str, torch.Tensor]
    config: dict[str, Any]
    source: Path
    step: int


def save_task_model(
    path: Path, *, task: str, task_meta: dict, backbone_args: dict, net: nn.Module, config: dict, step: int
) -> Path:
    """Atomically write the deployable model file (temporary name, fsync, rename)."""
    state = {
        "format": "foundation-task-model/1",
        "task": task,
        "task_meta": task_meta,
        "backbone_args": backbone_args,
        "net": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "config": config,
        "step": step,
    }
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def resolve_task_checkpoint(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"--checkpoint {str(path)!r} does not exist")
    if path.is_dir():
        if (path / MODEL_FILE).is_file():
            return path / MODEL_FILE
        latest = ckpt.latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(
                f"{path} holds neither {MODEL_FILE} nor checkpoints/ of `foundation finetune`"
            )
        return latest
    return path


def load_task_checkpoint(path: str | Path, task: str | None = None) -> TaskCheckpoint:
    """Read a fine-tuned model (safely, ``weights_only=True``).

    Args:
        path: model file, run folder or training checkpoint.
        task: when given, a checkpoint of another task is refused with a message naming both.

    Raises:
        CheckpointError: unreadable file, not a task checkpoint, or the wrong task.
    """
    src = resolve_task_checkpoint(path)
    state = ckpt.load_checkpoint(src)
    name = state.get("task")
    if name is None or "task_meta" not in state:
        raise CheckpointError(
            f"{src} is not a fine-tuned task model (a pretraining checkpoint or export?); "
            "train one with `foundation finetune TASK ...`"
        )
    if task is not None and name != task:
        raise CheckpointError(f"{src} is a {name!r} model, this command needs a {task!r} model")
    if "net" in state:
        net_state = state["net"]
    else:  # a training checkpoint: the TaskModel's weights, prefixed with "net."
        net_state = {k[len(_NET_PREFIX) :]: v for k, v in state["model"].items() if k.startswith(_NET_PREFIX)}
    return TaskCheckpoint(
        task=name,
        task_meta=state["task_meta"],
        backbone_args=state["backbone_args"],
        net_state=net_state,
        config=state.get("config", {}),
        source=src,
        step=int(state.get("step", 0)),
    )


def load_net_weights(net: nn.Module, checkpoint: TaskCheckpoint) -> nn.Module:
    """Load ``checkpoint``'s weights into a freshly built ``net``; a mismatch names the file."""
    try:
        net.load_state_dict(checkpoint.net_state)
    except RuntimeError as e:
        raise CheckpointError(
            f"{checkpoint.source}: weights do not fit the network its metadata describes: {e}"
        ) from e
    return net.eval()
