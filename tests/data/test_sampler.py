"""Step-indexed batch sampling and seeding: the same data on any number of ranks, exact resume."""

from __future__ import annotations

import pytest
import torch

from foundation.data.sampler import StepBatchSampler, micro_batch_size
from foundation.data.seeding import derive_seed, draw_seed, generator_for
from foundation.errors import ConfigError


def sampler(rank: int, world: int, accum: int, *, batch: int = 8, start: int = 0, steps: int = 5):
    return StepBatchSampler(
        global_batch=batch, rank=rank, world_size=world, grad_accum_steps=accum, start_step=start, steps=steps
    )


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("accum", [1, 2])
def test_union_over_ranks_is_the_step_block(world: int, accum: int) -> None:
    G, steps = 8, 5
    per_rank = [list(sampler(r, world, accum, batch=G, steps=steps)) for r in range(world)]
    for batches in per_rank:
        assert len(batches) == steps * accum
        assert all(len(b) == G // (world * accum) for b in batches)
    for step in range(steps):
        seen = [i for batches in per_rank for b in batches[step * accum : (step + 1) * accum] for i in b]
        assert len(seen) == G  # no index twice
        assert sorted(seen) == list(range(step * G, (step + 1) * G))


def test_same_data_for_any_world_size() -> None:
    def step_sets(world: int, accum: int) -> list[set[int]]:
        out = [set() for _ in range(4)]
        for r in range(world):
            for k, b in enumerate(sampler(r, world, accum, steps=4)):
                out[k // accum].update(b)
        return out

    reference = step_sets(1, 1)
    for world, accum in [(2, 1), (4, 1), (2, 2), (4, 2), (1, 2)]:
        assert step_sets(world, accum) == reference


def test_index_layout() -> None:
    s = sampler(rank=1, world=2, accum=2, batch=8)
    assert s.micro == 2
    # s * G + a * (W * m) + r * m + j
    assert s.indices(3, 0) == [26, 27]
    assert s.indices(3, 1) == [30, 31]
    assert len(s) == 10


def test_start_step_skips_exactly() -> None:
    for accum in (1, 2):
        full = list(sampler(1, 2, accum, steps=6))
        resumed = sampler(1, 2, accum, start=4, steps=6)
        assert list(resumed) == full[4 * accum :]
        assert len(resumed) == 2 * accum
    assert list(sampler(0, 1, 1, start=6, steps=6)) == []
    assert len(sampler(0, 1, 1, start=9, steps=6)) == 0


def test_indivisible_batch_refused() -> None:
    with pytest.raises(ConfigError, match=r"train\.batch_size=10 is not divisible by world size 4"):
        sampler(0, 4, 1, batch=10)
    with pytest.raises(ConfigError, match=r"train\.batch_size=6.*train\.grad_accum_steps=4.*multiple of 8"):
        micro_batch_size(6, 2, 4)
    assert micro_batch_size(12, 2, 3) == 2


def test_derive_seed_deterministic() -> None:
    assert derive_seed(0, 1) == derive_seed(0, 1)
    assert derive_seed(0, 1) != derive_seed(1, 0)
    assert derive_seed(0, 1) != derive_seed(0, 2)
    assert len({derive_seed(7, i) for i in range(100)}) == 100
    for keys in [(0,), (2**40, 3), (-1, 5)]:
        seed = derive_seed(*keys)
        assert isinstance(seed, int) and 0 <= seed < 2**63


def test_generator_for_deterministic() -> None:
    a = torch.rand(5, generator=generator_for(3, 9))
    b = torch.rand(5, generator=generator_for(3, 9))
    c = torch.rand(5, generator=generator_for(3, 10))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    seeds = [draw_seed(generator_for(1, 2)) for _ in range(2)]
    assert seeds[0] == seeds[1] and 0 <= seeds[0] < 2**31 - 1
