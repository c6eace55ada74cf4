"""``data.options`` of the medical domain, checked strictly so a typo is refused by name, not ignored."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from foundation.config import reject_unknown_keys
from foundation.errors import ConfigError

MODALITIES = ("ct", "mr")
CT_WINDOW = (-175.0, 250.0)  # abdominal soft-tissue window in HU (UNETR / SwinUNETR BTCV recipes)


@dataclass(frozen=True)
class VolumeOptions:
    """How volumes are turned into training arrays.

    Attributes:
        spacing: target voxel size in mm along R, A, S; ``None`` keeps each volume's own spacing.
        modality: ``ct`` (HU window scaled to [0, 1]) or ``mr`` (0.5/99.5 percentiles per channel to [0, 1]).
        window: CT window ``[low, high]`` in HU.
        channels: expected channel count; default 1 for CT, whatever the data has for MR.
        cache: preprocessed volumes kept per data-loader worker.
    """

    spacing: tuple[float, float, float] | None = (1.5, 1.5, 2.0)
    modality: str = "ct"
    window: tuple[float, float] = CT_WINDOW
    channels: int | None = None
    cache: int = 4

    @property
    def expected_channels(self) -> int | None:
        return self.channels if self.channels is not None else (1 if self.modality == "ct" else None)

    @classmethod
    def from_options(cls, options: dict[str, Any], cfg: Any = None) -> VolumeOptions:
        """``data.options`` as written (typed once, when the config loads: ``cfg.data.typed_options``; also
        ``visualize --option``).

        Raises:
            ConfigError: naming the ``data.options`` key and the allowed values.
        """
        reject_unknown_keys(options, cls, "data.options", "the medical domain")
        kw = dict(options)
        if kw.get("spacing") is not None:
            kw["spacing"] = _floats("spacing", kw["spacing"], 3)
            if min(kw["spacing"]) <= 0:
                raise ConfigError(f"data.options.spacing={list(kw['spacing'])!r} must be > 0 mm")
        if "window" in kw:
            kw["window"] = _floats("window", kw["window"], 2)
            if kw["window"][0] >= kw["window"][1]:
                raise ConfigError(
                    f"data.options.window={list(kw['window'])!r} must be [low, high], low < high"
                )
        modality = str(kw.get("modality", "ct")).lower()
        if modality not in MODALITIES:
            raise ConfigError(f"data.options.modality={kw['modality']!r} is not one of {list(MODALITIES)}")
        kw["modality"] = modality
        for key in ("channels", "cache"):
            if kw.get(key) is not None and (not isinstance(kw[key], int) or kw[key] < 1):
                raise ConfigError(f"data.options.{key}={kw[key]!r} must be an integer >= 1")
        return cls(**kw)


def _floats(key: str, value: Any, n: int) -> tuple[float, ...]:
    if isinstance(value, (int, float)):
        value = [value] * n
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"data.options.{key}={value!r} must be {n} numbers") from e
    if len(out) != n:
        raise ConfigError(f"data.options.{key}={value!r} must be {n} numbers")
    return out
