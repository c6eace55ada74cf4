"""The ``medical`` domain: CT/MR volumes (NIfTI, DICOM) reoriented to RAS, resampled, 3D MAE pretraining."""

from domains.medical.domain import MedicalDomain

__all__ = ["MedicalDomain"]
