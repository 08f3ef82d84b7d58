"""data/loaders.py: the shared sets, every layout, every PIL mode, the cache, the splits, the error messages, and the
formats hospitals export (DICOM slices and NIfTI volumes, against hand-computed HU, windows and orientation, in tiny
files written by pydicom and nibabel)."""

from __future__ import annotations

import io
import os
import sys
import types
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from _medical_files import nibabel_or_skip, pydicom_or_skip, write_dicom, write_nifti
from PIL import Image

from robustmed_lite.common import CLASS_NAMES
from robustmed_lite.data import loaders as data
from robustmed_lite.data.loaders import (
    LUNG_WINDOW,
    DataError,
    DownloadError,
    ImageSet,
    download_sarscov2,
    find_shared_data,
    load_images,
    official_splits,
    read_dicom,
    read_gray,
    read_nifti_slices,
    split_indices,
    window_hu,
)

# A horizontal ramp 0..255: any correct conversion keeps it a ramp, scaled to [0, 1].
RAMP = np.tile(np.linspace(0, 255, 20).round().astype(np.uint8), (16, 1))


def _save(path: Path, img: Image.Image | np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(RAMP) if img is None else img
    (img if isinstance(img, Image.Image) else Image.fromarray(img)).save(path)
    return path


def _kaggle_tree(root: Path, n: int = 3) -> Path:
    for i in range(n):
        _save(root / "COVID" / f"Covid ({i}).png", np.full((12, 10), 200 - i, np.uint8))
        _save(root / "non-COVID" / f"Non-Covid ({i}).png", np.full((12, 10), 50 + i, np.uint8))
    return root


def _load(root, size=8, **kwargs) -> ImageSet:
    kwargs.setdefault("cache", False)
    return load_images(root, size, progress=False, **kwargs)


# ---------------------------------------------------------------------------------------------- real data


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("robustmed-cache")


@pytest.fixture(scope="session")
def sarscov2(shared_data, cache_dir):
    return load_images(shared_data / "sarscov2", 32, cache_dir=cache_dir, progress=False)


@pytest.fixture(scope="session")
def ucsd(shared_data, cache_dir):
    return load_images(shared_data / "ucsd_covidct", 32, cache_dir=cache_dir, progress=False)


def _class_counts(labels: torch.Tensor) -> tuple[int, int]:
    """(COVID, non-COVID), the order the data README uses."""
    counts = torch.bincount(labels, minlength=2).tolist()
    return counts[1], counts[0]


@pytest.mark.real_data
def test_sarscov2_counts_and_one_channel(sarscov2):
    images, labels, paths = sarscov2
    assert sarscov2.layout == "kaggle"
    assert _class_counts(labels) == (1252, 1229)
    assert images.shape == (2481, 1, 32, 32) and images.dtype == torch.float32
    assert labels.dtype == torch.int64
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert paths == sorted(paths) and all(os.path.isabs(p) for p in paths)
    assert sarscov2.patient_ids is None and sarscov2.official_split is None
    covid = [Path(p).parent.name == "COVID" for p in paths]
    assert covid == (labels == 1).tolist()


@pytest.mark.real_data
def test_ucsd_official_split_is_respected_and_patient_disjoint(ucsd):
    assert ucsd.layout == "ucsd"
    assert _class_counts(ucsd.labels) == (349, 397)
    assert ucsd.images.shape == (746, 1, 32, 32)
    parts = official_splits(ucsd)
    counts = {name: _class_counts(ucsd.labels[torch.from_numpy(idx)]) for name, idx in parts.items()}
    assert counts == {"train": (191, 234), "val": (60, 58), "test": (98, 105)}
    splits_of_patient = {}
    for pid, split in zip(ucsd.patient_ids, ucsd.official_split):
        splits_of_patient.setdefault(pid, set()).add(split)
    assert all(len(s) == 1 for s in splits_of_patient.values())
    assert {k: v.tolist() for k, v in ucsd.splits().items()} == {k: v.tolist() for k, v in parts.items()}


@pytest.mark.real_data
def test_rgb_and_rgba_originals_come_out_alike(shared_data, tmp_path):
    root = shared_data / "sarscov2_originals"
    modes = {cls: Counter(Image.open(p).mode for p in sorted((root / cls).iterdir())) for cls in CLASS_NAMES}
    # The trap the loader must defuse: the file format alone tells the classes apart.
    assert set(modes["non-COVID"]) == {"RGBA"} and "RGB" in modes["COVID"]

    images, labels, paths = load_images(root, 64, cache_dir=tmp_path, progress=False)
    assert images.shape == (40, 1, 64, 64)
    for label in (0, 1):
        part = images[labels == label]
        assert part.shape[1:] == (1, 64, 64)
        assert part.amin() >= 0.0 and part.amax() <= 1.0 and part.amax() > 0.9
    # Opaque RGB and RGBA files both give exactly their luma, at native resolution.
    for path in paths[::5]:
        with Image.open(path) as img:
            luma = np.asarray(img.convert("L"), np.float32) / 255
        np.testing.assert_allclose(read_gray(path), luma, atol=1 / 255 + 1e-6)


# ------------------------------------------------------------------------------------------- PIL modes


def _modes(tmp_path: Path) -> dict[str, Path]:
    rgb = np.stack([RAMP] * 3, axis=-1)
    opaque = np.full(RAMP.shape, 255, np.uint8)
    palette = Image.frombytes("P", (20, 16), RAMP.tobytes())
    palette.putpalette([v for i in range(256) for v in (i, i, i)])
    files = {
        "L": Image.fromarray(RAMP),
        "RGB": Image.fromarray(rgb),
        "RGBA": Image.fromarray(np.dstack([rgb, opaque])),
        "LA": Image.fromarray(np.dstack([RAMP, opaque])),
        "P": palette,
        "I;16": Image.fromarray(RAMP.astype(np.uint16) * 257),
        "CMYK": Image.fromarray(rgb).convert("CMYK"),
        "F": Image.fromarray(RAMP.astype(np.float32) / 255),
    }
    suffix = {"CMYK": ".tif", "F": ".tif"}
    return {
        mode: _save(tmp_path / "modes" / f"{mode.replace(';', '_')}{suffix.get(mode, '.png')}", img)
        for mode, img in files.items()
    }


def test_every_mode_becomes_the_same_gray_ramp(tmp_path):
    for mode, path in _modes(tmp_path).items():
        with Image.open(path) as img:
            assert img.mode == mode, f"{path.name} reopened as {img.mode}"
        gray = read_gray(path)
        assert gray.dtype == np.float32 and gray.shape == RAMP.shape
        np.testing.assert_allclose(gray, RAMP / 255, atol=1 / 255 + 1e-6, err_msg=mode)


def test_alpha_is_composited_on_black(tmp_path):
    alpha = np.zeros(RAMP.shape, np.uint8)
    alpha[:, 10:] = 255
    gray = read_gray(_save(tmp_path / "half.png", np.dstack([RAMP, RAMP, RAMP, alpha])))
    assert np.all(gray[:, :10] == 0)
    np.testing.assert_allclose(gray[:, 10:], RAMP[:, 10:] / 255, atol=1e-6)


def test_high_bit_depth_scaling(tmp_path):
    twelve_bit = (RAMP.astype(np.uint16) * 16).clip(0, 4095)
    gray = read_gray(_save(tmp_path / "ct12.png", twelve_bit))
    np.testing.assert_allclose(gray, twelve_bit / 65535, atol=1e-7)  # the dtype maximum, not the image's
    hounsfield = RAMP.astype(np.int32) * 8 - 1024
    gray = read_gray(_save(tmp_path / "hu.tif", hounsfield))
    np.testing.assert_allclose(gray, RAMP / 255, atol=1e-6)  # signed: per-image min-max
    assert np.all(np.diff(gray, axis=1) >= 0)


def test_mixed_modes_load_as_one_channel(tmp_path):
    root = tmp_path / "mixed"
    for mode, path in _modes(tmp_path).items():
        _save(root / ("COVID" if len(mode) % 2 else "non-COVID") / path.name, Image.open(path))
    images, labels, _ = _load(root, 10)
    assert images.shape == (8, 1, 10, 10)
    assert images.min() >= 0 and images.max() <= 1
    # Left-to-right ramp survives resizing in every file.
    assert torch.all(images[:, 0, :, -1] > images[:, 0, :, 0])


# ---------------------------------------------------------------------------------------------- layouts


def test_kaggle_layout(tmp_path):
    s = _load(_kaggle_tree(tmp_path / "k"))
    assert s.layout == "kaggle" and len(s) == 6
    assert s.labels.tolist() == [1, 1, 1, 0, 0, 0]  # sorted paths: 'COVID/' < 'non-COVID/'
    assert torch.allclose(s.images[0], torch.full((1, 8, 8), 200 / 255))


def test_csv_path_label_with_backslashes(tmp_path):
    root = tmp_path / "c19c"
    _save(root / "imgs" / "gauss" / "a.png", np.full((9, 9), 255, np.uint8))
    _save(root / "imgs" / "gauss" / "b.png", np.zeros((9, 9), np.uint8))
    _save(root / "imgs" / "blur" / "c.png")
    (root / "index.csv").write_text(
        "path,label\nimgs\\gauss\\a.png,COVID\nimgs\\gauss\\b.png,non-COVID\nimgs/blur/c.png,1\n"
    )
    for where in (root / "index.csv", root):  # the CSV itself, or the folder holding it
        s = _load(where)
        assert s.layout == "csv"
        assert [Path(p).name for p in s.paths] == ["c.png", "a.png", "b.png"]  # sorted: blur < gauss
        assert s.labels.tolist() == [1, 1, 0]
        assert s.images[1].min() == 1.0 and s.images[2].max() == 0.0


def test_csv_filename_label_case_insensitive(tmp_path):
    root = tmp_path / "flat"
    for name in ("p1.png", "p2.png", "n1.png", "n2.png"):
        _save(root / name)
    (root / "labels.csv").write_text("Filename , LABEL\np1.png,positive\np2.png,1.0\nn1.png,Normal\nn2.png,0\n")
    s = _load(root, layout="csv")
    assert dict(zip((Path(p).name for p in s.paths), s.labels.tolist())) == {
        "n1.png": 0,
        "n2.png": 0,
        "p1.png": 1,
        "p2.png": 1,
    }


def test_nested_alias_folders_record_their_split(tmp_path):
    root = tmp_path / "nested"
    tree = {"train": ("CT_COVID", "normal"), "val": ("positive", "NonCOVID"), "test": ("covid", "Negative")}
    for split, (pos, neg) in tree.items():
        _save(root / split / pos / f"{split}-pos.png")
        _save(root / split / neg / f"{split}-neg.png")
    s = _load(root)
    assert s.layout == "folders" and len(s) == 6
    for path, label, split in zip(s.paths, s.labels.tolist(), s.official_split):
        name = Path(path).stem
        assert name == f"{split}-{'pos' if label else 'neg'}"
    assert {k: len(v) for k, v in official_splits(s).items()} == {"train": 2, "val": 2, "test": 2}


def test_several_nested_sets_are_one_folders_set(tmp_path):
    for cls in ("ucsd/CT_COVID", "ucsd/CT_NonCOVID", "kaggle/COVID", "kaggle/non-COVID"):
        _save(tmp_path / "many" / cls / "a.png")
    s = _load(tmp_path / "many")
    assert s.layout == "folders" and s.labels.tolist() == [1, 0, 1, 0]


def test_split_folders_without_val_get_one_carved_from_train(tmp_path):
    root = tmp_path / "tt"
    for i in range(10):
        _save(root / "train" / "COVID" / f"p{i}.png")
        _save(root / "train" / "non-COVID" / f"n{i}.png")
    for i in range(3):
        _save(root / "test" / "COVID" / f"tp{i}.png")
        _save(root / "test" / "non-COVID" / f"tn{i}.png")
    s = _load(root)
    parts = s.splits(val=0.2, seed=1, duplicates="off")  # every file here is the same ramp
    assert len(parts["val"]) == 4 and len(parts["train"]) == 16
    assert parts["test"].tolist() == official_splits(s)["test"].tolist()
    assert {s.official_split[i] for i in parts["val"]} == {"train"}


def _ucsd_tree(root: Path) -> Path:
    images = root / "Images-processed"
    names = {"CT_COVID": ["c1.png", "c2.png", "c3.png"], "CT_NonCOVID": ["n1.png", "n2.png", "n3.png"]}
    for cls, files in names.items():
        for name in files:
            _save(images / cls / name)
        short = cls.removeprefix("CT_")
        for split, name in zip(("train", "val", "test"), files):
            (root / "Data-split" / short).mkdir(parents=True, exist_ok=True)
            (root / "Data-split" / short / f"{split}{cls}.txt").write_text(f"{name}\n\n")
    return root


def test_ucsd_split_text_files(tmp_path):
    s = _load(_ucsd_tree(tmp_path / "COVID-CT"))
    assert s.layout == "ucsd" and s.patient_ids is None
    by_name = {Path(p).name: split for p, split in zip(s.paths, s.official_split)}
    assert by_name == {
        "c1.png": "train",
        "c2.png": "val",
        "c3.png": "test",
        "n1.png": "train",
        "n2.png": "val",
        "n3.png": "test",
    }
    assert _load(tmp_path / "COVID-CT" / "Images-processed").official_split == s.official_split


def test_subset_keeps_everything_aligned(tmp_path):
    s = _load(_kaggle_tree(tmp_path / "k"))
    sub = s.subset(np.array([4, 0]))
    assert sub.paths == [s.paths[4], s.paths[0]] and sub.labels.tolist() == [0, 1]
    assert torch.equal(sub.images[0], s.images[4])
    assert len(s.subset(s.labels.numpy() == 1)) == 3


# ------------------------------------------------------------------------------------------------ cache


def _count_decodes(monkeypatch) -> list:
    calls, real = [], data._decode
    monkeypatch.setattr(data, "_decode", lambda path, *args: calls.append(path) or real(path, *args))
    return calls


def test_cache_hit_and_invalidation(tmp_path, monkeypatch):
    root, cdir = _kaggle_tree(tmp_path / "k"), tmp_path / "cache"
    first = load_images(root, 8, cache_dir=cdir, progress=False)
    calls = _count_decodes(monkeypatch)
    second = load_images(root, 8, cache_dir=cdir, progress=False)
    assert calls == []
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    assert first.paths == second.paths
    assert [p.suffix for p in cdir.iterdir()] == [".pt"]  # no temporary file left behind

    _save(root / "COVID" / "new.png")
    assert len(load_images(root, 8, cache_dir=cdir, progress=False)) == 7 and len(calls) == 7
    calls.clear()
    stat = (root / "COVID" / "new.png").stat()
    os.utime(root / "COVID" / "new.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    load_images(root, 8, cache_dir=cdir, progress=False)
    assert len(calls) == 7
    calls.clear()
    load_images(root, 16, cache_dir=cdir, progress=False)  # another size is another entry
    assert len(calls) == 7


@pytest.mark.parametrize("foreign", [b"not a cache at all", "torch-dict"])
def test_cache_never_overwrites_a_foreign_file(tmp_path, foreign):
    root, cdir = _kaggle_tree(tmp_path / "k"), tmp_path / "cache"
    load_images(root, 8, cache_dir=cdir, progress=False)
    (entry,) = cdir.iterdir()
    if foreign == "torch-dict":
        buffer = io.BytesIO()
        torch.save({"weights": torch.zeros(2)}, buffer)
        foreign = buffer.getvalue()
    entry.write_bytes(foreign)
    with pytest.warns(UserWarning, match="cache"):
        s = load_images(root, 8, cache_dir=cdir, progress=False)
    assert len(s) == 6 and entry.read_bytes() == foreign


def test_cache_location_and_switch(tmp_path, monkeypatch):
    root = _kaggle_tree(tmp_path / "k")
    monkeypatch.setenv("ROBUSTMED_CACHE", str(tmp_path / "env-cache"))
    load_images(root, 8, cache=False, progress=False)
    assert not (tmp_path / "env-cache").exists()
    load_images(root, 8, progress=False)
    assert len(list((tmp_path / "env-cache").glob("kaggle-8px-*.pt"))) == 1
    not_a_folder = tmp_path / "notes.txt"
    not_a_folder.write_text("mine")
    with pytest.warns(UserWarning, match="could not write cache"):
        assert len(load_images(root, 8, cache_dir=not_a_folder, progress=False)) == 6
    assert not_a_folder.read_text() == "mine"


# ----------------------------------------------------------------------------------------------- splits


def test_stratified_split_is_disjoint_complete_and_seeded():
    labels = np.array([0] * 100 + [1] * 60)
    parts = split_indices(labels, val=0.15, test=0.15, seed=3)
    assert np.array_equal(np.sort(np.concatenate(list(parts.values()))), np.arange(160))
    counts = {k: np.bincount(labels[v], minlength=2).tolist() for k, v in parts.items()}
    assert counts == {"train": [70, 42], "val": [15, 9], "test": [15, 9]}
    again = split_indices(torch.from_numpy(labels), val=0.15, test=0.15, seed=3)
    assert all(np.array_equal(parts[k], again[k]) for k in parts)
    other = split_indices(labels, seed=4)
    assert not np.array_equal(parts["val"], other["val"])


def test_grouped_split_keeps_groups_whole():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 7, size=90)
    groups = np.repeat([f"patient {i}" for i in range(90)], sizes)
    labels = np.repeat(rng.integers(0, 2, size=90), sizes)  # a patient is one class
    parts = split_indices(labels, groups=groups, seed=5)
    assert np.array_equal(np.sort(np.concatenate(list(parts.values()))), np.arange(len(labels)))
    seen = [set(groups[idx]) for idx in parts.values()]
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    for name, fraction in (("train", 0.7), ("val", 0.15), ("test", 0.15)):
        assert abs(len(parts[name]) / len(labels) - fraction) < 0.04
        share = labels[parts[name]].mean()
        assert abs(share - labels.mean()) < 0.1
    again = split_indices(labels, groups=list(groups), seed=5)
    assert all(np.array_equal(parts[k], again[k]) for k in parts)


def test_split_edge_cases():
    no_test = split_indices([0] * 10 + [1] * 10, val=0.2, test=0.0)
    assert len(no_test["test"]) == 0 and len(no_test["val"]) == 4
    with pytest.raises(DataError, match="val split would be empty.*Fix"):
        split_indices([0, 1, 1])
    with pytest.raises(DataError, match="split would be empty.*groups"):
        split_indices([0, 1] * 5, groups=[0] * 5 + [1] * 5)
    with pytest.raises(ValueError, match="0 < val"):
        split_indices([0, 1] * 10, val=0.0)


def test_official_splits_needs_a_recorded_split(tmp_path):
    s = _load(_kaggle_tree(tmp_path / "k", n=10))
    with pytest.raises(DataError, match="no official split.*splits"):
        official_splits(s)
    parts = s.splits(seed=0)
    assert all(len(v) for v in parts.values())


# -------------------------------------------------------------------------------------------- bad input


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match=r"nowhere does not exist\. Fix"):
        _load(tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"missing folder .*non-COVID.*Fix"):
        _save(tmp_path / "half" / "COVID" / "a.png")
        _load(tmp_path / "half", layout="kaggle")


