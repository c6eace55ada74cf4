"""Step-indexed batch sampling: which global sample indices rank ``r`` reads for micro-batch ``a`` of step ``s``.

Index layout: ``s * G + a * (W * m) + r * m + j`` for global batch ``G = W * m * A``. The set of samples in a
step does not depend on the world size, so a 2-rank run sees the same data as a 1-rank run with the same
global batch, and starting at step ``s`` is exact resume.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch.utils.data import Sampler

from foundation.errors import ConfigError


def micro_batch_size(global_batch: int, world_size: int, grad_accum_steps: int) -> int:
    """Per-rank micro-batch, or a clear error when the global batch does not split evenly."""
    denom = world_size * grad_accum_steps
    if global_batch % denom:
        raise ConfigError(
            f"train.batch_size={global_batch} is not divisible by world size {world_size} x "
            f"train.grad_accum_steps={grad_accum_steps}; choose a multiple of {denom}"
        )
    return global_batch // denom


class StepBatchSampler(Sampler[list[int]]):
    """Yields this rank's micro-batches of global sample indices from ``start_step`` to ``steps``."""

    def __init__(
        self,
        *,
        global_batch: int,
        rank: int,
        world_size: int,
        grad_accum_steps: int,
        start_step: int,
        steps: int,
    ) -> None:
        self.micro = micro_batch_size(global_batch, world_size, grad_accum_steps)
        self.global_batch = global_batch
        self.rank = rank
        self.world_size = world_size
        self.accum = grad_accum_steps
        self.start_step = start_step
        self.steps = steps

    def indices(self, step: int, micro_step: int) -> list[int]:
        base = step * self.global_batch + micro_step * self.world_size * self.micro + self.rank * self.micro
        return list(range(base, base + self.micro))

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.steps):
            for a in range(self.accum):
                yield self.indices(step, a)

    def __len__(self) -> int:
        return max(0, self.steps - self.start_step) * self.accum
