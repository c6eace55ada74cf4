"""The seam between the engine and a downstream task.

A task (canopy height, organ segmentation, ...) lives in its domain package and is registered under the
``foundation.tasks`` entry-point group. ``foundation finetune TASK`` loads the backbone, asks the task for its
:class:`TaskParts` and hands them to the same :class:`~foundation.train.engine.Trainer` that pretrains: resume,
DDP, AMP, gradient accumulation, non-finite guard and SIGTERM checkpoints come for free.

Everything a fine-tuning run trains on is in its config: ``task.options`` (typed by the task's ``options_type``),
``task.inputs`` (its data, typed by ``inputs_type``; the task's flags fill them through :func:`add_config_flag`),
``task.backbone`` / ``task.random_init``. So ``RUN/config.yaml`` alone re-runs it:
``foundation finetune TASK --config RUN/config.yaml --out OTHER``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn
from torch.utils.data import Dataset

from foundation.config import Config
from foundation.models.vit import ViT
from foundation.tasks.loaded import LoadedTask
from foundation.tasks.meta import TaskMeta

FLAG_DEST = "config:"  # argparse dest prefix of a flag that fills a config key


def add_config_flag(parser: argparse.ArgumentParser, flag: str, key: str, **kwargs: Any) -> None:
    """A ``finetune`` flag that fills the config key ``key`` (``task.inputs.images``): the flag wins over the
    recipe and ``key=value`` overrides, and the run's ``config.yaml`` records the value."""
    kwargs.setdefault("metavar", flag.lstrip("-").upper().replace("-", "_"))
    parser.add_argument(flag, dest=FLAG_DEST + key, **kwargs)


