"""Step-indexed schedules precomputed as arrays (dinov2's ``CosineScheduler``): ``schedule[step]``."""

from __future__ import annotations

import math

import numpy as np


def cosine_schedule(
    start: float, end: float, total_steps: int, warmup_steps: int = 0, warmup_start: float = 0.0
) -> np.ndarray:
    """Linear warmup from ``warmup_start`` to ``start`` over ``warmup_steps``, then cosine from ``start`` to ``end``."""
    warmup_steps = min(warmup_steps, total_steps)
    warmup = np.linspace(warmup_start, start, warmup_steps, endpoint=False)
    n = total_steps - warmup_steps
    t = np.arange(n)
    cosine = end + 0.5 * (start - end) * (1 + np.cos(math.pi * t / max(n, 1)))
    return np.concatenate([warmup, cosine]).astype(np.float64)


def warmup_then_constant(start: float, value: float, total_steps: int, warmup_steps: int) -> np.ndarray:
    """Linear ramp from ``start`` to ``value`` over ``warmup_steps``, then constant (teacher temperature)."""
    warmup_steps = min(warmup_steps, total_steps)
    ramp = np.linspace(start, value, warmup_steps, endpoint=False)
    return np.concatenate([ramp, np.full(total_steps - warmup_steps, value)]).astype(np.float64)


def scaled_lr(base_lr: float, batch_size: int, reference_batch_size: int, rule: str) -> float:
    """Scale the recipe's lr to the actual global batch: ``sqrt`` (DINOv2), ``linear`` (MAE) or ``none``."""
    ratio = batch_size / reference_batch_size
    return base_lr * {"sqrt": math.sqrt(ratio), "linear": ratio, "none": 1.0}[rule]
