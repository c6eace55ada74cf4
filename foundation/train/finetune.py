"""``foundation finetune TASK``: a downstream head on a pretrained backbone, trained by the pretraining engine."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from foundation.config import Config, config_to_dict
from foundation.errors import ConfigError
from foundation.export import load_backbone
from foundation.models.factory import backbone_args, build_backbone
from foundation.tasks.base import Task, TaskModel, TaskParts
from foundation.tasks.checkpoint import MODEL_FILE, save_task_model
from foundation.train.distributed import DistInfo
from foundation.train.engine import Trainer, TrainingSetup, run_training
from foundation.train.run_folder import run_identity

log = logging.getLogger(__name__)


def task_setup(task: Task, cfg: Config) -> TrainingSetup:
    """Load the backbone (``task.backbone``, or a fresh one from ``cfg.model`` with ``task.random_init``), let
    the task build its parts, and wrap them for the engine."""
    torch.manual_seed(cfg.seed)  # the same head initialisation on every rank
    uses_backbone = getattr(task, "uses_backbone", True)
    if not uses_backbone:  # a head on features made earlier (e.g. slide bags of `foundation embed`)
        backbone, meta = None, {"backbone_args": {}, "source": "features"}
    elif cfg.task.backbone:
        backbone, meta = load_backbone(cfg.task.backbone)
    elif cfg.task.random_init:
        from foundation.domain import get_domain

        default = get_domain(task.domain).default_spec
        channels = cfg.model.in_chans or task.data_channels(cfg) or default.channels
        dims = cfg.model.spatial_dims or default.spatial_dims
        meta = {"backbone_args": backbone_args(cfg.model, channels, dims), "source": "random-init"}
        backbone = build_backbone(cfg.model, channels, dims)
    else:
        raise ConfigError(
            f"finetune {task.name}: give --backbone RUN|EXPORT|CKPT (task.backbone) or --random-init "
            "(task.random_init=true) for a baseline"
        )
    parts: TaskParts = task.build(cfg, backbone, meta)
    objective = TaskModel(
        parts.net,
        parts.loss,
        input_key=parts.input_key,
        freeze_backbone=cfg.task.freeze_backbone,
        uses_backbone=uses_backbone,
    )
    validate = None
    if parts.validate is not None:
        validate = lambda model, device: parts.validate(model.net, device)  # noqa: E731
    mean = tuple(meta.get("mean", ()))
    std = tuple(meta.get("std", ()))
    setup_meta = {
        "task": task.name,
        "task_meta": parts.meta if isinstance(parts.meta, dict) else parts.meta.to_dict(),
        "domain": task.domain,
        "backbone_source": str(meta.get("source", "")),
    }
    return TrainingSetup(
        objective=objective,
        dataset=parts.dataset,
        backbone_args=meta["backbone_args"] if uses_backbone else (parts.inputs_identity or {}),
        mean=mean,
        std=std,
        collate=parts.collate or torch.utils.data.default_collate,
        checkpoint_meta=setup_meta,
        validate=validate,
        export_extra={"domain": task.domain, "finetuned_for": task.name, "steps": cfg.train.steps},
    )


def finetune(task: Task, cfg: Config, out: Path, dist_info: DistInfo, *, quiet: bool = False) -> Path:
    """Fine-tune (or resume) into ``out``; returns ``out/model.pt``, the deployable model file."""
    if cfg.train.parallel != "ddp":  # validation and the task model run on the main rank alone
        raise ConfigError(
            f"train.parallel={cfg.train.parallel!r} is for pretraining; fine-tune with train.parallel=ddp"
        )

    def write_model(trainer: Trainer) -> None:
        meta = trainer.setup.checkpoint_meta
        path = save_task_model(
            Path(out) / MODEL_FILE,
            task=task.name,
            task_meta=meta["task_meta"],
            backbone_args=trainer.backbone_args,
            net=trainer.objective.net,
            config=config_to_dict(cfg),
            step=cfg.train.steps,
        )
        log.info("fine-tuned model: %s", path)

    run_training(
        cfg,
        out,
        dist_info,
        lambda: task_setup(task, cfg),
        identity=run_identity("finetune", task.domain, task=task.name),
        quiet=quiet,
        finish=write_model,
    )
    return Path(out) / MODEL_FILE
