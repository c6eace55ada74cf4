"""Validation during training: each fold's head on its validation slides (whole bags, one at a time), and early
stopping kept in the network's buffers (so it resumes exactly): a better validation loss keeps that fold's
weights as its best; ``patience`` validations without one stop the fold; all stopped ends the run."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from foundation.train.engine import EARLY_STOP_KEY
from foundation_domains.pathology.slide_classification.bags import read_bag
from foundation_domains.pathology.slide_classification.inference import run_bag
from foundation_domains.pathology.slide_classification.metrics import auroc
from foundation_domains.pathology.slide_classification.model import SlideMIL


def make_validator(
    val: list[list[tuple[Path, int]]], patience: int
) -> Callable[[SlideMIL, torch.device], dict[str, float]] | None:
    """``validate(net, device)`` over each fold's ``(bag path, label index)`` validation slides; None when no fold
    has any (then the last weights are kept)."""
    if not any(val):
        return None

    def validate(net: SlideMIL, device: torch.device) -> dict[str, float]:
        values: dict[str, float] = {}
        stopped = []
        for k, slides in enumerate(val):
            if not slides:
                continue
            labels = np.array([label for _, label in slides])
            logits = torch.stack(
                [run_bag(net.heads[k], read_bag(path), device)["logits"] for path, _ in slides]
            )
            loss = float(F.cross_entropy(logits, torch.from_numpy(labels)))
            probs = torch.softmax(logits, 1).numpy()
            values[f"fold{k}/loss"] = loss
            values[f"fold{k}/auroc"] = auroc(labels, probs)
            if loss < float(net.best_loss[k]) - 1e-7:
                net.best_loss[k] = loss
                net.evals_since_best[k] = 0
                net.snapshot(k)
            else:
                net.evals_since_best[k] += 1
            stopped.append(patience > 0 and int(net.evals_since_best[k]) >= patience)
        folds = [v for key, v in values.items() if key.endswith("/loss")]
        aurocs = [v for key, v in values.items() if key.endswith("/auroc") and not math.isnan(v)]
        values["loss"] = float(np.mean(folds))
        values["auroc"] = float(np.mean(aurocs)) if aurocs else math.nan
        values[EARLY_STOP_KEY] = float(all(stopped))
        return values

    return validate
