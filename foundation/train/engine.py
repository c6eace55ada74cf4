"""One training loop for every objective and domain (torchtitan's plain ``Trainer``, dinov2's ``do_train``).

The objective is an ``nn.Module`` whose ``forward(batch, step)`` returns a dict of losses; the loop does not
know whether it runs DINOv2 or MAE.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import shutil
import signal
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from foundation.config import Config, config_to_dict, save_config
from foundation.data.sampler import StepBatchSampler, micro_batch_size
from foundation.data.seeding import derive_seed
from foundation.data.stream import SSLViewDataset, collate_views
from foundation.domain import Domain, get_domain, resolve_data_path
from foundation.errors import CheckpointError, ConfigError, TrainingError
from foundation.export import export_backbone
from foundation.models.factory import backbone_args, build_backbone
from foundation.models.vit import ViT, build_vit_to_load
from foundation.precision import autocast_dtype
from foundation.ssl.registry import get_objective_factory
from foundation.thread_tuner import ThreadTuner, tuner_for
from foundation.threads import configure_threads, worker_threads
from foundation.train import checkpoint as ckpt
from foundation.train import dcp, parallel
from foundation.train.collapse import CollapseWatch, warn_collapse_prone_settings
from foundation.train.distributed import (
    DistInfo,
    all_gather_objects,
    all_reduce_mean,
    any_rank,
    barrier,
    maybe_no_sync,
)
from foundation.train.lock import RunLock
from foundation.train.metrics import MetricsLogger
from foundation.train.monitor import PretrainMonitor
from foundation.train.optim import apply_schedules, build_optimizer, build_param_groups
from foundation.train.run_folder import (
    check_run_folder,
    mark_run,
    refuse_other_backbone,
    refuse_other_run,
    run_identity,
)
from foundation.train.schedules import cosine_schedule, scaled_lr

log = logging.getLogger(__name__)

# A task's validate() may return this key (non-zero) to end training early (all its early-stopping patience is
# spent): a checkpoint is written as the final one, so the run counts as finished and a resume says so.
EARLY_STOP_KEY = "early_stop"


def worker_init(_: int) -> None:
    """Data workers: one torch thread each, and they outlive a group-wide SIGTERM.

    (OpenCV's count was set to 1 by the parent before the fork: see ``foundation.threads``.)
    """
    worker_threads()  # workers decode and augment; the main process owns the cores for the model
    # A scheduler's SIGTERM often reaches the whole process group: the workers must outlive it until the
    # main process has written its checkpoint (they are daemons and end with it).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
    }


class _StopFlag:
    """SIGTERM sets a flag; the loop checkpoints and exits at the next step boundary."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> _StopFlag:
        with contextlib.suppress(ValueError):  # not the main thread: no handler
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


@dataclass
class TrainingSetup:
    """Everything objective-specific the loop needs; built by :func:`ssl_setup` or a fine-tuning task.

    ``objective`` follows the SSL objective interface: ``forward(batch, step) -> {"loss": ...}``,
    ``trainable_named_parameters()``, ``student_backbone``, ``backbone_prefix``, ``update_teacher(step)``,
    ``export_prefix`` and ``export_backbone()``. ``dataset[i]`` is a pure function of ``(seed, i)``.
    ``checkpoint_meta`` is stored in every checkpoint; ``validate(net, device)`` runs every ``train.eval_every``
    steps and at the end (main rank). ``device_transform(batch)``, when set, finishes each batch on the training
    device (batched augmentation) after the loader's workers made it.
    """

    objective: nn.Module
    dataset: Dataset
    backbone_args: dict[str, Any]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]] = collate_views
    checkpoint_meta: dict[str, Any] = field(default_factory=dict)
    validate: Callable[[nn.Module, torch.device], dict[str, float]] | None = None
    export_extra: dict[str, Any] = field(default_factory=dict)
    device_transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    monitor: PretrainMonitor | None = None


