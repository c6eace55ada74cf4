"""Watching a self-distillation run for collapse: the objective reports ``collapsed`` (0/1) per step (see
``foundation.ssl.indicators``); many steps in a row over the line is said once in the log and in
``metrics.jsonl``, and ends the run when ``train.stop_on_collapse`` asks for it."""

from __future__ import annotations

import logging

from foundation.errors import TrainingError

log = logging.getLogger(__name__)


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
            "run learn?' in the README (smaller ssl.head_prototypes, a longer optim.warmup_steps, a lower "
            "optim.lr)"
        )
        if self.stop:
            raise TrainingError(message + "; stopped (train.stop_on_collapse=true)")
        log.warning("%s; training goes on (train.stop_on_collapse=true stops it)", message)
        return {"collapse_warning": 1.0, "collapsed_steps": float(self.in_a_row)}