def test_empty_class_folder(tmp_path):
    _save(tmp_path / "d" / "COVID" / "a.png")
    (tmp_path / "d" / "non-COVID").mkdir()
    with pytest.raises(DataError, match=r"non-COVID \(non-COVID\) holds no images\. Fix: add .*remove the empty"):
        _load(tmp_path / "d")


@pytest.mark.parametrize("content", ["garbage", "truncated"])
def test_corrupt_image_names_the_file(tmp_path, content):
    root = _kaggle_tree(tmp_path / "k")
    png = io.BytesIO()
    Image.fromarray(RAMP).save(png, format="PNG")
    blob = b"this is not a png" if content == "garbage" else png.getvalue()[:60]
    (root / "COVID" / "broken.png").write_bytes(blob)
    with pytest.raises(DataError, match=r"cannot decode image .*broken\.png.*Fix"):
        _load(root)


def test_non_image_files_are_ignored_with_a_warning(tmp_path):
    root = _kaggle_tree(tmp_path / "k")
    (root / "COVID" / "notes.txt").write_text("scanner settings")
    (root / "non-COVID" / "slice.raw").write_bytes(b"DICM")  # no DICOM preamble: not an image
    (root / "non-COVID" / ".DS_Store").write_bytes(b"")  # hidden: skipped silently
    with pytest.warns(UserWarning, match=r"ignored 2 non-image file\(s\).*notes\.txt.*slice\.raw"):
        s = _load(root)
    assert len(s) == 6