def ssl_setup(cfg: Config) -> TrainingSetup:
    """The pretraining objective (DINOv2 or MAE) and its view stream for ``cfg.domain``."""
    domain: Domain = get_domain(cfg.domain)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    source, spec = domain.sample_source(resolve_data_path(domain, cfg.data.path), cfg)
    if cfg.model.in_chans and cfg.model.in_chans != spec.channels:
        raise ConfigError(
            f"model.in_chans={cfg.model.in_chans} does not match the {cfg.domain!r} domain's "
            f"{spec.channels} channels; remove the override (the data sets it)"
        )
    args = backbone_args(cfg.model, spec.channels, spec.spatial_dims)
    backbone = build_backbone(cfg.model, spec.channels, spec.spatial_dims)
    make_objective = get_objective_factory(cfg.ssl.method)
    objective, extras = make_objective(backbone, cfg.ssl, cfg.data.crops, cfg.train.steps)
    transform = domain.ssl_transform(cfg, spec)
    device_transform = getattr(transform, "device_transform", None)
    if cfg.data.augment_on == "device" and device_transform is None:
        raise ConfigError(
            f"data.augment_on=device: the {cfg.domain!r} domain augments in the data-loader workers only; "
            "use data.augment_on=auto or workers"
        )
    return TrainingSetup(
        objective=objective,
        dataset=SSLViewDataset(source, transform, cfg.seed, extras),
        backbone_args=args,
        mean=spec.mean,
        std=spec.std,
        checkpoint_meta={"domain": cfg.domain},
        export_extra={"domain": cfg.domain, "ssl_method": cfg.ssl.method, "steps": cfg.train.steps},
        device_transform=device_transform,
        monitor=PretrainMonitor.build(cfg, domain, spec),
    )


