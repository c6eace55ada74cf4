"""What an organ-segmentation model carries from training to ``segment``, ``evaluate`` and bundles.

:meth:`SegmentationMeta.to_dict` is the only writer of an organ-segmentation ``task_meta``,
:meth:`SegmentationMeta.from_dict` its only reader (checks once, naming the file and the key), so the
preprocessing, classes and sliding-window settings of every consumer are the ones training used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from foundation.tasks.meta import MetaReader, integer, mapping, number, sequence, string

TASK_NAME = "organ-segmentation"
MODALITIES = ("ct", "mr")
DEFAULT_OVERLAP = 0.5


def _labels(value: Any) -> dict[str, int]:
    return {string(k): integer(v) for k, v in mapping(value).items()}


def _modality(value: Any) -> str:
    if string(value) not in MODALITIES:
        raise ValueError(f"not one of {list(MODALITIES)}")
    return value


@dataclass(frozen=True)
class SegmentationMeta:
    """An organ-segmentation model's preprocessing, classes and inference settings.

    Attributes:
        head: the UNETR head's arguments as stored (``SegmentationNet.head_args``), which rebuild the network.
        in_chans: image channels the network takes.
        roi_size: sliding-window (and training crop) size in voxels.
        num_classes: output channels, background included.
        labels: organ name -> label value (empty for a model that records none).
        spacing: voxel spacing in mm the volumes are resampled to; None: kept as read.
        modality: ``ct`` (HU window scaled to [0, 1]) or ``mr`` (percentile normalisation).
        window: the CT HU window ``(low, high)``; None only for MR.
        overlap: sliding-window overlap.
        sw_batch_size: windows per forward pass; None: the consumer's default.
    """

    head: dict[str, Any]
    in_chans: int
    roi_size: tuple[int, ...]
    num_classes: int
    labels: dict[str, int] = field(default_factory=dict)
    spacing: tuple[float, ...] | None = None
    modality: str = "ct"
    window: tuple[float, float] | None = None
    overlap: float = DEFAULT_OVERLAP
    sw_batch_size: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The stored ``task_meta`` (the keys and value types every version wrote)."""
        return {
            "head": dict(self.head),
            "in_chans": self.in_chans,
            "roi_size": list(self.roi_size),
            "spacing": list(self.spacing) if self.spacing is not None else None,
            "modality": self.modality,
            "window": list(self.window) if self.window is not None else None,
            "labels": dict(self.labels),
            "num_classes": self.num_classes,
            "overlap": self.overlap,
            "sw_batch_size": self.sw_batch_size,
        }

    def class_names(self) -> dict[int, str]:
        """Label value -> organ name."""
        return {v: n for n, v in self.labels.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str | Path) -> SegmentationMeta:
        """Raises: CheckpointError naming ``source`` and the missing or bad key."""
        r = MetaReader(d, source, TASK_NAME)
        meta = cls(
            head=r.read("head", mapping),
            in_chans=r.read("in_chans", integer),
            roi_size=r.read("roi_size", sequence(integer)),
            num_classes=r.read("num_classes", integer),
            labels=r.read("labels", _labels, {}),
            spacing=r.read("spacing", sequence(number), None),
            modality=r.read("modality", _modality, "ct"),
            window=r.read("window", sequence(number), None),
            overlap=r.read("overlap", number, DEFAULT_OVERLAP),
            sw_batch_size=r.read("sw_batch_size", integer, None),
        )
        if meta.modality == "ct" and (meta.window is None or len(meta.window) != 2):
            r.read("window", _two_values)
        return meta


def _two_values(value: Any) -> None:
    raise ValueError("a CT model needs its HU window [low, high]")