def test_csv_errors(tmp_path):
    root = tmp_path / "c"
    _save(root / "a.png")
    index = root / "index.csv"
    index.write_text("file,class\na.png,1\n")
    with pytest.raises(DataError, match=r"columns \['file', 'class'\]; expected 'path,label' or 'filename,label'"):
        _load(index)
    index.write_text("path,label\na.png,1\nmissing.png,0\n")
    with pytest.raises(DataError, match=r"line 3: 'missing.png' .* does not exist\. Fix"):
        _load(index)
    index.write_text("path,label\na.png,maybe\n")
    with pytest.raises(DataError, match=r"line 2: label 'maybe' is not a class\. Fix"):
        _load(index)
    (root / "other.csv").write_text("path,label\n")
    with pytest.raises(DataError, match=r"one index CSV .*index\.csv, other\.csv.*Fix: name the index MetaInfo\.csv"):
        _load(root, layout="csv")


def test_ucsd_split_list_naming_a_missing_file(tmp_path):
    root = _ucsd_tree(tmp_path / "u")
    (root / "Data-split" / "COVID" / "testCT_COVID.txt").write_text("c3.png\nghost.png\n")
    with pytest.raises(DataError, match=r"missing images, e\.g\. CT_COVID/ghost\.png\. Fix"):
        _load(root)