class Trainer:
    """Optimiser, schedules, data loading and the loop around a :class:`TrainingSetup`; :meth:`train` runs (or
    resumes) it."""

    def __init__(
        self, cfg: Config, run_dir: Path, dist_info: DistInfo, setup: TrainingSetup, *, quiet: bool = False
    ) -> None:
        self.cfg, self.run_dir, self.dist, self.quiet = cfg, run_dir, dist_info, quiet
        self.setup = setup
        self.device = dist_info.device
        tc = cfg.train
        self.micro_batch = micro_batch_size(tc.batch_size, dist_info.world_size, tc.grad_accum_steps)
        self.backbone_args = setup.backbone_args
        self.objective = setup.objective
        self.objective.to(self.device)
        self.dataset = setup.dataset
        self.amp_dtype = autocast_dtype(tc.precision, self.device, flag="train.precision")
        prepare_blocks(self.objective, compile_blocks=tc.compile, checkpointing=tc.activation_checkpointing)
        # FSDP replaces the parameters by shards: the optimiser is built on what the wrapping left
        self.model: torch.nn.Module = parallel.wrap(self.objective, tc.parallel, self.device, self.amp_dtype)
        self.sharded = parallel.is_sharded(self.objective)
        self.saver = dcp.ShardedSaver(asynchronous=tc.checkpoint_async) if tc.parallel == "fsdp" else None

        param_groups = build_param_groups(
            list(self.objective.trainable_named_parameters()),
            self.objective.student_backbone,
            self.objective.backbone_prefix,
            cfg.optim,
        )
        if not param_groups:
            raise ConfigError("nothing to train: every parameter is frozen")
        self.optimizer = build_optimizer(param_groups, cfg.optim, self.device)
        self.params = [p for g in param_groups for p in g["params"]]
        self.last_layer_params = [p for g in param_groups if g["is_last_layer"] for p in g["params"]]
        oc = cfg.optim
        peak_lr = scaled_lr(oc.lr, tc.batch_size, oc.reference_batch_size, oc.lr_scaling)
        self.lr = cosine_schedule(peak_lr, oc.min_lr, tc.steps, oc.warmup_steps)
        self.wd = cosine_schedule(oc.weight_decay, oc.weight_decay_end, tc.steps)
        torch.manual_seed(
            derive_seed(cfg.seed, dist_info.rank)
        )  # drop-path and other model randomness, per rank
        self.start_step = 0
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self.collapse = CollapseWatch(cfg.train.collapse_patience, cfg.train.stop_on_collapse)
        self.pictures: list[tuple[int, str, bytes]] = []  # (step, tag, PNG) made in a step, for TensorBoard
        self.tuner: ThreadTuner | None = None  # made when training starts, from the thread plan
        self.tuner_state: dict[str, Any] | None = None  # a resumed run's, for the tuner to continue

    # -- state -----------------------------------------------------------------------------------------------
    def state_dict(self, step: int) -> dict[str, Any]:
        return {
            "model": self.objective.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            **self.meta_state(step),
        }

    def meta_state(self, step: int) -> dict[str, Any]:
        """Everything but the tensors of model and optimiser (collective: the RNG states of every rank)."""
        return {
            "step": step,
            "rng": all_gather_objects(ckpt.rng_state()),
            "world_size": self.dist.world_size,
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "nonfinite_total": self.nonfinite_total,
            "backbone_args": self.backbone_args,
            "export_prefix": self.objective.export_prefix,
            "normalization": {"mean": list(self.setup.mean), "std": list(self.setup.std)},
            "config": config_to_dict(self.cfg),
            "thread_tuner": self.tuner.state_dict() if self.tuner is not None else None,
            **self.setup.checkpoint_meta,
        }

    def load_state_dict(self, state: dict[str, Any], path: Path) -> None:
        refuse_other_backbone(state, path, self.backbone_args)
        try:
            if state.get("sharded"):  # any world size, into this run's own layout
                dcp.load_sharded(path, self.objective, self.optimizer)
            else:
                self.objective.load_state_dict(state["model"])
                self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{path} does not match this model/objective: {e}") from e
        self.start_step = int(state["step"])
        self.nonfinite_in_a_row = int(state["nonfinite_in_a_row"])
        self.nonfinite_total = int(state["nonfinite_total"])
        self.tuner_state = state.get("thread_tuner")  # absent in checkpoints written before the tuner
        if state["world_size"] == self.dist.world_size:
            ckpt.set_rng_state(state["rng"][self.dist.rank])
        else:
            log.warning(
                "world size changed (%d -> %d): the data stream resumes exactly, model RNG (drop-path) does not",
                state["world_size"],
                self.dist.world_size,
            )

    def save(self, step: int) -> None:
        if self.saver is not None:  # every rank writes its own shards, in the background when asynchronous

            def placed(path: Path) -> None:  # main rank, once the folder is complete and in place
                ckpt.prune(self.run_dir, self.cfg.train.keep_checkpoints)
                log.info("checkpoint: %s", path)

            meta = self.meta_state(step)
            folder = ckpt.checkpoint_dir(self.run_dir)
            self.saver.save(self.objective, self.optimizer, meta, folder, step, after=placed)
            return
        state = self.state_dict(step)  # collective (RNG states), so every rank calls it
        if self.dist.is_main:
            path = ckpt.save_checkpoint(state, self.run_dir, step, self.cfg.train.keep_checkpoints)
            log.info("checkpoint: %s", path)
        barrier()

    def resume(self, state: dict[str, Any], path: Path) -> None:
        self.load_state_dict(state, path)
        if self.dist.is_main:
            log.warning("resuming from %s (step %d of %d)", path, self.start_step, self.cfg.train.steps)

    def plain_backbone(self) -> ViT | None:
        """The backbone to export or evaluate, as one ordinary module on the main rank (None elsewhere when
        sharded). Sharded, its full weights are gathered into a fresh copy: a collective, every rank calls it."""
        backbone = self.objective.export_backbone()
        if backbone is None or not self.sharded:
            return backbone
        state = parallel.full_state_dict(backbone, keep=self.dist.is_main)
        if not self.dist.is_main:
            return None
        plain = build_vit_to_load(**self.backbone_args)
        plain.load_state_dict(state)
        return plain.to(self.device)

    # -- data ------------------------------------------------------------------------------------------------
    def batches(self) -> Iterator[dict[str, Any]]:
        tc = self.cfg.train
        sampler = StepBatchSampler(
            global_batch=tc.batch_size,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            grad_accum_steps=tc.grad_accum_steps,
            start_step=self.start_step,
            steps=tc.steps,
        )
        workers = self.cfg.data.num_workers
        loader = DataLoader(
            self.dataset,
            batch_sampler=sampler,
            num_workers=workers,
            collate_fn=self.setup.collate,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=worker_init if workers else None,
            prefetch_factor=4 if workers else None,
        )
        finish = self.setup.device_transform
        for batch in loader:
            batch = _to_device(batch, self.device)
            yield finish(batch) if finish is not None else batch

    # -- the loop ----------------------------------------------------------------------------------------------
    def train_step(self, step: int, batches: Iterator[dict[str, Any]]) -> dict[str, float] | None:
        """Forward/backward over the accumulation micro-batches and one optimiser step.

        Returns the step's metrics, or None when a non-finite loss made every rank skip the update.
        """
        tc, oc = self.cfg.train, self.cfg.optim
        frozen_last_layer = step < oc.freeze_last_layer_steps
        apply_schedules(self.optimizer, float(self.lr[step]), float(self.wd[step]), frozen_last_layer)
        sums: dict[str, float] = defaultdict(float)
        finite = True
        for micro in range(tc.grad_accum_steps):
            batch = next(batches)
            if self.setup.monitor is not None and self.dist.is_main:
                picture = self.setup.monitor.crops(batch, step, self.run_dir)
                if picture is not None:
                    self.pictures.append((step, *picture))
            autocast = (
                torch.autocast(self.device.type, dtype=self.amp_dtype)
                if self.amp_dtype is not None
                else contextlib.nullcontext()
            )
            with maybe_no_sync(self.model, micro < tc.grad_accum_steps - 1):
                with autocast:
                    losses = self.model(batch, step)
                (losses["loss"] / tc.grad_accum_steps).backward()
            values = {k: float(v.detach()) for k, v in losses.items()}
            finite &= all(math.isfinite(v) for v in values.values())
            for k, v in values.items():
                sums[k] += v / tc.grad_accum_steps
        if any_rank(not finite, self.device):
            self.optimizer.zero_grad(set_to_none=True)
            return None
        if frozen_last_layer:
            for p in self.last_layer_params:
                p.grad = None
        metrics = dict(sums)
        if oc.clip_grad and self.sharded:
            metrics["grad_norm"] = parallel.clip_grad_norm(self.params, oc.clip_grad)
        elif oc.clip_grad:
            metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.params, oc.clip_grad))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        metrics.update(self.objective.update_teacher(step))
        return metrics

    def run_validation(self, step: int, logger: MetricsLogger) -> bool:
        """The task's validation on the main rank (the others wait at the next collective); True when it asks
        to stop early (:data:`EARLY_STOP_KEY`), on every rank."""
        stop = False
        if self.dist.is_main:
            self.objective.eval()
            with torch.no_grad():
                values = self.setup.validate(self.objective, self.device)
            self.objective.train()
            stop = bool(values.pop(EARLY_STOP_KEY, 0))
            logger.log(step, {f"val/{k}": float(v) for k, v in values.items()})
            log.info("step %d validation: %s", step + 1, ", ".join(f"{k}={v:.4g}" for k, v in values.items()))
        barrier()
        return any_rank(stop, self.device)

    def run_monitor(self, step: int, logger: MetricsLogger) -> None:
        """kNN (and the PCA picture) of the exported backbone on the main rank; the others wait."""
        backbone = self.plain_backbone()
        if self.dist.is_main:
            values, pictures = self.setup.monitor.evaluate(backbone, self.device, step, self.run_dir)
            logger.log(step, values)
            self.pictures += [(step, tag, png) for tag, png in pictures]
            log.info("step %d: kNN top-1 %.4f", step + 1, values["knn/top1"])
        barrier()

    def start_thread_tuner(self) -> None:
        """Size the thread pools (before loader workers fork) and, where the count is ours to choose, start the
        tuner that picks it from step times (continuing a resumed run's)."""
        plan = configure_threads(self.cfg.data.num_workers)
        steps_left = self.cfg.train.steps - self.start_step
        self.tuner = tuner_for(
            plan,
            steps_left,
            world_size=self.dist.world_size,
            device_type=self.device.type,
            state=self.tuner_state,
        )

    def tune_threads(self, step: int, seconds: float) -> None:
        switch = self.tuner.observe(step, seconds)
        if switch is not None and self.dist.is_main:
            timings = ", ".join(f"{n}: {s:.3f} s" for n, s in sorted(switch.seconds.items()))
            log.info(
                "step %d: %d intra-op threads from here (median step time %s)", step, switch.threads, timings
            )

    def train(self) -> None:
        tc = self.cfg.train
        logger = MetricsLogger(
            self.run_dir,
            enabled=self.dist.is_main,
            start_step=self.start_step,
            total_steps=tc.steps,
            quiet=self.quiet,
        )
        self.start_thread_tuner()
        batches = self.batches()
        self.objective.train()
        tic = time.perf_counter()
        try:
            with _StopFlag() as stop:
                for step in range(self.start_step, tc.steps):
                    if self.saver is not None:
                        self.saver.poll()  # a checkpoint written in the background is renamed into place
                    if any_rank(stop.requested, self.device):
                        log.warning("SIGTERM: writing a checkpoint at step %d, then exiting", step)
                        self.save(step)
                        raise SystemExit(143)  # the background write is finished below
                    started = time.perf_counter()
                    threads = torch.get_num_threads()
                    metrics = self.train_step(step, batches)
                    if self.tuner is not None:
                        self.tune_threads(step, time.perf_counter() - started)
                    if metrics is None:
                        self.nonfinite_in_a_row += 1
                        self.nonfinite_total += 1
                        log.warning(
                            "step %d: non-finite loss, update skipped (%d in a row, %d in total)",
                            step,
                            self.nonfinite_in_a_row,
                            self.nonfinite_total,
                        )
                        logger.log(step, {"skipped_nonfinite": 1, "nonfinite_total": self.nonfinite_total})
                        if self.nonfinite_in_a_row >= tc.max_nonfinite_in_a_row:
                            raise TrainingError(
                                f"{self.nonfinite_in_a_row} non-finite losses in a row at step {step}: training "
                                "diverged. Lower optim.lr, raise train.batch_size, or check the input data"
                            )
                    else:
                        self.nonfinite_in_a_row = 0
                        metrics = all_reduce_mean(metrics, self.device)
                        now = time.perf_counter()
                        metrics["lr"] = float(self.lr[step])
                        metrics["wd"] = float(self.wd[step])
                        metrics["img_s"] = tc.batch_size / max(now - tic, 1e-9)
                        if self.device.type == "cpu":
                            metrics["threads"] = threads  # the count this step ran with (the tuner's choice)
                        tic = now
                        event = self.collapse.update(step, metrics)
                        if event is not None:
                            metrics.update(event)
                        if (
                            (step + 1) % tc.log_every == 0
                            or step == self.start_step
                            or step + 1 == tc.steps
                            or event is not None
                        ):
                            logger.log(step, metrics)
                        logger.progress(
                            1, {"loss": metrics["loss"], "lr": metrics["lr"], "img/s": metrics["img_s"]}
                        )
                    monitor = self.setup.monitor
                    if monitor is not None and monitor.due(step, tc.steps):
                        self.run_monitor(step, logger)
                    for picture in self.pictures:
                        logger.image(*picture)
                    self.pictures.clear()
                    due = step + 1 == tc.steps or (tc.eval_every and (step + 1) % tc.eval_every == 0)
                    early = self.setup.validate is not None and due and self.run_validation(step, logger)
                    if early and step + 1 < tc.steps:
                        log.warning("step %d: stopped early by the validation; saved as final", step + 1)
                        self.save(tc.steps)
                        break
                    if (step + 1) % tc.checkpoint_every == 0 or step + 1 == tc.steps:
                        self.save(step + 1)
        finally:
            if self.saver is not None:
                self.saver.finish()  # the last checkpoint is complete before the run goes on or ends
            logger.close()


