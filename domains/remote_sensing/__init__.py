"""The ``remote_sensing`` domain: multispectral rasters read with rasterio (any band count, dtype, nodata)."""

__all__ = ["RemoteSensingDomain"]


def __getattr__(name: str):
    # Imported on first use: the command-line parsers live in this package too, and listing them must not
    # import torch (PEP 562).
    if name == "RemoteSensingDomain":
        from foundation_domains.remote_sensing.domain import RemoteSensingDomain

        return RemoteSensingDomain
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
