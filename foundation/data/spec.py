"""What a domain found out about its data, as one value the core reads (channels, dims, normalisation).

Channels and statistics are properties of the data, not of the domain: a domain returns them with its sample
source (:class:`foundation.domain.DataSource`) instead of setting attributes that others read back later, so
nothing depends on the order in which a domain's methods were called.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from foundation.errors import ConfigError


@dataclass(frozen=True)
class DataSpec:
    """The tensors a domain's samples and views hold.

    Attributes:
        channels: input channels (bands, RGB, MR sequences).
        spatial_dims: 2 (images, slices) or 3 (volume crops).
        mean, std: per-channel normalisation of the views, one value per channel.
        band_names: what each channel is, where the data says (e.g. ``("red", "green", "blue")``); else None.
    """

    channels: int
    spatial_dims: int = 2
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    band_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if self.channels < 1 or self.spatial_dims not in (2, 3):
            raise ConfigError(
                f"DataSpec: channels={self.channels}, spatial_dims={self.spatial_dims} is no input"
            )
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ConfigError(
                f"DataSpec: {len(self.mean)} mean and {len(self.std)} std values for {self.channels} channels"
            )

    @property
    def is_rgb(self) -> bool:
        """Three channels known to be red, green, blue (colour augmentation makes sense)."""
        return self.band_names == ("red", "green", "blue")

    def normalised_with(self, mean: Sequence[float], std: Sequence[float]) -> DataSpec:
        """The same data normalised with other statistics (a backbone's own)."""
        return DataSpec(self.channels, self.spatial_dims, tuple(mean), tuple(std), self.band_names)
