"""The ``images`` domain: a folder of ordinary images (PNG/JPEG/TIFF/BMP/WebP), ImageFolder-style labels."""

from domains.images.domain import ImagesDomain

__all__ = ["ImagesDomain"]
