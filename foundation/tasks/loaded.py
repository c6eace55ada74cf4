"""A fine-tuned task model read back for inference: the one path every task's ``Task.load`` takes.

``load_task_model`` reads the file (``foundation.tasks.checkpoint``), types its ``task_meta`` with the task's
reader, rebuilds the network from that value and loads the weights, so commands, bundles and benchmarks all get
the same :class:`LoadedTask` and never read ``task_meta`` keys themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from torch import nn

from foundation.tasks.checkpoint import MODEL_FILE, load_net_weights, load_task_checkpoint

M = TypeVar("M")


@dataclass(frozen=True)
class LoadedTask(Generic[M]):
    """A fine-tuned model ready for inference.

    Attributes:
        net: the network, weights loaded, in eval mode, on the CPU.
        meta: the task's typed inference metadata (e.g. ``CanopyMeta``).
        source: the file read (``RUN/model.pt`` or a training checkpoint).
        step: the training step the weights are from.
        backbone_args: what rebuilt the backbone (a bundle writes them into its network definition).
        config: the run's resolved config as stored (empty for files that hold none).
    """

    net: nn.Module
    meta: M
    source: Path
    step: int
    backbone_args: dict[str, Any]
    config: dict[str, Any]

    @property
    def run_dir(self) -> Path:
        """The run folder the model came from (``RUN`` of ``RUN/model.pt`` or ``RUN/checkpoints/step_N.pt``)."""
        return self.source.parent if self.source.name == MODEL_FILE else self.source.parent.parent


def load_task_model(
    path: str | Path,
    task: str,
    read_meta: Callable[[dict[str, Any], Path], M],
    build_net: Callable[[dict[str, Any], M], nn.Module],
) -> LoadedTask[M]:
    """Read a ``task`` model: its metadata typed by ``read_meta(task_meta, source)``, its network built by
    ``build_net(backbone_args, meta)`` and loaded with the stored weights.

    Raises:
        CheckpointError: unreadable file, a model of another task, broken metadata (file and key named), or
            weights that do not fit the network the metadata describes.
    """
    ckpt = load_task_checkpoint(path, task)
    meta = read_meta(ckpt.task_meta, ckpt.source)
    net = load_net_weights(build_net(dict(ckpt.backbone_args), meta), ckpt)
    return LoadedTask(
        net=net.eval(),
        meta=meta,
        source=ckpt.source,
        step=ckpt.step,
        backbone_args=dict(ckpt.backbone_args),
        config=dict(ckpt.config),
    )
