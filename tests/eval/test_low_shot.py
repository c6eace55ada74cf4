"""Low-shot evaluation: the draws, and the summary of a probe over them."""

from __future__ import annotations

import pytest
import torch

from foundation.errors import ConfigError
from foundation.eval.low_shot import few_shot_indices, low_shot

# class 0: six items, class 1: four, class 2: two
LABELS = torch.tensor([0, 1, 0, 2, 1, 0, 0, 1, 2, 0, 1, 0])


def test_draws_take_shots_per_class_and_all_of_a_smaller_class():
    idx = few_shot_indices(LABELS, shots=3, seed=0)
    assert torch.equal(idx, idx.sort().values) and len(set(idx.tolist())) == len(idx)
    assert torch.bincount(LABELS[idx]).tolist() == [3, 3, 2]


def test_draws_follow_the_seed():
    first, again = few_shot_indices(LABELS, 2, seed=7), few_shot_indices(LABELS, 2, seed=7)
    assert torch.equal(first, again)
    others = {tuple(few_shot_indices(LABELS, 2, seed=s).tolist()) for s in range(8)}
    assert len(others) > 1


def test_more_shots_than_any_class_take_every_item():
    assert torch.equal(few_shot_indices(LABELS, shots=100, seed=3), torch.arange(len(LABELS)))


def test_summary_is_the_mean_std_and_every_draw_of_the_probe():
    calls = []

    def probe(idx: torch.Tensor, seed: int) -> dict:
        calls.append((idx, seed))
        return {"top1": [0.5, 0.7, 0.9][seed - 10]}

    result = low_shot(probe, LABELS, shots=1, draws=3, seed=10)
    assert [seed for _, seed in calls] == [10, 11, 12]
    assert all(torch.bincount(LABELS[idx]).tolist() == [1, 1, 1] for idx, _ in calls)
    assert result["top1"] == pytest.approx(0.7) and result["top1_std"] == pytest.approx(0.2)
    assert result["top1_draws"] == [0.5, 0.7, 0.9]
    assert (result["shots"], result["draws"], result["smallest_class"]) == (1, 3, 2)


@pytest.mark.parametrize(("shots", "draws"), [(0, 5), (2, 0)])
def test_no_shots_or_no_draws_is_refused(shots, draws):
    with pytest.raises(ConfigError, match="shots|draws"):
        low_shot(lambda idx, seed: {"top1": 1.0}, LABELS, shots, draws, seed=0)