def config_flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The config flags given on the command line, as a nested dict for ``load_config(values=...)``."""
    nested: dict[str, Any] = {}
    for dest, value in vars(args).items():
        if not dest.startswith(FLAG_DEST) or value is None:
            continue
        *sections, last = dest[len(FLAG_DEST) :].split(".")
        node = nested
        for part in sections:
            node = node.setdefault(part, {})
        node[last] = value
    return nested


LossFn = Callable[[Any, dict[str, Any]], dict[str, torch.Tensor]]
Validate = Callable[[nn.Module, torch.device], dict[str, float]]


@dataclass
class TaskParts:
    """What a task hands to the engine.

    Attributes:
        net: the inference network, ``net(batch[input_key]) -> prediction``; it holds our ViT as ``net.backbone``.
        loss: ``loss(prediction, batch) -> {"loss": scalar, ...}`` (extra keys are logged).
        dataset: ``dataset[i]`` is a dict of tensors and a pure function of ``(cfg.seed, i)`` (use
            :func:`foundation.data.seeding.generator_for`), so resume and DDP are exact; it may be endless.
        collate: batch collation; default ``torch.utils.data.default_collate``.
        validate: optional ``validate(net, device) -> {metric: value}``, run on the main rank every
            ``train.eval_every`` steps and at the end; values go to ``metrics.jsonl`` as ``val/<metric>``.
        meta: the task's typed inference metadata (a :class:`~foundation.tasks.meta.TaskMeta`: normalisation,
            bands, spacing, class names, head arguments, ...); its ``to_dict()`` is stored in every checkpoint
            under ``"task_meta"`` and ``Task.load`` reads it back. A plain JSON-able dict is stored as it is.
        input_key: the batch key fed to ``net``, or a tuple of keys fed as positional arguments (a bag of
            features and its padding mask).
        inputs_identity: for a task without a backbone, what its inputs are (the features' backbone and width,
            the splits): stored in checkpoints where the backbone's arguments go, so resuming on other inputs is
            refused before anything changes.
    """

    net: nn.Module
    loss: LossFn
    dataset: Dataset
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None
    validate: Validate | None = None
    meta: TaskMeta | dict[str, Any] = field(default_factory=dict)
    input_key: str | tuple[str, ...] = "image"
    inputs_identity: dict[str, Any] | None = None


@runtime_checkable
class Task(Protocol):
    """A downstream task. ``name`` is the CLI name (``foundation finetune canopy-height``).

    A task that trains on features made earlier (``foundation embed``) sets ``uses_backbone = False``: finetune
    then loads no backbone, ``build`` gets ``backbone=None`` and the run exports no backbone.
    """

    name: str
    domain: str
    default_config: Path  # the recipe used when --config is not given
    options_type: type  # dataclass of task.options (may define from_options(options, cfg))
    inputs_type: type  # dataclass of task.inputs; foundation.options.path_field values are made absolute

    def add_finetune_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Task-specific flags of ``foundation finetune NAME`` (e.g. ``--images``, ``--labels``), each filling a
        config key through :func:`add_config_flag`."""

    def build(self, cfg: Config, backbone: ViT | None, backbone_meta: dict[str, Any]) -> TaskParts:
        """Data, network and loss for training ``backbone`` (already loaded, on CPU) on this task; the data
        comes from ``cfg.task.typed_inputs``, the settings from ``cfg.task.typed_options``."""

    def data_channels(self, cfg: Config) -> int | None:
        """The channel count of the task's data, so ``--random-init`` builds a matching backbone; None: the
        recipe's ``model.in_chans`` or the domain's default spec decides."""

    def add_evaluate_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Flags of ``foundation evaluate NAME``."""

    def evaluate(self, args: argparse.Namespace) -> dict[str, Any]:
        """Metrics of a fine-tuned checkpoint on labelled data; printed as one JSON line (the command exits 1
        when the result has a non-empty ``"skipped"`` list)."""

    def load(self, path: str | Path) -> LoadedTask:
        """The fine-tuned model at ``path`` (``RUN/model.pt``, a run folder or a training checkpoint) for
        inference: the network in eval mode and the task's typed metadata, read and checked once (most tasks
        call :func:`foundation.tasks.loaded.load_task_model`).

        Raises:
            CheckpointError: unreadable, a model of another task, broken metadata (file and key named), or
                weights that do not fit.
        """


class TaskModel(nn.Module):
    """``net`` + ``loss`` in the shape of an SSL objective, so the engine trains it unchanged.

    With ``freeze_backbone`` only the head learns (linear-probe style dense training); the backbone then runs in
    eval mode and without autograd, which also saves the activation memory. With ``uses_backbone=False`` the
    network has no backbone (a head on precomputed features): nothing is frozen or exported.
    """

    backbone_prefix = "net.backbone."
    export_prefix = "net.backbone."

    def __init__(
        self,
        net: nn.Module,
        loss: LossFn,
        *,
        input_key: str | tuple[str, ...] = "image",
        freeze_backbone: bool = False,
        uses_backbone: bool = True,
    ):
        super().__init__()
        if uses_backbone and not isinstance(getattr(net, "backbone", None), ViT):
            raise TypeError("a task network must hold its foundation ViT as `net.backbone`")
        self.net = net
        self.loss = loss
        self.input_key = input_key
        self.freeze_backbone = freeze_backbone and uses_backbone
        if not uses_backbone:
            return
        if freeze_backbone:
            net.backbone.requires_grad_(False)
        mask_token = getattr(net.backbone, "mask_token", None)
        if isinstance(mask_token, nn.Parameter):  # pretraining-only; DDP refuses parameters without gradients
            mask_token.requires_grad_(False)

    @property
    def student_backbone(self) -> ViT | None:
        return getattr(self.net, "backbone", None)

    def train(self, mode: bool = True) -> TaskModel:
        super().train(mode)
        if self.freeze_backbone:
            self.net.backbone.eval()
        return self

    def trainable_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.named_parameters() if p.requires_grad)

    def update_teacher(self, step: int) -> dict[str, float]:
        return {}

    def export_backbone(self) -> ViT | None:
        return getattr(self.net, "backbone", None)

    def forward(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        if isinstance(self.input_key, tuple):
            return self.loss(self.net(*(batch[k] for k in self.input_key)), batch)
        return self.loss(self.net(batch[self.input_key]), batch)
