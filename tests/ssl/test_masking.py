"""Block-wise (iBOT) and per-sample random (MAE) masking: counts, determinism, index algebra."""

from __future__ import annotations

import random

import pytest
import torch

from foundation.ssl.masking import BlockMaskGenerator, random_block_mask, random_masking_indices


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("target", [10, 20, 59, 98])
def test_block_mask_count(target: int) -> None:
    masker = BlockMaskGenerator((14, 14))
    counts = [int(masker(target, gen(seed)).sum()) for seed in range(50)]
    assert all(0.9 * target <= c <= target for c in counts)  # never overshoots
    assert sum(c == target for c in counts) >= 45  # almost always exact at iBOT ratios (<= 0.5)


def test_block_mask_is_blocky_and_shaped() -> None:
    mask = BlockMaskGenerator((6, 9))(12, gen(0))
    assert mask.shape == (6, 9) and mask.dtype == torch.bool
    # Blocks, not scattered patches: most masked patches have a masked 4-neighbour.
    padded = torch.nn.functional.pad(mask.float()[None], (1, 1, 1, 1))[0]
    neighbours = padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:]
    assert (neighbours[mask] > 0).float().mean() >= 0.8


def test_block_mask_edge_counts() -> None:
    masker = BlockMaskGenerator((4, 4))
    assert not masker(0, gen(0)).any()
    assert int(masker(16, gen(0)).sum()) <= 16
    with pytest.raises(ValueError, match="17"):
        masker(17, gen(0))


def test_block_mask_deterministic_and_global_rng_untouched() -> None:
    masker = BlockMaskGenerator((14, 14))
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    a, b = masker(60, gen(123)), masker(60, gen(123))
    assert torch.equal(a, b)
    assert any(not torch.equal(a, masker(60, gen(s))) for s in range(5))
    assert torch.equal(torch_state, torch.get_rng_state()) and py_state == random.getstate()


def test_random_block_mask_ratio() -> None:
    mask = random_block_mask((8, 8), 0.25, gen(0))
    assert mask.shape == (8, 8) and int(mask.sum()) == 16
    assert torch.equal(mask, random_block_mask((8, 8), 0.25, gen(0)))
    with pytest.raises(ValueError, match="1.5"):
        random_block_mask((8, 8), 1.5, gen(0))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_aspect": 0.0},
        {"min_aspect": 2.0, "max_aspect": 1.0},
        {"min_num_patches": 0},
        {"grid_size": (0, 4)},
    ],
)
def test_block_mask_bad_config(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        BlockMaskGenerator(**{"grid_size": (4, 4), **kwargs})


def test_mae_indices_shapes_and_complement() -> None:
    keep, mask, restore = random_masking_indices(3, 16, 0.75, gen(0), "cpu")
    assert keep.shape == (3, 4) and mask.shape == (3, 16) and restore.shape == (3, 16)
    assert mask.dtype == torch.bool and (mask.sum(dim=1) == 12).all()
    for b in range(3):
        assert not mask[b, keep[b]].any()  # kept tokens are exactly the unmasked ones
        assert set(keep[b].tolist()) == set((~mask[b]).nonzero().flatten().tolist())
    assert not torch.equal(mask[0], mask[1])  # independent shuffle per sample


def test_mae_restore_round_trip() -> None:
    x = torch.arange(2 * 10 * 3, dtype=torch.float32).reshape(2, 10, 3)
    keep, mask, restore = random_masking_indices(2, 10, 0.6, gen(1), "cpu")
    visible = torch.gather(x, 1, keep.unsqueeze(-1).expand(-1, -1, 3))
    mask_tokens = torch.full((2, 10 - keep.shape[1], 3), -1.0)
    full = torch.gather(torch.cat([visible, mask_tokens], 1), 1, restore.unsqueeze(-1).expand(-1, -1, 3))
    assert torch.equal(full[~mask], x[~mask]) and (full[mask] == -1).all()


def test_mae_deterministic_and_float_safe_keep_count() -> None:
    a = random_masking_indices(2, 8, 0.5, gen(7), "cpu")
    b = random_masking_indices(2, 8, 0.5, gen(7), "cpu")
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    keep, _, _ = random_masking_indices(1, 10, 0.9, gen(0), "cpu")  # 10 * (1 - 0.9) = 0.999...
    assert keep.shape == (1, 1)


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.2])
def test_mae_bad_ratio(ratio: float) -> None:
    with pytest.raises(ValueError, match="ssl.mask_ratio"):
        random_masking_indices(2, 16, ratio, gen(0), "cpu")
