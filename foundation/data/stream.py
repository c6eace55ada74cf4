"""The training dataset the loader sees: sample ``i`` of a domain's stream turned into views."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import Dataset

from foundation.data.seeding import generator_for
from foundation.domain import SampleSource, ViewTransform

ViewExtras = Callable[[dict[str, Any], torch.Generator], dict[str, Any]]


class SSLViewDataset(Dataset):
    """``dataset[i]``: the i-th sample of ``source``, its views, and objective extras (e.g. iBOT masks).

    A single generator seeded by ``(seed, i)`` drives the source, the views and the extras, so sample
    ``i`` is identical whichever rank or worker reads it.
    """

    def __init__(
        self, source: SampleSource, transform: ViewTransform, seed: int, extras: ViewExtras | None = None
    ) -> None:
        self.source = source
        self.transform = transform
        self.seed = seed
        self.extras = extras

    def __getitem__(self, index: int) -> dict[str, Any]:
        g = generator_for(self.seed, index)
        views = self.transform(self.source.sample(index, g), g)
        if self.extras is not None:
            views.update(self.extras(views, g))
        return views

    def __len__(self) -> int:  # the stream is endless; the sampler decides what is read
        return 2**62


def collate_views(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples; list-valued keys (crops) are concatenated crop-major: ``[crop0 of all, crop1 of all, ...]``,
    so all crops of one size go through the model in one forward."""
    out: dict[str, Any] = {}
    for key, first in batch[0].items():
        if isinstance(first, list):
            out[key] = torch.stack([s[key][i] for i in range(len(first)) for s in batch]) if first else None
        elif isinstance(first, torch.Tensor):
            out[key] = torch.stack([s[key] for s in batch])
        else:
            out[key] = [s[key] for s in batch]
    return out
