"""Random cubic crops from a list of volumes, with a small per-worker cache of preprocessed volumes.

Reading and resampling a CT takes far longer than cropping it, so each worker keeps the last few
preprocessed volumes (``data.options.cache``) and draws many crops from them.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from foundation.errors import DataError
from foundation_domains.medical.options import VolumeOptions
from foundation_domains.medical.volume import BACKGROUND, load_volume

log = logging.getLogger(__name__)


def random_crop(array: torch.Tensor, size: int, generator: torch.Generator, fill: float = BACKGROUND):
    """A ``C x size^3`` crop at a random position; axes shorter than ``size`` are padded with ``fill``
    at a random offset rather than refused (small volumes and thin slabs are common)."""
    index, pad = [slice(None)], []
    for n in array.shape[1:]:
        if n >= size:
            start = int(torch.randint(0, n - size + 1, (1,), generator=generator))
            index.append(slice(start, start + size))
            pad.append((0, 0))
        else:
            before = int(torch.randint(0, size - n + 1, (1,), generator=generator))
            index.append(slice(None))
            pad.append((before, size - n - before))
    crop = array[tuple(index)]
    flat = [p for axis in reversed(pad) for p in axis]  # F.pad wants the last axis first
    return F.pad(crop, flat, value=fill) if any(flat) else crop


class VolumeSampleSource:
    """``sample(i, g)``: a random volume, a random ``size^3`` crop of it: ``{"image": C x D x H x W}``.

    A volume that cannot be used (unreadable, every voxel NaN) is named in a warning once and not read again;
    another is drawn in its place, so training goes on with the others. Only when none is usable does a
    :class:`DataError` stop it.
    """

    def __init__(self, volumes: list[Path], opts: VolumeOptions, size: int) -> None:
        self.volumes, self.opts, self.size = list(volumes), opts, size
        self._cache: OrderedDict[int, Any] = OrderedDict()
        self._unusable: dict[int, DataError] = {}

    def __getstate__(self) -> dict[str, Any]:  # workers start with an empty cache, not the parent's
        return {**self.__dict__, "_cache": OrderedDict()}

    def _load(self, i: int):
        if i in self._unusable:
            return self._unusable[i]
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        try:
            volume = load_volume(self.volumes[i], self.opts)
        except DataError as e:
            log.warning("medical: skipping %s", e)
            self._unusable[i] = e  # remembered, so it is neither read nor drawn again
            return e
        self._cache[i] = volume
        while len(self._cache) > self.opts.cache:
            self._cache.popitem(last=False)
        return volume

    def random_volume(self, generator: torch.Generator):
        """A random usable volume: an unusable pick is set aside (once) and drawn again. The draws do not
        depend on what this worker has already found unusable, so a resumed run draws the same volumes.

        Raises:
            DataError: no volume is usable, each named with its reason.
        """
        while len(self._unusable) < len(self.volumes):
            volume = self._load(int(torch.randint(0, len(self.volumes), (1,), generator=generator)))
            if not isinstance(volume, DataError):
                return volume
        reasons = "; ".join(str(e) for e in self._unusable.values())
        raise DataError(f"none of the {len(self.volumes)} volume(s) can be trained on: {reasons}")

    def sample(self, index: int, generator: torch.Generator) -> dict[str, Any]:
        volume = self.random_volume(generator)
        return {"image": random_crop(volume.array, self.size, generator).contiguous()}
