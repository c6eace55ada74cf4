"""What a canopy-height model carries from training to map making, as one typed value.

Statistics, bands or scale that differ between training and map making silently ruin the maps
(shared/reference/remote_sensing.md), so they travel with the weights: :meth:`CanopyMeta.to_dict` is the only
writer of a canopy-height ``task_meta``, :meth:`CanopyMeta.from_dict` its only reader (checks once, naming the
file and the key).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from foundation.errors import CheckpointError
from foundation.tasks.meta import MetaReader, integer, mapping, number, sequence
from foundation_domains.remote_sensing.canopy.head import MAX_HEIGHT

TASK_NAME = "canopy-height"
DEFAULT_TILE = 256  # map-making tile of a model that records none


def _scale(value: Any) -> str | float:
    if isinstance(value, str):
        return value
    return number(value)


@dataclass(frozen=True)
class CanopyMeta:
    """A canopy-height model's reading of the data.

    Attributes:
        head: the DPT head's options as stored (``HeadOptions.to_dict()``), which rebuild the network.
        in_chans: bands the network takes.
        mean, std: per-band normalisation in scaled units, ``in_chans`` each.
        bands: 1-based bands read from a scene; None: every band but alpha.
        scale: divisor to reflectance-like units (a number) or ``auto`` (from the dtype).
        tile_size: the training tile, also the default map-making tile.
        gsd: metres per pixel of the training images (None: unknown), for ``--resample`` and the GSD warning.
        max_height: top of the height range in metres (quicklook colours).
        nodata: image nodata value for files that declare none (None: not set).
    """

    head: dict[str, Any]
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    bands: tuple[int, ...] | None = None
    scale: str | float = "auto"
    tile_size: int = DEFAULT_TILE
    gsd: float | None = None
    max_height: float = MAX_HEIGHT
    nodata: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The stored ``task_meta`` (keys and value types as every version wrote them; ``nodata`` only if set)."""
        d = {
            "head": dict(self.head),
            "bands": list(self.bands) if self.bands else None,
            "scale": self.scale,
            "mean": list(self.mean),
            "std": list(self.std),
            "in_chans": self.in_chans,
            "tile_size": self.tile_size,
            "gsd": self.gsd,
            "max_height": self.max_height,
        }
        if self.nodata is not None:
            d["nodata"] = self.nodata
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str | Path) -> CanopyMeta:
        """Raises: CheckpointError naming ``source`` and the missing or bad key."""
        r = MetaReader(d, source, TASK_NAME)
        meta = cls(
            head=r.read("head", mapping),
            in_chans=r.read("in_chans", integer),
            mean=r.read("mean", sequence(number)),
            std=r.read("std", sequence(number)),
            bands=r.read("bands", sequence(integer), None) or None,
            scale=r.read("scale", _scale, "auto"),
            tile_size=r.read("tile_size", integer, 0) or DEFAULT_TILE,
            gsd=r.read("gsd", number, None),
            max_height=r.read("max_height", number, 0) or MAX_HEIGHT,
            nodata=r.read("nodata", number, None),
        )
        if len(meta.mean) != meta.in_chans or len(meta.std) != meta.in_chans:
            raise CheckpointError(
                f"{source}: task_meta has {len(meta.mean)} 'mean' / {len(meta.std)} 'std' values for "
                f"in_chans={meta.in_chans}: a broken {TASK_NAME} model"
            )
        return meta
