"""The ``pathology`` domain: whole-slide images, tissue detection, tiling and stain augmentation."""

from domains.pathology.domain import PathologyDomain

__all__ = ["PathologyDomain"]
