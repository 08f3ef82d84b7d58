"""Writers of tiny DICOM and NIfTI files for the tests (pydicom and nibabel write them; nothing is downloaded)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest


def pydicom_or_skip():
    return pytest.importorskip("pydicom", reason="DICOM tests need pydicom: pip install 'robustmed-lite[dicom]'")


def nibabel_or_skip():
    return pytest.importorskip("nibabel", reason="NIfTI tests need nibabel: pip install 'robustmed-lite[dicom]'")


def write_dicom(
    path: Path,
    stored=None,
    *,
    slope: float | None = 1.0,
    intercept: float | None = -1024.0,
    photometric: str = "MONOCHROME2",
    frames: int = 1,
    pixel_data: bool = True,
    compressed: bool = False,
) -> Path:
    """A CT slice of signed 16-bit stored values (default a 4x5 ramp), single-frame unless ``frames`` > 1.

    Args:
        stored: (H, W) or (frames, H, W) stored values.
        slope, intercept: Rescale to HU (None leaves the tag out).
        photometric: MONOCHROME2 (lowest value black) or MONOCHROME1 (lowest value white).
        frames: NumberOfFrames.
        pixel_data: False writes a dataset without any image (like a structured report).
        compressed: Declares JPEG-LS Lossless and encapsulates bytes no installed decoder can read.
    """
    pydicom_or_skip()
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEGLSLossless, generate_uid

    path.parent.mkdir(parents=True, exist_ok=True)
    stored = np.arange(20, dtype=np.int16).reshape(4, 5) * 100 if stored is None else np.asarray(stored, np.int16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = JPEGLSLossless if compressed else ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.PatientID = "TEST"
    if pixel_data:
        ds.Rows, ds.Columns = stored.shape[-2:]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        if slope is not None:
            ds.RescaleSlope = f"{slope:g}"
        if intercept is not None:
            ds.RescaleIntercept = f"{intercept:g}"
        if frames > 1:
            ds.NumberOfFrames = frames
        if compressed:
            from pydicom.encaps import encapsulate

            ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7 not really JPEG-LS \xff\xd9"])
            ds["PixelData"].VR = "OB"
        else:
            ds.PixelData = stored.tobytes()
            ds["PixelData"].VR = "OW"
    ds.save_as(path, enforce_file_format=True)  # the 128-byte preamble, 'DICM' and the file meta
    return path


def write_nifti(path: Path, volume: np.ndarray, affine=None, slope: float | None = None, inter: float = 0.0) -> Path:
    """A NIfTI-1 file of ``volume`` (stored with its own dtype) with ``affine`` (default RAS+ identity).

    ``slope`` and ``inter`` are written into the header of an uncompressed ``.nii`` afterwards (scl_slope and
    scl_inter, bytes 112-119), so that the stored values stay exactly ``volume`` and a reader must apply them
    (nibabel would otherwise choose its own scaling when saving)."""
    nib = nibabel_or_skip()
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(volume), np.eye(4) if affine is None else np.asarray(affine, float))
    img.set_data_dtype(np.asarray(volume).dtype)
    nib.save(img, str(path))
    if slope is not None:
        assert path.suffix == ".nii", "scaling is patched into uncompressed .nii files only"
        with open(path, "r+b") as f:
            f.seek(112)
            f.write(struct.pack("<ff", slope, inter))
    return path
