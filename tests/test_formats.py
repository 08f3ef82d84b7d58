"""The formats hospitals export: DICOM slices and NIfTI volumes, checked against hand-computed HU, windows and
orientation (tiny files written by pydicom and nibabel in the tests)."""

from __future__ import annotations

import numpy as np
import pytest
from _medical_files import nibabel_or_skip, pydicom_or_skip, write_dicom, write_nifti

from robustmed_lite.data.loaders import LUNG_WINDOW, load_images, read_dicom, read_gray, read_nifti_slices, window_hu

# The files are a few pixels wide so that every value can be checked by hand; the loader warns about that.
pytestmark = pytest.mark.filterwarnings("ignore:.*smaller than 8 px:UserWarning")


def _load(root, size, **kwargs):
    return load_images(root, size, cache=False, progress=False, **kwargs)


# ------------------------------------------------------------------------------------------------- window


def test_lung_window_by_hand():
    # (HU - (L - W/2)) / W with W 1500, L -600: -1350 -> 0, -600 -> 0.5, +150 -> 1, air -1000 -> 350/1500.
    hu = np.array([-2000, -1350, -1000, -600, 0, 150, 3000])
    expected = np.array([0, 0, 350 / 1500, 0.5, 1350 / 1500, 1, 1], dtype=np.float32)
    np.testing.assert_allclose(window_hu(hu), expected, atol=1e-6)
    assert LUNG_WINDOW == (1500.0, -600.0)
    # A soft-tissue window W 400 / L 40: -160 -> 0, 40 -> 0.5, 240 -> 1.
    np.testing.assert_allclose(window_hu(np.array([-160, 40, 140, 240]), (400, 40)), [0, 0.5, 0.75, 1], atol=1e-6)


# -------------------------------------------------------------------------------------------------- DICOM


def test_dicom_hu_window_and_orientation(tmp_path):
    pydicom_or_skip()
    # Stored values with slope 2 and intercept -1024: HU = 2 * stored - 1024.
    stored = np.array([[1000, 0, 212], [-200, 512, 587]], dtype=np.int16)
    hu = 2.0 * stored - 1024  # [[976, -1024, -600], [-1424, 0, 150]]
    path = write_dicom(tmp_path / "slice.dcm", stored, slope=2, intercept=-1024)
    gray = read_dicom(path)
    expected = np.array([[1.0, 326 / 1500, 0.5], [0.0, 1350 / 1500, 1.0]], dtype=np.float32)
    np.testing.assert_allclose(window_hu(hu), expected, atol=1e-6)
    np.testing.assert_allclose(gray, expected, atol=1e-6)
    assert gray.shape == (2, 3) and gray.dtype == np.float32  # rows x columns as stored: row 0 at the top


def test_dicom_without_rescale_tags_is_taken_as_hu_and_window_is_configurable(tmp_path):
    pydicom_or_skip()
    stored = np.array([[-160, 40, 240]], dtype=np.int16)
    path = write_dicom(tmp_path / "soft.dcm", stored, slope=None, intercept=None)
    np.testing.assert_allclose(read_dicom(path, window=(400, 40)), [[0.0, 0.5, 1.0]], atol=1e-6)
    np.testing.assert_allclose(read_gray(path, window=(400, 40)), [[0.0, 0.5, 1.0]], atol=1e-6)


def test_monochrome1_is_inverted(tmp_path):
    pydicom_or_skip()
    stored = np.array([[424, 1024], [0, 2000]], dtype=np.int16)  # -600, 0, -1024, 976 HU
    normal = read_dicom(write_dicom(tmp_path / "m2.dcm", stored))
    inverted = read_dicom(write_dicom(tmp_path / "m1.dcm", stored, photometric="MONOCHROME1"))
    np.testing.assert_allclose(inverted, 1 - normal, atol=1e-6)
    np.testing.assert_allclose(normal, [[0.5, 0.9], [326 / 1500, 1.0]], atol=1e-6)


def test_dicom_folders_load_with_their_labels_and_extensionless_files(tmp_path):
    pydicom_or_skip()
    root = tmp_path / "hospital"
    marker = np.full((6, 6), -1000 + 1024, np.int16)
    marker[0, 0] = 1024  # 0 HU in the top-left corner
    write_dicom(root / "COVID" / "IM000001", marker)  # scanners export without an extension
    write_dicom(root / "COVID" / "b.dcm", marker)
    write_dicom(root / "non-COVID" / "c.DCM", marker)
    data = _load(root, 6)
    assert data.labels.tolist() == [1, 1, 0] and data.images.shape == (3, 1, 6, 6)
    assert data.paths[0].endswith("IM000001")
    np.testing.assert_allclose(data.images[:, 0, 0, 0].numpy(), 0.9, atol=1e-6)
    np.testing.assert_allclose(data.images[:, 0, 5, 5].numpy(), 350 / 1500, atol=1e-6)


# -------------------------------------------------------------------------------------------------- NIfTI


def _volume(nx=5, ny=4, nz=3) -> np.ndarray:
    """int16 HU, air (-1000) everywhere; per axial slice z a 0-HU marker at the patient's right-anterior corner
    (the largest x and y in RAS+) and the slice number in HU at the left-posterior corner."""
    vol = np.full((nx, ny, nz), -1000, np.int16)
    vol[nx - 1, ny - 1, :] = 0
    vol[0, 0, :] = np.arange(nz) * 100 - 600  # slice z: -600 + 100 z HU
    return vol


