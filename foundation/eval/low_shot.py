"""Low-shot evaluation: a probe fitted on ``shots`` labelled images a class, averaged over seeded draws.

What a label budget buys is the question self-supervised features answer best (DINOv2 reports ImageNet with 1% and
10% of its labels; few-shot linear probes average several draws, since one draw of a few images moves a score by
points). The probe itself is unchanged: only its training set shrinks.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from foundation.errors import ConfigError

# a probe fitted on the given training indices with the given seed, returning at least {"top1": float}
Probe = Callable[[Tensor, int], dict[str, Any]]


def few_shot_indices(labels: Tensor, shots: int, seed: int) -> Tensor:
    """Sorted indices of ``shots`` items per class, drawn without replacement (every item of a class that has
    fewer); the same ``seed`` gives the same draw.

    Raises:
        ConfigError: ``shots`` < 1.
    """
    if shots < 1:
        raise ConfigError(f"shots={shots!r} must be >= 1 labelled image a class")
    generator = torch.Generator().manual_seed(seed)
    picked = []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        picked.append(members[torch.randperm(len(members), generator=generator)[:shots]])
    return torch.cat(picked).sort().values


def low_shot(probe: Probe, labels: Tensor, shots: int, draws: int, seed: int) -> dict[str, Any]:
    """``probe`` on ``draws`` draws of ``shots`` items a class (draw ``d`` seeded ``seed + d``).

    Returns:
        ``{"top1", "top1_std", "top1_draws", "shots", "draws", "smallest_class"}``: the mean top-1, its standard
        deviation over draws (0 for one draw), every draw's top-1, and the fewest items any class had (below
        ``shots``, that class gave all it had).

    Raises:
        ConfigError: ``shots`` or ``draws`` < 1.
    """
    if draws < 1:
        raise ConfigError(f"draws={draws!r} must be >= 1")
    scores = [probe(few_shot_indices(labels, shots, seed + d), seed + d)["top1"] for d in range(draws)]
    return {
        "top1": statistics.fmean(scores),
        "top1_std": statistics.stdev(scores) if draws > 1 else 0.0,
        "top1_draws": scores,
        "shots": shots,
        "draws": draws,
        "smallest_class": int(torch.unique(labels, return_counts=True)[1].min()),
    }
