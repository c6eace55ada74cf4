"""Every random choice flows from (seed, sample index): the stream is the same on any number of ranks and
workers, and resuming at step ``s`` replays exactly what an uninterrupted run would have seen."""

from __future__ import annotations

import numpy as np
import torch


def derive_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy's SeedSequence hashing)."""
    return int(
        np.random.SeedSequence([int(k) & 0xFFFFFFFFFFFFFFFF for k in keys]).generate_state(2, np.uint64)[0]
        >> 1
    )


def generator_for(*keys: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(derive_seed(*keys))
    return g


def draw_seed(generator: torch.Generator) -> int:
    """A fresh 31-bit seed from ``generator``, for libraries with their own RNG (albumentations, numpy)."""
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