def test_nifti_axial_slices_hu_and_radiological_view(tmp_path):
    nibabel_or_skip()
    path = write_nifti(tmp_path / "ras.nii.gz", _volume())
    slices = read_nifti_slices(path, [0, 1, 2])
    assert len(slices) == 3 and slices[0].shape == (4, 5)  # rows: y (anterior-posterior), columns: x
    for z, gray in enumerate(slices):
        assert gray[0, 0] == pytest.approx(0.9)  # right-anterior: top-left, as a radiologist views it
        assert gray[-1, -1] == pytest.approx((-600 + 100 * z + 1350) / 1500)  # left-posterior: bottom-right
        assert gray[1, 1] == pytest.approx(350 / 1500)


@pytest.mark.parametrize("flip", [(-1, -1, 1), (1, 1, -1), (-1, 1, -1)])
def test_nifti_orientation_follows_the_affine(tmp_path, flip):
    """The same anatomy stored in other voxel orders (LPS as from DICOM, a reversed slice order) gives the same
    slices."""
    nibabel_or_skip()
    vol = _volume()
    stored = vol[tuple(slice(None, None, s) for s in flip)]  # voxel order reversed where the axis is flipped
    affine = np.diag([*flip, 1]).astype(float)
    expected = read_nifti_slices(write_nifti(tmp_path / "ras.nii", vol), [0, 1, 2])
    got = read_nifti_slices(write_nifti(tmp_path / "other.nii", stored, affine), [0, 1, 2])
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(a, b)


def test_nifti_transposed_axes_are_found_by_the_affine(tmp_path):
    """A volume stored as (z, y, x): the axial axis is the one the affine maps to inferior-superior."""
    nibabel_or_skip()
    vol = _volume()
    affine = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], float)  # array axis 0 is z
    got = read_nifti_slices(write_nifti(tmp_path / "zyx.nii", vol.transpose(2, 1, 0).copy(), affine), [0, 1, 2])
    expected = read_nifti_slices(write_nifti(tmp_path / "ras.nii", vol), [0, 1, 2])
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(a, b)


def test_nifti_scaling_gives_hounsfield_units(tmp_path):
    nibabel_or_skip()
    raw = np.full((3, 3, 2), 424, np.int16)
    raw[2, 2, :] = 1024
    path = write_nifti(tmp_path / "scaled.nii", raw, slope=1.0, inter=-1024.0)  # HU = raw - 1024
    gray = read_nifti_slices(path, [1])[0]
    assert gray[1, 1] == pytest.approx(0.5) and gray[0, 0] == pytest.approx(0.9)


def test_nifti_folders_labels_slices_and_patient_grouping(tmp_path):
    nibabel_or_skip()
    root = tmp_path / "mosmed"
    for name in ("a", "b"):
        write_nifti(root / "COVID" / f"{name}.nii.gz", _volume(nz=6))
        write_nifti(root / "non-COVID" / f"{name}.nii.gz", _volume(nz=6))
    data = _load(root, 4)
    assert len(data) == 24 and data.labels.tolist() == [1] * 12 + [0] * 12
    assert data.paths[:2] == [f"{root / 'COVID' / 'a.nii.gz'}#z=0", f"{root / 'COVID' / 'a.nii.gz'}#z=1"]
    assert data.patient_ids[0] == data.patient_ids[5] != data.patient_ids[6]  # one volume, one patient
    parts = data.splits(val=0.5, test=0.0, seed=0, duplicates="off")  # identical volumes; two train, two val
    owners = {name: {data.patient_ids[i] for i in idx} for name, idx in parts.items()}
    assert len(owners["train"]) == len(owners["val"]) == 2 and not owners["train"] & owners["val"]
    every_other = _load(root, 4, slice_step=2)
    assert [p.rsplit("=", 1)[1] for p in every_other.paths[:3]] == ["0", "2", "4"] and len(every_other) == 12
    middle = _load(root, 4, slice_range=(2, 4))
    assert [p.rsplit("=", 1)[1] for p in middle.paths[:2]] == ["2", "3"] and len(middle) == 8


def test_nifti_index_csv_labels(tmp_path):
    nibabel_or_skip()
    write_nifti(tmp_path / "vols" / "p1.nii", _volume(nz=2))
    write_nifti(tmp_path / "vols" / "p2.nii", _volume(nz=2))
    (tmp_path / "index.csv").write_text("path,label\nvols\\p1.nii,COVID\nvols/p2.nii,0\n")
    data = _load(tmp_path / "index.csv", 4)
    assert data.layout == "csv" and data.labels.tolist() == [1, 1, 0, 0]


def test_window_changes_the_cache_key(tmp_path):
    pydicom_or_skip()
    root = tmp_path / "d"
    write_dicom(root / "COVID" / "a.dcm")
    write_dicom(root / "non-COVID" / "b.dcm")
    lung = load_images(root, 4, cache_dir=tmp_path / "cache", progress=False)
    soft = load_images(root, 4, cache_dir=tmp_path / "cache", progress=False, window=(400, 40))
    assert not np.array_equal(lung.images.numpy(), soft.images.numpy())
    assert len(list((tmp_path / "cache").iterdir())) == 2
