"""The training stream: sample ``i`` is a bag of fold ``i % folds``, a pure function of ``(seed, i)``.

Each fold's training slides are visited in a fresh permutation per pass (``balance: weights`` or ``none``), or by
drawing a label uniformly and then one of its slides (``balance: sampling``). Bags above ``max_tiles`` are sampled
to that many tiles for the step; evaluation always sees the whole bag.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from foundation.data.seeding import generator_for
from foundation_domains.pathology.slide_classification.bags import read_bag


@dataclass(frozen=True)
class TrainSlide:
    path: Path
    label: int


class BagDataset(Dataset):
    """Endless: ``dataset[i] = {"features": N x D, "label", "fold"}``."""

    def __init__(
        self,
        folds: list[list[TrainSlide]],
        seed: int,
        *,
        max_tiles: int | None = None,
        balanced: bool = False,
    ) -> None:
        self.folds = folds
        self.seed = seed
        self.max_tiles = max_tiles
        self.balanced = balanced
        self.by_label = [
            [[s for s in slides if s.label == c] for c in sorted({s.label for s in slides})]
            for slides in folds
        ]

    def __len__(self) -> int:
        return 2**62

    def pick(self, index: int) -> tuple[int, TrainSlide]:
        k = index % len(self.folds)
        turn = index // len(self.folds)  # this fold's own counter
        slides = self.folds[k]
        if self.balanced:
            g = generator_for(self.seed, 1, k, turn)
            groups = self.by_label[k]
            group = groups[int(torch.randint(len(groups), (1,), generator=g))]
            return k, group[int(torch.randint(len(group), (1,), generator=g))]
        epoch, position = divmod(turn, len(slides))
        order = torch.randperm(len(slides), generator=generator_for(self.seed, 2, k, epoch))
        return k, slides[int(order[position])]

    def __getitem__(self, index: int) -> dict[str, Any]:
        k, slide = self.pick(index)
        features = read_bag(slide.path, self.max_tiles, generator_for(self.seed, 3, index))
        return {"features": features, "label": slide.label, "fold": k}


def collate_bags(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Pad bags to the longest with zeros at the end; ``mask`` marks the real tiles."""
    n = max(len(s["features"]) for s in samples)
    dim = samples[0]["features"].shape[1]
    features = torch.zeros(len(samples), n, dim)
    mask = torch.zeros(len(samples), n, dtype=torch.bool)
    for i, s in enumerate(samples):
        features[i, : len(s["features"])] = s["features"]
        mask[i, : len(s["features"])] = True
    return {
        "features": features,
        "mask": mask,
        "label": torch.tensor([int(s["label"]) for s in samples]),
        "fold": torch.tensor([int(s["fold"]) for s in samples]),
    }