def test_unknown_layout(tmp_path):
    with pytest.raises(DataError, match=r"unknown layout 'coco'.*kaggle, ucsd, csv, folders"):
        _load(_kaggle_tree(tmp_path / "k"), layout="coco")


def test_no_recognisable_class_folders(tmp_path):
    _save(tmp_path / "r" / "sick" / "a.png")
    (tmp_path / "r" / "healthy").mkdir()
    with pytest.raises(DataError, match=r"no class folders .*found: healthy/, sick/.*CT_NonCOVID.*negative"):
        _load(tmp_path / "r")


# ------------------------------------------------------------------------------------ finding and download


def test_find_shared_data_env_and_search(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBUSTMED_DATA", str(tmp_path / "absent"))
    with pytest.raises(DataError, match="ROBUSTMED_DATA.*not a folder"):
        find_shared_data()
    monkeypatch.delenv("ROBUSTMED_DATA")
    shared = tmp_path / "x" / "shared" / "data"
    shared.mkdir(parents=True)
    notebooks = tmp_path / "x" / "project" / "book" / "notebooks"
    notebooks.mkdir(parents=True)
    monkeypatch.chdir(notebooks)
    assert find_shared_data() == shared.resolve()
    monkeypatch.chdir(tmp_path / "x" / "project")
    monkeypatch.setattr(data, "__file__", str(tmp_path / "elsewhere" / "robustmed_lite" / "data.py"))
    assert find_shared_data() == shared.resolve()
    monkeypatch.chdir(tmp_path)
    assert find_shared_data() is None


@pytest.fixture
def no_kaggle_credentials(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN", "KAGGLE_CONFIG_DIR"):
        monkeypatch.delenv(name, raising=False)


def test_download_without_credentials(tmp_path, monkeypatch, no_kaggle_credentials):
    monkeypatch.setitem(sys.modules, "kaggle", None)  # importing it would fail: credentials come first
    with pytest.raises(DownloadError, match=r"no Kaggle credentials.*~/\.kaggle/kaggle\.json.*KAGGLE_KEY.*by hand"):
        download_sarscov2(tmp_path / "dl")


def test_download_without_the_package(tmp_path, monkeypatch, no_kaggle_credentials):
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", "not-a-key")
    monkeypatch.setitem(sys.modules, "kaggle", None)
    with pytest.raises(DownloadError, match=r"kaggle package is missing: pip install 'robustmed-lite\[kaggle\]'"):
        download_sarscov2(tmp_path / "dl")


def test_download_offline(tmp_path, monkeypatch, no_kaggle_credentials):
    (tmp_path / "home" / ".kaggle").mkdir(parents=True)
    (tmp_path / "home" / ".kaggle" / "kaggle.json").write_text('{"username": "someone", "key": "x"}')

    def unreachable(*args, **kwargs):
        raise ConnectionError("Failed to resolve 'www.kaggle.com'")

    fake = types.ModuleType("kaggle")
    fake.api = types.SimpleNamespace(dataset_download_files=unreachable)
    monkeypatch.setitem(sys.modules, "kaggle", fake)
    with pytest.raises(DownloadError, match=r"offline.*kaggle\.com/datasets/plameneduardo/sarscov2-ctscan-dataset"):
        download_sarscov2(tmp_path / "dl")


def test_download_is_a_no_op_when_the_data_is_there(tmp_path, no_kaggle_credentials):
    root = _kaggle_tree(tmp_path / "dl" / "sarscov2")
    assert download_sarscov2(tmp_path / "dl") == root


# The files are a few pixels wide so that every value can be checked by hand; the loader warns about that.
pytestmark = pytest.mark.filterwarnings("ignore:.*smaller than 8 px:UserWarning")


# ------------------------------------------------------------------------- DICOM and NIfTI (hospital formats)
def _read(root, size, **kwargs):
    return load_images(root, size, cache=False, progress=False, **kwargs)


def test_lung_window_by_hand():
    # (HU - (L - W/2)) / W with W 1500, L -600: -1350 -> 0, -600 -> 0.5, +150 -> 1, air -1000 -> 350/1500.
    hu = np.array([-2000, -1350, -1000, -600, 0, 150, 3000])
    expected = np.array([0, 0, 350 / 1500, 0.5, 1350 / 1500, 1, 1], dtype=np.float32)
    np.testing.assert_allclose(window_hu(hu), expected, atol=1e-6)
    assert LUNG_WINDOW == (1500.0, -600.0)
    # A soft-tissue window W 400 / L 40: -160 -> 0, 40 -> 0.5, 240 -> 1.
    np.testing.assert_allclose(window_hu(np.array([-160, 40, 140, 240]), (400, 40)), [0, 0.5, 0.75, 1], atol=1e-6)


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
    data = _read(root, 6)
    assert data.labels.tolist() == [1, 1, 0] and data.images.shape == (3, 1, 6, 6)
    assert data.paths[0].endswith("IM000001")
    np.testing.assert_allclose(data.images[:, 0, 0, 0].numpy(), 0.9, atol=1e-6)
    np.testing.assert_allclose(data.images[:, 0, 5, 5].numpy(), 350 / 1500, atol=1e-6)


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
    data = _read(root, 4)
    assert len(data) == 24 and data.labels.tolist() == [1] * 12 + [0] * 12
    assert data.paths[:2] == [f"{root / 'COVID' / 'a.nii.gz'}#z=0", f"{root / 'COVID' / 'a.nii.gz'}#z=1"]
    assert data.patient_ids[0] == data.patient_ids[5] != data.patient_ids[6]  # one volume, one patient
    parts = data.splits(val=0.5, test=0.0, seed=0, duplicates="off")  # identical volumes; two train, two val
    owners = {name: {data.patient_ids[i] for i in idx} for name, idx in parts.items()}
    assert len(owners["train"]) == len(owners["val"]) == 2 and not owners["train"] & owners["val"]
    every_other = _read(root, 4, slice_step=2)
    assert [p.rsplit("=", 1)[1] for p in every_other.paths[:3]] == ["0", "2", "4"] and len(every_other) == 12
    middle = _read(root, 4, slice_range=(2, 4))
    assert [p.rsplit("=", 1)[1] for p in middle.paths[:2]] == ["2", "3"] and len(middle) == 8


def test_nifti_index_csv_labels(tmp_path):
    nibabel_or_skip()
    write_nifti(tmp_path / "vols" / "p1.nii", _volume(nz=2))
    write_nifti(tmp_path / "vols" / "p2.nii", _volume(nz=2))
    (tmp_path / "index.csv").write_text("path,label\nvols\\p1.nii,COVID\nvols/p2.nii,0\n")
    data = _read(tmp_path / "index.csv", 4)
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


def test_covid19c_layout_with_subsets_and_backslashes(tmp_path):
    from PIL import Image

    from robustmed_lite.data.loaders import DataError, load_covid19c

    for subset, n in (("COV_C", 3), ("COV_R", 2)):
        folder = tmp_path / subset / "images" / "covid"
        folder.mkdir(parents=True)
        rows = ["path,label"]
        for i in range(n):
            Image.fromarray((torch.rand(20, 24) * 255).byte().numpy()).convert("RGB").save(folder / f"{i}.png")
            rows.append(f"images\\covid\\{i}.png,{i % 2}")  # Windows paths
        (tmp_path / subset / "MetaInfo.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "COV_R" / "notes.csv").write_text("a,b\n1,2\n")  # another CSV beside MetaInfo.csv is not the index
    subsets = load_covid19c(tmp_path, 16, cache=False, progress=False)
    assert list(subsets) == ["COV_C", "COV_R"]
    assert subsets["COV_C"].images.shape == (3, 1, 16, 16) and subsets["COV_R"].labels.tolist() == [0, 1]
    with pytest.raises(DataError, match="no subset folder"):
        load_covid19c(tmp_path / "COV_C" / "images", 16)
