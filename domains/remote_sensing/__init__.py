"""The ``remote_sensing`` domain: multispectral rasters read with rasterio (any band count, dtype, nodata)."""

from domains.remote_sensing.domain import RemoteSensingDomain

__all__ = ["RemoteSensingDomain"]
