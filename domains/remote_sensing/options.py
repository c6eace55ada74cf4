"""The domain's options (``data.options`` in a recipe, ``data.options.KEY=VALUE`` on the command line).

Parsed strictly, like the rest of the config: an unknown key or a bad value is refused with its name and the
allowed values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from foundation.config import reject_unknown_keys
from foundation.errors import ConfigError


def parse_bands(spec: Any, key: str = "data.options.bands") -> tuple[int, ...] | None:
    """``"3,2,1"``, ``[3, 2, 1]`` or ``4`` -> 1-based band numbers; ``None``/``""``/``"all"`` -> all bands.

    Raises:
        ConfigError: not a list of positive integers; the message names ``key``.
    """
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "all")):
        return None
    items = spec.split(",") if isinstance(spec, str) else spec if isinstance(spec, list | tuple) else [spec]
    try:
        bands = tuple(int(str(b).strip()) for b in items)
    except ValueError as e:
        raise ConfigError(f"{key}={spec!r}: expected 1-based band numbers such as '3,2,1'") from e
    if not bands or min(bands) < 1:
        raise ConfigError(f"{key}={spec!r}: band numbers start at 1 (e.g. '3,2,1')")
    return bands


@dataclass(frozen=True)
class RasterOptions:
    """Options of the ``remote_sensing`` domain.

    Attributes:
        bands: 1-based bands to read, in order (default: every band except alpha).
        scale: divisor to reflectance-like units: ``auto`` (uint8 255, (u)int16 10000, else 1) or a number.
        stats: JSON file from ``foundation stats`` to normalise with, instead of estimating statistics.
        mean, std: per-band normalisation in scaled units (e.g. a backbone's own), instead of ``stats``.
        nodata: nodata value (raw units) for files that declare none.
        min_valid: smallest fraction of valid pixels in a training window.
        window_scale: training windows are this times ``data.crops.global_size`` (room for the random crop).
        stats_windows: 256-px windows read to estimate statistics when none are given.
        color: colour jitter / grayscale / solarize: ``auto`` (only for 3-band red-green-blue files), true, false.
    """

    bands: tuple[int, ...] | None = None
    scale: str | float = "auto"
    stats: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    nodata: float | None = None
    min_valid: float = 0.8
    window_scale: float = 1.5
    stats_windows: int = 64
    color: str | bool = "auto"

    @classmethod
    def from_options(cls, options: dict[str, Any], cfg: Any = None) -> RasterOptions:
        """``data.options`` as written (typed once, when the config loads: ``cfg.data.typed_options``).

        Raises:
            ConfigError: unknown key or bad value, named as ``data.options.KEY``.
        """
        reject_unknown_keys(options, cls, "data.options", "the remote_sensing domain")
        values = dict(options)
        values["bands"] = parse_bands(values.get("bands"))
        for key in ("mean", "std"):
            if values.get(key) is not None:
                values[key] = tuple(float(v) for v in values[key])
        opts = cls(**values)
        opts._check()
        return opts

    def _check(self) -> None:
        if not 0 <= self.min_valid <= 1:
            raise ConfigError(f"data.options.min_valid={self.min_valid!r} must be in [0, 1]")
        if self.window_scale < 1:
            raise ConfigError(f"data.options.window_scale={self.window_scale!r} must be >= 1")
        if self.stats_windows < 1:
            raise ConfigError(f"data.options.stats_windows={self.stats_windows!r} must be >= 1")
        if self.color not in ("auto", True, False):
            raise ConfigError(f"data.options.color={self.color!r} is not one of ['auto', true, false]")
        if (self.mean is None) != (self.std is None):
            raise ConfigError("data.options.mean and data.options.std go together; give both or neither")
        if self.std is not None and (len(self.std) != len(self.mean) or min(self.std) <= 0):
            raise ConfigError("data.options.std must have one positive value per value of data.options.mean")
