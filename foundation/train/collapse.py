"""Watching a self-distillation run for collapse, before and while it trains.

Before: ``collapse_prone_settings`` names the recipe keys that small DINOv2 runs were measured to collapse with
(README, "Will my run learn?"). While: the objective reports ``collapsed`` (0/1) per step (see
``foundation.ssl.indicators``); many steps in a row over the line is said once in the log and in
``metrics.jsonl``, and ends the run when ``train.stop_on_collapse`` asks for it."""

from __future__ import annotations

import logging

from foundation.config import Config
from foundation.errors import TrainingError

log = logging.getLogger(__name__)

SMALL_BATCH = 256  # global batches below this are the small-batch regime of the rules below
SHORT_RUN_STEPS = 10_000  # runs shorter than this never leave the regime where the rules below bite
MAX_PROTOTYPES_PER_IMAGE = 16  # K / global batch at which small runs stayed off the uniform line (256 / 16)
MAX_SHORT_RUN_TEACHER_TEMP = 0.04
MIN_SHORT_RUN_LAYERSCALE = 1e-3


def collapse_prone_settings(cfg: Config, world_size: int) -> list[str]:
    """One message per DINOv2 setting known to collapse at this run's scale, naming the key and the safe range.

    The lines come from measurements on real images at batch 16-32 and a few hundred steps: 1,024 prototypes
    drift to uniform targets where 256 do not; LayerScale 1e-5 keeps the CLS token image-free until its gammas
    grow; a teacher softer than about 0.04 amplifies too little of what two crops of a barely trained network
    agree on, so uniform targets are the stable state. At DINOv2's scale (batch 1,024, 125k steps) none applies.
    """
    if cfg.ssl.method != "dinov2":
        return []
    batch = cfg.train.batch_size * world_size
    short = cfg.train.steps < SHORT_RUN_STEPS
    found = []
    if batch < SMALL_BATCH and cfg.ssl.head_prototypes > MAX_PROTOTYPES_PER_IMAGE * batch:
        found.append(
            f"ssl.head_prototypes={cfg.ssl.head_prototypes} with a global batch of {batch} (train.batch_size "
            f"x {world_size} rank(s)): below a batch of {SMALL_BATCH} keep it <= {MAX_PROTOTYPES_PER_IMAGE} x "
            f"the batch (here <= {MAX_PROTOTYPES_PER_IMAGE * batch})"
        )
    layerscale = cfg.model.layerscale_init
    if short and layerscale is not None and layerscale < MIN_SHORT_RUN_LAYERSCALE:
        found.append(
            f"model.layerscale_init={layerscale:g} in a run of {cfg.train.steps} steps: under "
            f"{SHORT_RUN_STEPS} steps use null (no LayerScale) or >= {MIN_SHORT_RUN_LAYERSCALE:g}"
        )
    hottest = max(cfg.ssl.teacher_temp, cfg.ssl.teacher_temp_warmup)
    if short and hottest > MAX_SHORT_RUN_TEACHER_TEMP:
        found.append(
            f"ssl.teacher_temp={cfg.ssl.teacher_temp:g} (ssl.teacher_temp_warmup="
            f"{cfg.ssl.teacher_temp_warmup:g}) in a run of {cfg.train.steps} steps: under {SHORT_RUN_STEPS} "
            f"steps keep both in 0.01-{MAX_SHORT_RUN_TEACHER_TEMP:g} (the small recipes use 0.02)"
        )
    return found


def warn_collapse_prone_settings(cfg: Config, world_size: int) -> None:
    for message in collapse_prone_settings(cfg, world_size):
        log.warning("collapse-prone setting: %s. See 'Will my run learn?' in the README.", message)


class CollapseWatch:
    """Counts consecutive collapsed steps; returns a record to log when a collapse starts or ends."""

    def __init__(self, patience: int, stop: bool) -> None:
        self.patience = max(1, patience)
        self.stop = stop
        self.in_a_row = 0
        self.reported = False

    def update(self, step: int, metrics: dict[str, float]) -> dict[str, float] | None:
        if "collapsed" not in metrics:
            return None
        if metrics["collapsed"] < 0.5:
            was_reported, self.in_a_row, self.reported = self.reported, 0, False
            return {"collapse_ended": 1.0} if was_reported else None
        self.in_a_row += 1
        if self.in_a_row < self.patience or self.reported:
            return None
        self.reported = True
        entropy, ln_k = metrics.get("teacher_entropy", float("nan")), metrics.get("ln_k", float("nan"))
        message = (
            f"step {step}: the teacher's targets have been collapsed for {self.in_a_row} steps (entropy "
            f"{entropy:.2f} of ln K = {ln_k:.2f}, batch-mean entropy {metrics.get('teacher_batch_entropy', 0):.2f},"
            f" CLS effective rank {metrics.get('cls_rank', 0):.1f}): the features are not learning. See 'Will my "
            "run learn?' in the README (foundation/recipes/images/small_dinov2.yaml's numbers: no LayerScale, "
            "ssl.teacher_temp 0.02, ssl.head_prototypes <= 16 x the batch)"
        )
        if self.stop:
            raise TrainingError(message + "; stopped (train.stop_on_collapse=true)")
        log.warning("%s; training goes on (train.stop_on_collapse=true stops it)", message)
        return {"collapse_warning": 1.0, "collapsed_steps": float(self.in_a_row)}
