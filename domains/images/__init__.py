"""The ``images`` domain: a folder of ordinary images (PNG/JPEG/TIFF/BMP/WebP), ImageFolder-style labels."""

__all__ = ["ImagesDomain"]


def __getattr__(name: str):
    # Imported on first use: the command-line parsers live in this package too, and listing them must not
    # import torch (PEP 562).
    if name == "ImagesDomain":
        from foundation_domains.images.domain import ImagesDomain

        return ImagesDomain
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
