"""DICOM whole-slide images (VL Whole Slide Microscopy) written by the pathology tests themselves.

A DICOM WSI is a folder of instances, one per pyramid level, sharing a series; OpenSlide (through libdicom)
opens any one of them and finds the others. Levels are TILED_FULL: frames in row-major tile order, edge tiles
padded to the full tile size.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

WSI_STORAGE = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage


def _frames(image: np.ndarray, tile: int) -> list[np.ndarray]:
    """Row-major tiles of ``image``, edge tiles padded with white to ``tile x tile``."""
    h, w = image.shape[:2]
    frames = []
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            frame = np.full((tile, tile, 3), 255, np.uint8)
            part = image[y : y + tile, x : x + tile]
            frame[: part.shape[0], : part.shape[1]] = part
            frames.append(frame)
    return frames


def _jpeg(frame: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_dicom_wsi(
    folder: Path,
    levels: list[np.ndarray],
    *,
    mpp: float = 0.25,
    tile: int = 256,
    jpeg: bool = False,
    name: str = "level",
) -> list[Path]:
    """One ``<name><i>.dcm`` per level (``levels[0]`` the full resolution, ``H x W x 3`` uint8).

    ``mpp`` is the level-0 pixel spacing in microns; coarser levels get it scaled by their downsample.
    Returns the files written, level 0 first.
    """
    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame_of_ref = generate_uid(), generate_uid(), generate_uid()
    h0, w0 = levels[0].shape[:2]
    paths = []
    for index, image in enumerate(levels):
        h, w = image.shape[:2]
        uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = WSI_STORAGE
        meta.MediaStorageSOPInstanceUID = uid
        meta.TransferSyntaxUID = JPEGBaseline8Bit if jpeg else ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = WSI_STORAGE, uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.FrameOfReferenceUID = frame_of_ref
        ds.Modality, ds.PatientID, ds.PatientName = "SM", "TEST", "Test^Slide"
        ds.InstanceNumber, ds.SeriesNumber = index + 1, 1
        ds.ContainerIdentifier = "TEST-SLIDE"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
        ds.DimensionOrganizationType = "TILED_FULL"
        ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = w, h
        ds.TotalPixelMatrixFocalPlanes = 1
        ds.Rows = ds.Columns = tile
        frames = _frames(image, tile)
        ds.NumberOfFrames = len(frames)
        ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.ImagedVolumeWidth, ds.ImagedVolumeHeight = w0 * mpp / 1000, h0 * mpp / 1000
        ds.ImagedVolumeDepth = 0.001
        spacing_mm = mpp * (w0 / w) / 1000
        measures = Dataset()
        measures.PixelSpacing = [spacing_mm, spacing_mm]  # between rows, between columns
        measures.SliceThickness = 0.001
        shared = Dataset()
        shared.PixelMeasuresSequence = Sequence([measures])
        ds.SharedFunctionalGroupsSequence = Sequence([shared])
        if jpeg:
            ds.PhotometricInterpretation = "YBR_FULL_422"
            ds.LossyImageCompression = "01"
            ds.PixelData = encapsulate([_jpeg(f) for f in frames])
            ds["PixelData"].VR = "OB"
            ds["PixelData"].is_undefined_length = True
        else:
            ds.PhotometricInterpretation = "RGB"
            ds.PixelData = np.stack(frames).tobytes()
        path = folder / f"{name}{index}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
