"""The ``medical`` domain: CT/MR volumes (NIfTI, DICOM) reoriented to RAS, resampled, 3D MAE pretraining."""

__all__ = ["MedicalDomain"]


def __getattr__(name: str):
    # Imported on first use: the command-line parsers live in this package too, and listing them must not
    # import torch (PEP 562).
    if name == "MedicalDomain":
        from foundation_domains.medical.domain import MedicalDomain

        return MedicalDomain
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
