"""Training crops for organ segmentation: MONAI's positive/negative sampling on preprocessed volumes.

``dataset[i]`` is a pure function of ``(seed, i)``: the volume, the crop centre (foreground or background, 1:1,
``RandCropByPosNegLabeld``) and the flips / rot90 all come from :func:`foundation.data.seeding.generator_for`, so
resume and DDP replay exactly. Preprocessing (reading, reorientation, resampling) is the expensive part, so each
data-loader worker keeps its last few preprocessed volumes, padded to at least the ROI (a volume smaller than the
crop is padded with background, never refused) and with their foreground/background voxel indices.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from monai.utils import convert_to_tensor
from torch.utils.data import Dataset

from foundation.data.seeding import draw_seed, generator_for
from foundation.errors import DataError
from foundation_domains.medical.segmentation.meta import SegmentationMeta
from foundation_domains.medical.segmentation.transforms import preprocessing

log = logging.getLogger(__name__)
KEYS = ["image", "label"]
MAX_TRIES = 16  # broken volumes replaced by other random picks before giving up


def prepare_volume(entry: dict[str, str], meta: SegmentationMeta) -> dict[str, torch.Tensor]:
    """Preprocess one image/label pair for cropping: arrays padded to ``roi_size``, plus fg/bg indices.

    Raises:
        DataError: the pair cannot be read or preprocessed; the message names the image.
    """
    import monai.transforms as mt

    prepare = mt.Compose(
        [
            preprocessing(meta, keys=("image",), label_key="label"),
            mt.SpatialPadd(keys=KEYS, spatial_size=list(meta.roi_size), mode="constant", value=0),
            # background voxels only inside the body (image > 0), as in MONAI's BTCV recipe
            mt.FgBgToIndicesd(keys="label", image_key="image", image_threshold=0.0),
        ]
    )
    try:
        out = prepare(dict(entry))
    except Exception as e:  # MONAI wraps reader and transform errors in RuntimeError
        raise DataError(f"{entry['image']}: cannot preprocess this image/label pair ({e})") from e
    check_label_values(out["label"], meta.num_classes, entry["label"])
    return {
        "image": out["image"].as_tensor().float().contiguous(),
        "label": out["label"].as_tensor().float().contiguous(),
        "label_fg_indices": out["label_fg_indices"],
        "label_bg_indices": out["label_bg_indices"],
    }


def check_label_values(label: torch.Tensor, num_classes: int, path: str) -> None:
    """Raises: DataError naming ``path`` when a label value is not a class index ``0..num_classes - 1``."""
    low, high = float(label.min()), float(label.max())
    if low < 0 or high >= num_classes:
        raise DataError(
            f"{path}: label values {low:g}..{high:g} outside the {num_classes} classes 0..{num_classes - 1}; "
            'list every organ in the datalist\'s "labels" (or task.options.labels)'
        )


def crop_transform(roi_size: Sequence[int], flip_prob: float, rot90_prob: float):
    """One pos/neg crop of ``roi_size``, random flips on each axis and a random in-plane rot90."""
    import monai.transforms as mt

    return mt.Compose(
        [
            mt.RandCropByPosNegLabeld(
                keys=KEYS,
                label_key="label",
                spatial_size=list(roi_size),
                pos=1.0,
                neg=1.0,
                num_samples=1,
                fg_indices_key="label_fg_indices",
                bg_indices_key="label_bg_indices",
            ),
            *(mt.RandFlipd(keys=KEYS, prob=flip_prob, spatial_axis=axis) for axis in range(3)),
            mt.RandRotate90d(keys=KEYS, prob=rot90_prob, max_k=3, spatial_axes=(0, 1)),
        ]
    )


class SegmentationCropDataset(Dataset):
    """Endless ``{"image": C x D x H x W, "label": 1 x D x H x W}`` crops of ``meta.roi_size``."""

    def __init__(
        self,
        entries: list[dict[str, str]],
        meta: SegmentationMeta,
        *,
        seed: int,
        cache: int = 4,
        flip_prob: float = 0.1,
        rot90_prob: float = 0.1,
    ) -> None:
        if not entries:
            raise DataError("organ segmentation: no training pairs")
        self.entries, self.meta, self.seed, self.cache = list(entries), meta, seed, cache
        self.augment = crop_transform(meta.roi_size, flip_prob, rot90_prob)
        self._cache: OrderedDict[int, Any] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:  # workers start with an empty cache, not the parent's
        return {**self.__dict__, "_cache": OrderedDict()}

    def __len__(self) -> int:
        return 2**62

    def _load(self, i: int) -> dict[str, torch.Tensor] | DataError:
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        try:
            self._cache[i] = prepare_volume(self.entries[i], self.meta)
        except DataError as e:
            log.warning("organ segmentation: skipping %s", e)
            self._cache[i] = e  # remembered, so it is not read again
        while len(self._cache) > self.cache:
            self._cache.popitem(last=False)
        return self._cache[i]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        g = generator_for(self.seed, index)
        errors = []
        for _ in range(MAX_TRIES):
            volume = self._load(int(torch.randint(0, len(self.entries), (1,), generator=g)))
            if isinstance(volume, DataError):
                errors.append(volume)
                continue
            self.augment.set_random_state(seed=draw_seed(g))
            crop = self.augment(dict(volume))[0]
            return {k: convert_to_tensor(crop[k], dtype=torch.float32, track_meta=False) for k in KEYS}
        raise DataError(f"{MAX_TRIES} random volumes in a row could not be preprocessed; last: {errors[-1]}")