def prepare_blocks(objective: nn.Module, *, compile_blocks: bool, checkpointing: bool) -> None:
    """Per transformer block, before any wrapping: activation checkpointing on the student backbone (its
    activations are recomputed in backward; the teacher runs without gradients) and ``torch.compile`` of every
    block (student, teacher, MAE decoder). Neither changes a parameter name nor the numbers beyond float
    rounding."""
    student = getattr(objective, "student_backbone", None)
    if checkpointing and student is not None:
        student.set_grad_checkpointing(True)
    if compile_blocks:
        for block in parallel.transformer_blocks(objective):
            block.compile()


def _take_run_folder(out: Path, identity: dict, lock: RunLock) -> bool:
    """Main rank: create ``out`` if needed, lock it, mark it as a run. Returns whether this call created it."""
    created = not out.exists()
    out.mkdir(exist_ok=True)
    try:
        lock.acquire()
    except BaseException:
        if created:
            out.rmdir()
        raise
    mark_run(out, identity)
    return created


def run_training(
    cfg: Config,
    out: Path,
    dist_info: DistInfo,
    make_setup: Callable[[], TrainingSetup],
    *,
    identity: dict,
    quiet: bool = False,
    finish: Callable[[Trainer], None] | None = None,
) -> Trainer:
    """Train (or resume) into ``out``: the config, metrics, checkpoints, then the exported backbone.

    Before anything in ``out`` is touched, every check that can refuse runs: ``out`` is new, empty or a run of
    ours; a checkpoint there was written by the same command, domain, task and objective (``identity``, see
    :func:`~foundation.train.run_folder.run_identity`) for the same backbone; no other process trains there (the
    run lock). ``finish(trainer)`` runs on the main rank after training (e.g. a task writes its deployable model).
    The run folder is complete when ``export/`` exists; if the run fails before its first checkpoint, a folder
    this call created is removed, so nothing half-made looks like a run.
    """
    out = Path(out)
    check_run_folder(out)
    latest = ckpt.latest_checkpoint(out)
    try:
        state = ckpt.load_checkpoint(latest) if latest is not None else None
    except CheckpointError as e:
        raise CheckpointError(f"{e}; move it away to resume from an earlier one") from e
    refuse_other_run(out, identity, state, latest)
    # Denormal floats (tiny gradients early in training) take a slow path on x86 CPUs: a ViT-B MAE step ran
    # 10x slower. Flushing them to zero changes nothing visible in the numbers.
    torch.set_flush_denormal(True)
    # data errors surface here, before any output
    trainer = Trainer(cfg, out, dist_info, make_setup(), quiet=quiet)
    refuse_other_backbone(state, latest, trainer.backbone_args)
    lock = RunLock(out)
    created, failure = False, None
    if dist_info.is_main:
        try:
            created = _take_run_folder(out, identity, lock)
        except Exception as e:  # every rank must learn of it, or the others wait forever
            failure = e
    if any_rank(failure is not None, dist_info.device):
        raise failure if failure is not None else TrainingError("rank 0 could not take the run folder")
    try:
        if dist_info.is_main:
            save_config(cfg, out / "config.yaml")
        barrier()
        if state is not None:
            trainer.resume(state, latest)
            del state
        elif dist_info.is_main:
            log.info("new run in %s (%d steps, global batch %d)", out, cfg.train.steps, cfg.train.batch_size)
        if trainer.start_step < cfg.train.steps:
            trainer.train()
        elif dist_info.is_main:
            log.info("run %s already finished %d steps", out, cfg.train.steps)
        backbone = trainer.plain_backbone()  # gathered when sharded: every rank takes part
        if dist_info.is_main:
            if finish is not None:
                finish(trainer)
            setup = trainer.setup
            if backbone is not None:  # a head on precomputed features has none
                export_backbone(
                    backbone,
                    trainer.backbone_args,
                    out / "export",
                    mean=setup.mean,
                    std=setup.std,
                    extra=setup.export_extra,
                    overwrite=True,  # the run's own export, replaced when a resumed run finishes again
                )
                log.info("exported backbone: %s", out / "export")
        barrier()
    except BaseException:
        if created and dist_info.is_main and out.exists() and not ckpt.list_checkpoints(out):
            lock.release()
            shutil.rmtree(out, ignore_errors=True)  # a folder this call created and nothing of value in it
        raise
    finally:
        lock.release()
    return trainer


def resolve_augment_on(cfg: Config, device: torch.device) -> Config:
    """``data.augment_on: auto`` made concrete for the device training runs on: batched on the device for CUDA,
    in the loader workers otherwise (also on a CUDA machine told ``--device cpu``)."""
    if cfg.data.augment_on != "auto":
        return cfg
    where = "device" if device.type == "cuda" else "workers"
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, augment_on=where))


def pretrain(cfg: Config, out: Path, dist_info: DistInfo, *, quiet: bool = False) -> Path:
    """Pretrain (or resume) into ``out``; returns the exported backbone folder."""
    if dist_info.is_main:
        warn_collapse_prone_settings(cfg, dist_info.world_size)
    run_training(
        cfg,
        out,
        dist_info,
        lambda: ssl_setup(resolve_augment_on(cfg, dist_info.device)),
        identity=run_identity("pretrain", cfg.domain, ssl_method=cfg.ssl.method),
        quiet=quiet,
    )
    return Path(out) / "export"
