"""Collapse indicators for self-distillation (DINO/iBOT), computed on the teacher side every step.

A DINO run can collapse in two ways (Caron et al. 2021, section 5.3): every image gets the *same* target, either
spread over all prototypes (uniform collapse: the teacher entropy climbs to ln K and the loss sits just under
ln K), or on one prototype (dominant-prototype collapse: the entropy of the batch-mean target falls to 0). Both
show in the features too: the effective rank of the CLS embeddings over a batch drops towards 1.

These are cheap (one SVD of a (B, D) matrix) and logged to ``metrics.jsonl`` so a user can see, while the run
goes, whether it learns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# Fractions of ln K: a teacher whose mean per-image entropy stays above UNIFORM_LINE * ln K gives (nearly) the
# same uniform target to every image; one whose batch-mean target has entropy below DOMINANT_LINE * ln K puts
# (nearly) every image on the same few prototypes.
UNIFORM_LINE = 0.95
DOMINANT_LINE = 0.1


def entropy(probs: Tensor) -> Tensor:
    """Shannon entropy (nats) of each row of ``probs`` (..., K)."""
    p = probs.float().clamp_min(1e-12)
    return -(p * p.log()).sum(dim=-1)


def effective_rank(features: Tensor) -> float:
    """exp(entropy of the normalised singular values) of centred (B, D) features (Roy & Vetterli 2007).

    1 when every row is the same direction; up to min(B, D) for well-spread features.
    """
    x = features.detach().float()
    x = x - x.mean(dim=0, keepdim=True)
    s = torch.linalg.svdvals(x)
    total = s.sum()
    if not torch.isfinite(total) or float(total) <= 0:
        return 1.0
    return float(torch.exp(entropy((s / total).unsqueeze(0))[0]))


@dataclass(frozen=True)
class TeacherIndicators:
    """Per-step collapse indicators of one teacher head; ``ln_k`` is the uniform-collapse ceiling."""

    entropy: float  # mean per-image entropy of the teacher targets (nats)
    batch_entropy: float  # entropy of the batch-mean target (nats)
    max_prob: float  # mean over images of the largest target probability
    cls_rank: float  # effective rank of the teacher CLS features
    ln_k: float

    @classmethod
    def measure(cls, teacher_probs: Tensor, cls_features: Tensor) -> TeacherIndicators:
        probs = teacher_probs.detach().float()
        return cls(
            entropy=float(entropy(probs).mean()),
            batch_entropy=float(entropy(probs.mean(dim=0))),
            max_prob=float(probs.max(dim=-1).values.mean()),
            cls_rank=effective_rank(cls_features),
            ln_k=math.log(probs.shape[-1]),
        )

    def collapse(self) -> str | None:
        """'uniform', 'dominant' or None: which collapse line this step is over."""
        if self.entropy > UNIFORM_LINE * self.ln_k:
            return "uniform"
        if self.batch_entropy < DOMINANT_LINE * self.ln_k:
            return "dominant"
        return None

    def as_metrics(self) -> dict[str, float]:
        return {
            "teacher_entropy": self.entropy,
            "teacher_batch_entropy": self.batch_entropy,
            "teacher_max_prob": self.max_prob,
            "cls_rank": self.cls_rank,
            "ln_k": self.ln_k,
            "collapsed": 0.0 if self.collapse() is None else 1.0,
        }
