"""The ``pathology`` domain: whole-slide images, tissue detection, tiling and stain augmentation."""

__all__ = ["PathologyDomain"]


def __getattr__(name: str):
    # Imported on first use: the command-line parsers live in this package too, and listing them must not
    # import torch (PEP 562).
    if name == "PathologyDomain":
        from foundation_domains.pathology.domain import PathologyDomain

        return PathologyDomain
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
