"""Fixtures of the remote_sensing tests: rasters written on the fly (helpers in rs_testdata.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from rs_testdata import WriteRaster, random_bands, write_raster


@pytest.fixture
def raster(tmp_path: Path) -> WriteRaster:
    """``raster(name, count, height, width, dtype, seed=..., **write_raster kwargs)`` -> path."""

    def make(
        name: str, count: int = 4, height: int = 70, width: int = 90, dtype: str = "uint16", **kw
    ) -> Path:
        seed = kw.pop("seed", 0)
        return write_raster(tmp_path / name, random_bands(count, height, width, dtype, seed), **kw)

    return make
