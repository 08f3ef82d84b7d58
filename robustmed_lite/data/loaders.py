"""Real lung-CT slices: find them, load any common layout as one-channel tensors, cache them, split them.

Layouts (``load_images(..., layout=...)``, detected by ``"auto"``):

* ``kaggle``: the SARS-CoV-2 CT-scan set, ``COVID/`` and ``non-COVID/``.
* ``ucsd``: UCSD COVID-CT, ``CT_COVID/`` and ``CT_NonCOVID/`` (also under ``Images-processed/``), with either a
  ``meta.csv`` (image, label, patient_id, official_split) or the upstream ``Data-split/`` text files.
* ``csv``: a COVID19-C-style index with columns ``path,label`` or ``filename,label``.
* ``folders``: any class-per-folder tree, class folders at the top or one level down (``train/COVID``).

A folder with class folders *and* an index CSV is read by its folders, with a warning that names the CSV and how
to use it instead (pass the CSV itself, or ``layout="csv"``).

File formats: images Pillow reads (PNG, JPEG, TIFF, ...), DICOM slices (``.dcm``, ``.dicom``, or any file with the
DICOM preamble; needs pydicom) and NIfTI volumes (``.nii``, ``.nii.gz``; needs nibabel), labelled by their folder
or an index CSV alike. ``pip install 'robustmed-lite[dicom]'`` installs both readers.

Conversion policy, the same for every layout:

* One grayscale channel in [0, 1] from any PIL mode. Colour uses the ITU-R 601 luma weights (PIL's own ``L``).
  Alpha is composited onto black: a transparent pixel is "nothing there", and nothing in CT is air, which is
  black. Fully opaque files (all the Kaggle RGBA files) therefore give exactly their luma.
* 16-bit and 32-bit integer images are divided by 65535 (the 16-bit maximum) when their values fit in
  [0, 65535], so one file's intensities stay comparable with another's; 12-bit data thus looks dark, as it
  should without a window. Signed or wider integers (raw Hounsfield units) and floats outside [0, 1] have no
  agreed maximum and are min-max scaled per image.
* DICOM and NIfTI hold Hounsfield units (HU): DICOM stored values become HU by the rescale slope and intercept
  (NIfTI's scl_slope / scl_inter likewise), and HU become [0, 1] by one lung window for every file,
  ``(HU - (L - W/2)) / W`` clipped to [0, 1], default W 1500 / L -600 (``window=(W, L)``): -1350 HU and below
  are 0, +150 HU and above are 1, air (-1000 HU) is 0.233. The file's own window tags are ignored on purpose:
  they differ between hospitals, which a model would learn. MONOCHROME1 DICOM (lowest value shown white) is
  inverted after windowing, so that it looks as a viewer shows it. Multi-frame DICOM, files without pixel data
  and compressed DICOM without an installed decoder are refused with a message that says what to do.
* NIfTI volumes give their axial slices (the volume axis closest to inferior-superior, ``slice_step`` and
  ``slice_range`` choose among them, counted from inferior), each in the radiological view of a PNG export:
  anterior at the top, the patient's right on the left. Slices of one volume share a patient id, so every split
  keeps a volume whole. ``ImageSet.paths`` names them ``<file>#z=<k>``.
* Non-finite values (NaN, inf) in a float image or volume are an error naming the file and where they are: NaN
  defeats min/max scaling and would give an all-black or NaN image.
* Resized to ``size x size`` (the aspect ratio is not kept, like the usual ``Resize((224, 224))`` the shared copies
  were made with) by Pillow's antialiased bilinear filter, which is correct for shrinking and enlarging alike.
  Images smaller than ``MIN_SIDE`` pixels on a side (a 1x1 placeholder becomes a flat slice) are loaded and named
  in one warning.
* Files without an image extension inside class folders are ignored, counted and reported in one warning (a
  stray ``notes.txt`` should not stop a notebook, but should not pass unnoticed either); hidden files such as
  ``.DS_Store`` are skipped silently. A file with an image extension that does not decode is an error.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import importlib
import json
import os
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from ..common import CLASS_NAMES
from ..runinfo import progress_options
from .duplicates import SplitIndices, duplicate_groups, keep_together

LAYOUTS = ("auto", "kaggle", "ucsd", "csv", "folders")
SPLITS = ("train", "val", "test")
PIL_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".pgm", ".ppm", ".pnm"})
DICOM_EXTENSIONS = frozenset({".dcm", ".dicom"})
NIFTI_EXTENSIONS = frozenset({".nii", ".nii.gz"})
IMAGE_EXTENSIONS = PIL_EXTENSIONS | DICOM_EXTENSIONS | NIFTI_EXTENSIONS
LUNG_WINDOW = (1500.0, -600.0)  # (width, level) in HU, for DICOM and NIfTI
MIN_SIDE = 8  # images smaller than this on a side carry no anatomy after resizing: warned about
MAX_ASPECT = 3  # a side more than 3x the other: a strip or a screenshot, not a slice; squashing it is warned about
# Bump whenever decoding or resizing changes, so that old caches are not reused.
LOADER_VERSION = 3
KAGGLE_DATASET = "plameneduardo/sarscov2-ctscan-dataset"
KAGGLE_URL = f"https://www.kaggle.com/datasets/{KAGGLE_DATASET}"

# Folder names and CSV labels, compared after lower-casing and dropping '-', '_' and spaces.
_CLASS_ALIASES = {
    "covid": 1,
    "ctcovid": 1,
    "1": 1,
    "positive": 1,
    "noncovid": 0,
    "ctnoncovid": 0,
    "normal": 0,
    "0": 0,
    "negative": 0,
}
_ALIAS_HELP = (
    "COVID, CT_COVID, covid, 1, positive -> COVID; non-COVID, NonCOVID, CT_NonCOVID, normal, 0, "
    "negative -> non-COVID (case-insensitive)"
)
_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_CACHE_FORMAT = "robustmed_lite.images"


class DataError(ValueError):
    """Data that cannot be loaded as asked; the message names the file or folder and the fix."""


class DownloadError(RuntimeError):
    """A download that cannot proceed; the message says how to fix it or get the data by hand."""


@dataclass
class ImageSet:
    """Decoded slices with their labels and provenance.

    Unpacks as ``images, labels, paths = load_images(root, 64)``.

    Attributes:
        images: float32 tensor (N, 1, S, S) in [0, 1].
        labels: int64 tensor (N,), 0 = non-COVID, 1 = COVID (``CLASS_NAMES``).
        paths: Absolute file paths, in the (sorted) order of ``images``; a slice of a NIfTI volume is
            ``<file>#z=<k>`` (axial slice k, counted from inferior).
        patient_ids: One id per image where the layout records them (UCSD ``meta.csv``; the volume of a NIfTI
            slice), else None.
        official_split: 'train' / 'val' / 'test' per image where the layout records one, else None.
        layout: The layout the images were read with.
        root: The folder or CSV they were read from.
    """

    images: torch.Tensor
    labels: torch.Tensor
    paths: list[str]
    patient_ids: list[str] | None = None
    official_split: list[str] | None = None
    layout: str = "folders"
    root: Path | None = None

    def __iter__(self):
        return iter((self.images, self.labels, self.paths))

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices) -> ImageSet:
        """A new ImageSet holding the given indices (ints or a boolean mask), in that order."""
        idx = np.asarray(indices)
        idx = np.flatnonzero(idx) if idx.dtype == bool else idx.astype(np.int64).reshape(-1)
        tensor_idx = torch.from_numpy(idx)

        def pick(items):
            return None if items is None else [items[i] for i in idx]

        return ImageSet(
            self.images[tensor_idx],
            self.labels[tensor_idx],
            pick(self.paths),
            pick(self.patient_ids),
            pick(self.official_split),
            self.layout,
            self.root,
        )

    def splits(
        self, *, val: float = 0.15, test: float = 0.15, seed: int = 0, duplicates: str = "exact"
    ) -> SplitIndices:
        """Train / val / test indices: the official split if recorded, else patient-grouped, else stratified;
        then duplicate slices are kept in one split (``data.duplicates``).

        A recorded split without a validation part gets one carved out of its training part (``val`` of it,
        grouped by patient where known). Without patient ids (the Soares set) slices of one patient land in
        several splits, which flatters in-domain accuracy: prefer a cross-site test there.

        Args:
            val: Validation fraction when no official split exists.
            test: Test fraction when no official split exists.
            seed: Seed of the random parts.
            duplicates: ``exact`` (same pixels), ``near`` (also near-identical, by difference hash) or ``off``.

        Returns:
            Split name -> sorted index array, with ``.duplicates``: what the check found and moved (a warning
            names the count when images moved).
        """
        parts = choose_splits(self.labels.numpy(), self.official_split, self.patient_ids, val=val, test=test, seed=seed)
        groups = duplicate_groups(self.images, duplicates)
        parts, report = keep_together(parts, groups, self.labels.numpy(), duplicates, self.paths)
        if report.moved:
            warnings.warn(
                f"{self.root or 'the image set'}: {report.summary()} (first group: {report.examples[0]}). "
                "Duplicates in two splits would leak training images into evaluation; set duplicates off to "
                "keep the split as drawn",
                stacklevel=2,
            )
        return SplitIndices(parts, report)


# ---------------------------------------------------------------------------------------------- finding data


def find_shared_data() -> Path | None:
    """Locates the shared real-data folder.

    ``ROBUSTMED_DATA`` wins if set. Otherwise looks for ``shared/data`` beside every parent of the working
    directory, then of this package, which covers /work/main with /work/shared, notebooks run from a
    subfolder, and a CI clone at /tmp/x/project with /tmp/x/shared.

    Returns:
        The folder, or None if there is none.

    Raises:
        DataError: ``ROBUSTMED_DATA`` names a folder that does not exist.
    """
    env = os.environ.get("ROBUSTMED_DATA")
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise DataError(
                f"ROBUSTMED_DATA={env!r} is not a folder: point it at the folder holding sarscov2/ "
                "and ucsd_covidct/, or unset it to search for ../shared/data"
            )
        return path.resolve()
    for start in (Path.cwd(), Path(__file__).resolve().parent):
        for folder in (start, *start.parents):
            candidate = folder / "shared" / "data"
            if candidate.is_dir():
                return candidate.resolve()
    return None


# ------------------------------------------------------------------------------------------------- indexing


@dataclass
class _Index:
    """What a layout says before any pixel is read."""

    layout: str
    paths: list[Path]
    labels: list[int]
    patient_ids: list[str] | None = None
    official_split: list[str] | None = None
    non_images: tuple[Path, ...] = ()
    slices: list[int | None] | None = None  # the axial slice of a volume entry, None for 2-D files

    def names(self) -> list[str]:
        """One name per entry: the file, or ``<file>#z=<k>`` for a slice of a volume."""
        slices = self.slices or [None] * len(self.paths)
        return [str(p) if z is None else f"{p}#z={z}" for p, z in zip(self.paths, slices)]


def class_of(name: str) -> int | None:
    """The label a folder name or CSV label stands for (see the module docstring), or None."""
    key = str(name).strip().lower().replace("-", "").replace("_", "").replace(" ", "")
    return _CLASS_ALIASES.get(key)


def _visible_dirs(folder: Path) -> list[Path]:
    # '__MACOSX' and '.ipynb_checkpoints' are artefacts of zipping and editing, and UCSD's Data-split/COVID holds
    # split lists: none of them is a class folder.
    return sorted(
        p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "__")) and p.name != "Data-split"
    )


def _find_class_dirs(root: Path) -> list[tuple[Path, int]]:
    """Class folders at the top of ``root``, else one level down (``root/train/COVID``).

    Raises:
        DataError: A folder holding images sits beside the class folders under a name that is no class (a third
            class such as CAP/ or pneumonia/ would otherwise be dropped without a word).
    """
    top = [(d, class_of(d.name)) for d in _visible_dirs(root)]
    found = [(d, label) for d, label in top if label is not None]
    if not found:
        nested = [(d, class_of(d.name)) for parent, _ in top for d in _visible_dirs(parent)]
        found = [(d, label) for d, label in nested if label is not None]
        top = [(d, label) for d, label in nested if d.parent in {f.parent for f, _ in found}]
    unknown = [(d, len(_walk_class_dir(d)[0])) for d, label in top if label is None]
    unknown = [(d, n) for d, n in unknown if n]
    if found and unknown:
        listed = ", ".join(f"{d.name}/ ({n} images)" for d, n in unknown)
        raise DataError(
            f"{unknown[0][0].parent} holds class folders {', '.join(d.name for d, _ in found)} and folders that "
            f"are no class of this task: {listed}. Fix: move them out of the data folder, or rename each to a "
            f"class name ({_ALIAS_HELP})"
        )
    return found


def file_kind(path: str | os.PathLike) -> str | None:
    """'image' (Pillow), 'dicom' or 'nifti' by the file's extension, else None."""
    name = Path(path).name.lower()
    if name.endswith(".nii.gz") or name.endswith(".nii"):
        return "nifti"
    suffix = Path(name).suffix
    if suffix in DICOM_EXTENSIONS:
        return "dicom"
    return "image" if suffix in PIL_EXTENSIONS else None


def _has_dicom_preamble(path: Path) -> bool:
    """A DICOM Part 10 file: 128 bytes of preamble, then 'DICM'. Scanners export slices without an extension
    (IM000001) or as .IMA, so other files in class folders are sniffed."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


# What a data root given as a symbolic link should point at (the fix of ``check_link``).
ROOT_LINK_TARGET = "the data folder (or pass that folder itself)"


def check_link(path: Path, target: str = "an image file", option: str = "") -> None:
    """Refuses a symbolic link that points nowhere or into a loop, naming it (the bare errno says neither).

    Args:
        path: The path, a link or not (only a link is checked).
        target: What the link should point at, for the fix.
        option: The option that named the path (``--data``), said before it; empty for a file found inside data.
    """
    if not path.is_symlink():
        return
    try:
        path.stat()
    except OSError as err:
        if err.errno == errno.ELOOP:
            what = "a symbolic link loop (following it leads back to itself)"
        else:
            what = f"a broken symbolic link to {os.readlink(path)}, which does not exist"
        named = f"{option} {path}" if option else str(path)
        raise DataError(f"{named} is {what}. Fix: point the link at {target}, or delete it") from None


def _walk_class_dir(folder: Path) -> tuple[list[Path], list[Path]]:
    """Image files (with DICOM files of any name) and other files below a class folder, both sorted; hidden
    files are skipped."""
    images, others = [], []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith((".", "__"))]
        for name in filenames:
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            check_link(path)
            known = file_kind(path) is not None or _has_dicom_preamble(path)
            (images if known else others).append(path)
    return sorted(images), sorted(others)


def _index_class_dirs(layout: str, root: Path, class_dirs: list[tuple[Path, int]]) -> _Index:
    """The one walk over class folders that the kaggle, ucsd and folders layouts share."""
    entries, non_images = [], []
    for folder, label in class_dirs:
        images, others = _walk_class_dir(folder)
        if not images:
            hint = f" (it holds {len(others)} other files such as {others[0].name})" if others else ""
            raise DataError(
                f"class folder {folder} ({CLASS_NAMES[label]}) holds no images{hint}. Fix: add the "
                f"images (extensions {', '.join(sorted(IMAGE_EXTENSIONS))}) or remove the empty folder"
            )
        # A parent below root named like a split (root/train/COVID) is recorded as the official split.
        split = _SPLIT_ALIASES.get(folder.parent.name.lower()) if folder.parent != root else None
        entries += [(path, label, split) for path in images]
        non_images += others
    entries.sort(key=lambda e: str(e[0]))
    splits = [split for _, _, split in entries]
    return _Index(
        layout,
        [p for p, _, _ in entries],
        [label for _, label, _ in entries],
        official_split=splits if all(splits) else None,
        non_images=tuple(non_images),
    )


def _no_class_dirs_error(root: Path) -> DataError:
    seen = [p.name + ("/" if p.is_dir() else "") for p in sorted(root.iterdir())][:20]
    return DataError(
        f"no class folders found in {root} (found: {', '.join(seen) or 'nothing'}). Fix: name one "
        f"folder per class using the accepted aliases: {_ALIAS_HELP}; class folders may sit one "
        "level down (root/train/COVID); or pass an index CSV with columns path,label"
    )


def _index_folders(root: Path) -> _Index:
    class_dirs = _find_class_dirs(root)
    if not class_dirs:
        raise _no_class_dirs_error(root)
    return _index_class_dirs("folders", root, class_dirs)


def _require_dirs(parent: Path, names: tuple[str, ...], layout: str) -> list[tuple[Path, int]]:
    missing = [n for n in names if not (parent / n).is_dir()]
    if missing:
        raise DataError(
            f"missing folder {', '.join(str(parent / n) for n in missing)} for the {layout} layout "
            f"(expected {' and '.join(n + '/' for n in names)} in {parent}). Fix: pass the folder "
            "that holds them, or layout='auto' / 'folders' for another tree"
        )
    return [(parent / n, class_of(n)) for n in names]


def _index_kaggle(root: Path) -> _Index:
    return _index_class_dirs("kaggle", root, _require_dirs(root, ("COVID", "non-COVID"), "kaggle"))


def _ucsd_parent(root: Path) -> Path:
    """The folder holding CT_COVID/ and CT_NonCOVID/: root itself or one level down (Images-processed/)."""
    for parent in (root, *_visible_dirs(root)):
        if (parent / "CT_COVID").is_dir() and (parent / "CT_NonCOVID").is_dir():
            return parent
    return root


def _index_ucsd(root: Path) -> _Index:
    parent = _ucsd_parent(root)
    index = _index_class_dirs("ucsd", parent, _require_dirs(parent, ("CT_COVID", "CT_NonCOVID"), "ucsd"))
    meta = next((f for f in (root / "meta.csv", parent / "meta.csv") if f.is_file()), None)
    if meta is not None:
        _attach_ucsd_meta(index, meta)
        return index
    # Upstream keeps Data-split/ beside Images-processed/, which holds the class folders.
    split_dir = next(
        (d for d in (root / "Data-split", parent / "Data-split", root.parent / "Data-split") if d.is_dir()), None
    )
    if split_dir is not None:
        _attach_ucsd_split_files(index, split_dir)
    return index


def _read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    """Header (stripped, lower-case) and non-empty rows, padded to the header's width; 'utf-8-sig' drops a BOM."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [row for row in csv.reader(f) if any(cell.strip() for cell in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"cannot read CSV {path}: {err}. Fix: save it as UTF-8 comma-separated text") from err
    if not rows:
        raise DataError(f"CSV {path} is empty. Fix: add a header row (path,label) and one row per image")
    header = [h.strip().lower() for h in rows[0]]
    if len(header) == 1 and any(sep in header[0] for sep in ";\t|"):
        sep = next(sep for sep in ";\t|" if sep in header[0])
        raise DataError(
            f"CSV {path} is separated by {sep!r}, not by commas (its header reads {rows[0][0]!r}). Fix: save it "
            "comma-separated (path,label)"
        )
    return header, [row + [""] * (len(header) - len(row)) for row in rows[1:]]


def _require_columns(path: Path, header: list[str], expected: tuple[str, ...]) -> dict[str, int]:
    missing = [c for c in expected if c not in header]
    if missing:
        raise DataError(
            f"CSV {path} has columns {header} but needs {list(expected)} (missing {missing}). Fix: rename its header"
        )
    return {c: header.index(c) for c in expected}


def _attach_ucsd_meta(index: _Index, meta: Path) -> None:
    """Patient ids and official split from meta.csv, checked against the folders."""
    header, rows = _read_csv(meta)
    col = _require_columns(meta, header, ("image", "label", "patient_id", "official_split"))
    records = {}
    for n, row in enumerate(rows, start=2):
        path = Path(os.path.abspath(meta.parent / row[col["image"]].strip().replace("\\", "/")))
        split = _SPLIT_ALIASES.get(row[col["official_split"]].strip().lower())
        if split is None:
            raise DataError(
                f"{meta} line {n}: official_split {row[col['official_split']]!r} is not train/val/test. "
                "Fix: correct the row"
            )
        records[path] = (class_of(row[col["label"]]), row[col["patient_id"]].strip(), split)
    unlisted = [p for p in index.paths if p not in records]
    if unlisted:
        raise DataError(
            f"{len(unlisted)} images are not in {meta}, e.g. {unlisted[0]}. Fix: add rows for them, "
            "remove them, or load with layout='folders' to ignore meta.csv"
        )
    absent = sorted(set(records) - set(index.paths))
    if absent:
        raise DataError(
            f"{meta} lists {len(absent)} images that are missing, e.g. {absent[0]}. Fix: restore "
            "the files or drop their rows"
        )
    for path, label in zip(index.paths, index.labels):
        if records[path][0] != label:
            raise DataError(
                f"{meta} gives label {records[path][0]} to {path}, but its folder means {label} "
                f"({CLASS_NAMES[label]}). Fix: move the file or correct the row"
            )
    index.patient_ids = [records[p][1] for p in index.paths]
    index.official_split = [records[p][2] for p in index.paths]


def _attach_ucsd_split_files(index: _Index, split_dir: Path) -> None:
    """The official split from the upstream text files (Data-split/COVID/trainCT_COVID.txt, ...)."""
    where = {}
    for sub, cls in (("COVID", "CT_COVID"), ("NonCOVID", "CT_NonCOVID")):
        for split in SPLITS:
            txt = split_dir / sub / f"{split}{cls}.txt"
            if not txt.is_file():
                raise DataError(
                    f"missing split list {txt}. Fix: restore Data-split/ from the UCSD repository, "
                    "or load with layout='folders' to ignore it"
                )
            for name in txt.read_text(encoding="utf-8").splitlines():
                key = (cls, name.strip())
                if key[1] and where.setdefault(key, split) != split:
                    raise DataError(
                        f"{name.strip()} is listed in both {where[key]} and {split} under {split_dir}. "
                        "Fix: keep it in one split list"
                    )
    on_disk = {(p.parent.name, p.name): p for p in index.paths}
    unlisted = [p for k, p in on_disk.items() if k not in where]
    if unlisted:
        raise DataError(
            f"{len(unlisted)} images are in no split list under {split_dir}, e.g. {unlisted[0]}. Fix: "
            "add them to a list, remove them, or load with layout='folders' to ignore the split"
        )
    absent = [f"{cls}/{name}" for cls, name in where if (cls, name) not in on_disk]
    if absent:
        raise DataError(
            f"split lists under {split_dir} name {len(absent)} missing images, e.g. {absent[0]}. Fix: "
            "restore the files or delete those lines"
        )
    index.official_split = [where[(p.parent.name, p.name)] for p in index.paths]


def _find_index_csv(root: Path) -> Path:
    if root.is_file():
        if root.suffix.lower() != ".csv":
            raise DataError(
                f"{root} is a file but not a .csv index. Fix: pass a folder or a CSV with columns path,label"
            )
        return root
    csvs = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() == ".csv")
    meta = [p for p in csvs if p.name.lower() == "metainfo.csv"]  # COVID19-C's index name wins over other CSVs
    if len(csvs) != 1 and len(meta) != 1:
        found = ", ".join(p.name for p in csvs) or "none"
        raise DataError(
            f"the csv layout needs one index CSV in {root} (found: {found}). Fix: name the index "
            "MetaInfo.csv or keep only it there, or pass the CSV file itself as root"
        )
    return meta[0] if meta else csvs[0]


def _parse_label(value: str) -> int | None:
    label = class_of(value)
    if label is None:
        try:  # pandas writes integer columns with NaNs as '1.0'
            number = float(value)
        except ValueError:
            return None
        label = int(number) if number in (0.0, 1.0) else None
    return label


def _index_csv(root: Path) -> _Index:
    index_csv = _find_index_csv(root)
    header, rows = _read_csv(index_csv)
    path_col = next((c for c in ("path", "filename") if c in header), None)
    if path_col is None or "label" not in header:
        raise DataError(
            f"CSV {index_csv} has columns {header}; expected 'path,label' or 'filename,label' "
            "(case-insensitive). Fix: rename its header"
        )
    p_i, l_i = header.index(path_col), header.index("label")
    entries = {}
    for n, row in enumerate(rows, start=2):
        raw, label = row[p_i].strip(), _parse_label(row[l_i])
        if label is None:
            raise DataError(
                f"{index_csv} line {n}: label {row[l_i]!r} is not a class. Fix: use 0/1 or a class name ({_ALIAS_HELP})"
            )
        # Windows-made indexes use backslashes; paths are relative to the CSV's folder.
        path = Path(os.path.abspath(index_csv.parent / raw.replace("\\", "/")))
        if not raw or not path.is_file():
            raise DataError(
                f"{index_csv} line {n}: {raw!r} -> {path} does not exist. Fix: correct the path "
                "(relative to the CSV's folder) or remove the row"
            )
        if path in entries:
            raise DataError(f"{index_csv} line {n}: {raw!r} is listed twice. Fix: keep one row per image")
        entries[path] = label
    if not entries:
        raise DataError(f"CSV {index_csv} has no rows. Fix: add one row per image")
    paths = sorted(entries, key=str)
    return _Index("csv", paths, [entries[p] for p in paths])


def _detect_layout(root: Path) -> str:
    if root.is_file():
        return "csv"
    class_dirs = _find_class_dirs(root)
    names = sorted(d.name for d, _ in class_dirs)
    one_parent = len({d.parent for d, _ in class_dirs}) == 1
    csvs = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() == ".csv")
    if names == ["CT_COVID", "CT_NonCOVID"] and one_parent:
        return "ucsd"  # its meta.csv belongs to the layout
    if class_dirs:
        if csvs:
            # Both could label the images, and they may disagree: say which one wins and how to pick the other.
            warnings.warn(
                f"{root} holds class folders ({', '.join(sorted({d.name for d, _ in class_dirs}))}) and "
                f"CSV file(s) ({', '.join(p.name for p in csvs)}): the labels come from the folders and "
                f"the CSV is not read. To use an index CSV instead, pass the CSV itself as the root (or "
                f"layout='csv'); pass layout='folders' to silence this",
                stacklevel=4,
            )
        if names == ["COVID", "non-COVID"] and class_dirs[0][0].parent == root:
            return "kaggle"
        return "folders"
    if csvs:
        return "csv"
    raise _no_class_dirs_error(root)


_INDEXERS = {"kaggle": _index_kaggle, "ucsd": _index_ucsd, "csv": _index_csv, "folders": _index_folders}


def _nifti_axial(path: Path) -> tuple[int, int, bool]:
    """(the array axis nearest inferior-superior, its number of slices, whether it runs superior to inferior),
    from the header alone."""
    nib = _optional("nibabel", path)
    img = _open_nifti(nib, path)
    shape = tuple(int(n) for n in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) == 2:
        return 2, 1, False
    if len(shape) != 3:
        raise DataError(
            f"NIfTI {path} has shape {shape}: load_images reads one 3-D CT volume (or a 2-D slice) per "
            "file, not a time series or a stack of volumes. Fix: split it into 3-D volumes (e.g. "
            "fslsplit or nibabel) and load those"
        )
    orientation = nib.orientations.io_orientation(img.affine)
    axial = np.flatnonzero(orientation[:, 0] == 2)
    if not len(axial):
        raise DataError(
            f"NIfTI {path} has an affine without an inferior-superior axis ({img.affine.tolist()}), so "
            "its axial slices are unknown. Fix: re-export it with its orientation (e.g. dcm2niix)"
        )
    axis = int(axial[0])
    return axis, shape[axis], bool(orientation[axis, 1] < 0)


def _expand_volumes(index: _Index, slice_step: int, slice_range: tuple[int, int] | None) -> None:
    """Replaces each NIfTI volume of the index by its chosen axial slices (in place). Without patient ids the
    slices of a volume get the volume as their patient, so that splits keep it whole."""
    if not any(file_kind(p) == "nifti" for p in index.paths):
        return
    paths, labels, slices, patients, splits = [], [], [], [], []
    for i, path in enumerate(index.paths):
        chosen = [None]
        if file_kind(path) == "nifti":
            _, n, _ = _nifti_axial(path)
            start, stop = slice_range if slice_range is not None else (None, None)
            chosen = list(range(n)[start:stop:slice_step])
            if not chosen:
                raise DataError(
                    f"NIfTI {path} has {n} axial slices, and slice_range={slice_range}, "
                    f"slice_step={slice_step} choose none of them. Fix: widen slice_range (counted from "
                    "0, the most inferior slice)"
                )
        paths += [path] * len(chosen)
        labels += [index.labels[i]] * len(chosen)
        slices += chosen
        patients += [index.patient_ids[i] if index.patient_ids is not None else str(path)] * len(chosen)
        if index.official_split is not None:
            splits += [index.official_split[i]] * len(chosen)
    index.paths, index.labels, index.slices, index.patient_ids = paths, labels, slices, patients
    if index.official_split is not None:
        index.official_split = splits


def build_index(root: Path, layout: str) -> _Index:
    if layout not in LAYOUTS:
        raise DataError(f"unknown layout {layout!r}. Fix: use one of {', '.join(LAYOUTS)}")
    if not root.exists():
        raise DataError(
            f"data folder {root} does not exist. Fix: pass the folder that holds COVID/ and "
            "non-COVID/ (or CT_COVID/ and CT_NonCOVID/, or an index CSV); find_shared_data() "
            "locates ../shared/data and download_sarscov2() fetches the Kaggle set"
        )
    if root.is_file() and layout not in ("auto", "csv"):
        raise DataError(
            f"{root} is a file, but the {layout} layout needs a folder. Fix: pass its folder, or "
            "layout='csv' for an index CSV"
        )
    return _INDEXERS[_detect_layout(root) if layout == "auto" else layout](root)


# ------------------------------------------------------------------------------------------------- decoding


def _scale_integer(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float32)
    low, high = float(values.min()), float(values.max())
    if low >= 0 and high <= 65535:
        return values / 65535.0
    return (values - low) / max(high - low, 1.0)


def _scale_float(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float32)
    low, high = float(values.min()), float(values.max())
    if low >= 0 and high <= 1:
        return values
    return (values - low) / (high - low) if high > low else np.zeros_like(values)


def _nonfinite(values: np.ndarray) -> str | None:
    """'k NaN and m inf pixel(s), e.g. at (row r, column c), ...', or None when every value is finite."""
    bad = ~np.isfinite(values)
    if not bad.any():
        return None
    n_nan = int(np.isnan(values).sum())
    where = "; ".join(f"(row {r}, column {c})" for r, c in np.argwhere(bad)[:3, -2:])
    return f"{n_nan} NaN and {int(bad.sum()) - n_nan} inf pixel(s), e.g. at {where}"


def _refuse_nonfinite(values: np.ndarray, what: str) -> None:
    report = _nonfinite(values)
    if report:
        raise DataError(
            f"{what} holds {report}: a pixel without a value has no place in [0, 1] (min-max scaling "
            "would turn the whole image black or NaN). Fix: re-export it with finite values (e.g. NaN "
            "outside the body as air), or delete it (or its CSV row)"
        )


def to_gray(img: Image.Image) -> np.ndarray:
    """One float32 grayscale channel in [0, 1] from a PIL image of any mode (policy in the module docstring).

    Raises:
        DataError: A float image with NaN or inf pixels (count and positions in the message).
    """
    if img.mode.startswith("I"):
        # PIL's own convert('L') clips 16-bit values at 255 instead of scaling them.
        return _scale_integer(np.asarray(img))
    if img.mode == "F":
        values = np.asarray(img)
        _refuse_nonfinite(values, "the float image")
        return _scale_float(values)
    if img.mode in ("1", "L"):
        return np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    # P (with or without transparency), LA, RGB, RGBA, CMYK, YCbCr, ...: PIL knows how to reach RGBA.
    rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
    return (rgba[..., :3] @ _LUMA) * rgba[..., 3]


def window_hu(hu: np.ndarray, window: tuple[float, float] = LUNG_WINDOW) -> np.ndarray:
    """Hounsfield units to [0, 1] by a window (width W, level L): ``(HU - (L - W/2)) / W``, clipped.

    With the default lung window (W 1500, L -600) -1350 HU maps to 0, -600 HU to 0.5 and +150 HU to 1.
    """
    width, level = _check_window(window)
    return np.clip((np.asarray(hu, dtype=np.float64) - (level - width / 2)) / width, 0.0, 1.0).astype(np.float32)


def _check_window(window) -> tuple[float, float]:
    try:
        width, level = (float(v) for v in window)
    except (TypeError, ValueError):
        raise ValueError(f"window takes (width, level) in HU, e.g. (1500, -600), got {window!r}") from None
    if not (np.isfinite(width) and np.isfinite(level) and width > 0):
        raise ValueError(f"window takes a finite width > 0 and a finite level in HU, got {window!r}")
    return width, level


def _optional(module: str, path) -> object:
    """Imports pydicom or nibabel, or says how to install them (naming the file that needs them)."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise DataError(
            f"reading {path} needs {module}, which is not installed. Fix: pip install "
            f"'robustmed-lite[dicom]' (pydicom and nibabel), or remove the file"
        ) from err


def read_dicom(path: str | os.PathLike, window: tuple[float, float] = LUNG_WINDOW) -> np.ndarray:
    """One DICOM slice as float32 (H, W) in [0, 1]: stored values to HU (rescale slope and intercept), the HU
    window, MONOCHROME1 inverted (policy in the module docstring).

    Raises:
        DataError: Not a DICOM file, no pixel data, several frames, colour, a compressed transfer syntax without
            a decoder, or non-finite values; the message names the file and the fix.
    """
    pydicom = _optional("pydicom", path)
    try:
        ds = pydicom.dcmread(path)
    except Exception as err:  # noqa: BLE001 - pydicom raises InvalidDicomError, EOFError, struct errors, ...
        raise DataError(
            f"cannot read DICOM {path}: {type(err).__name__}: {err}. Fix: re-export it from the "
            "scanner or PACS as a DICOM Part 10 file, or delete it"
        ) from err
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        kind = ds.get("SOPClassUID", None)
        kind = getattr(kind, "name", kind) or "unknown SOP class"
        raise DataError(
            f"DICOM {path} holds no pixel data ({kind}, modality {ds.get('Modality', '?')}): it is not "
            "an image but e.g. a report, a DICOMDIR or a presentation state. Fix: remove it from the "
            "class folder"
        )
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DataError(
            f"DICOM {path} is a multi-frame file ({frames} frames); load_images reads one slice per "
            "file. Fix: split it into single-frame files (e.g. pydicom or dcmtk), or convert the "
            "series to NIfTI (dcm2niix) and load that"
        )
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1:
        raise DataError(
            f"DICOM {path} has {samples} samples per pixel ({ds.get('PhotometricInterpretation')}): a "
            "CT slice has one. Fix: export the original grey CT image, not a rendered screenshot"
        )
    try:
        stored = ds.pixel_array
    except Exception as err:  # noqa: BLE001 - pydicom's decoders raise RuntimeError, NotImplementedError, ...
        syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
        if syntax is not None and syntax.is_compressed:
            raise DataError(
                f"DICOM {path} is compressed ({syntax.name}) and no installed decoder reads it "
                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Fix: pip "
                "install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg (or python-gdcm), or "
                "decompress the files first (gdcmconv --raw, dcmdjpeg)"
            ) from err
        raise DataError(
            f"cannot decode the pixel data of DICOM {path}: {type(err).__name__}: {err}. Fix: re-export the file"
        ) from err
    slope = ds.get("RescaleSlope", None)
    intercept = ds.get("RescaleIntercept", None)
    hu = np.asarray(stored, dtype=np.float64) * (1.0 if slope is None else float(slope)) + (
        0.0 if intercept is None else float(intercept)
    )
    _refuse_nonfinite(hu, f"DICOM {path}")
    gray = window_hu(hu, window)
    if str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip() == "MONOCHROME1":
        gray = 1.0 - gray
    return gray


def _open_nifti(nib, path: Path):
    try:
        return nib.load(str(path))
    except Exception as err:  # noqa: BLE001 - nibabel raises ImageFileError, EOFError, zlib errors, ...
        raise DataError(
            f"cannot read NIfTI {path}: {type(err).__name__}: {err}. Fix: re-export or re-download it, or delete it"
        ) from err


def read_nifti_slices(path: str | os.PathLike, slices, window: tuple[float, float] = LUNG_WINDOW) -> list[np.ndarray]:
    """Axial slices of a NIfTI volume as float32 (H, W) arrays in [0, 1], each read once from one pass over the
    file: values in HU (the header's scl_slope / scl_inter applied), the HU window, the radiological view (module
    docstring).

    Args:
        path: A ``.nii`` or ``.nii.gz`` file.
        slices: Axial indices, 0 = the most inferior slice.
        window: (width, level) in HU.

    Raises:
        DataError: An unreadable file, a 4-D volume, a slice outside it, or non-finite values.
    """
    path = Path(path)
    nib = _optional("nibabel", path)
    axis, n, flipped = _nifti_axial(path)
    img = _open_nifti(nib, path)
    try:
        proxy = img.dataobj
        raw = np.asanyarray(proxy.get_unscaled() if hasattr(proxy, "get_unscaled") else proxy)
    except Exception as err:  # noqa: BLE001 - a truncated .nii.gz fails only here
        raise DataError(
            f"cannot read the voxels of NIfTI {path}: {type(err).__name__}: {err}. Fix: re-export or re-download it"
        ) from err
    # Scaled per slice rather than as a whole: a float64 copy of a 600-slice volume would take gigabytes.
    slope, inter = getattr(proxy, "slope", 1.0), getattr(proxy, "inter", 0.0)
    slope = float(slope) if slope is not None and np.isfinite(slope) else 1.0
    inter = float(inter) if inter is not None and np.isfinite(inter) else 0.0
    if raw.ndim == 4:
        raw = raw[..., 0]
    if raw.ndim == 2:
        raw = raw[:, :, None]
    orientation = nib.orientations.io_orientation(img.affine)
    out = []
    for z in slices:
        if not 0 <= z < n:
            raise DataError(f"NIfTI {path} has {n} axial slices; slice {z} does not exist")
        k = n - 1 - z if flipped else z
        plane = np.take(raw, [k], axis=axis).astype(np.float64) * slope + inter
        # Into RAS+ (array axes x to the patient's right, y anterior, z superior), then rows anterior ->
        # posterior and columns right -> left: the way a radiologist (and every PNG export) shows an axial slice.
        plane = nib.orientations.apply_orientation(plane, orientation)[:, :, 0]
        hu = plane.T[::-1, ::-1]
        _refuse_nonfinite(hu, f"NIfTI {path} slice {z}")
        out.append(window_hu(hu, window))
    return out


def read_gray(path: str | os.PathLike, window: tuple[float, float] = LUNG_WINDOW) -> np.ndarray:
    """Decodes one image file (Pillow formats or a DICOM slice) to a float32 (H, W) array in [0, 1].

    Args:
        path: The file.
        window: (width, level) in HU for DICOM.

    Raises:
        DataError: The file cannot be decoded or holds non-finite values; the message names it.
    """
    if file_kind(path) == "nifti":
        raise DataError(f"{path} is a NIfTI volume, not one slice. Fix: read it with read_nifti_slices or load_images")
    if file_kind(path) == "dicom" or (file_kind(path) is None and _has_dicom_preamble(Path(path))):
        return read_dicom(path, window)
    try:
        with Image.open(path) as img:
            return to_gray(ImageOps.exif_transpose(img))  # a camera or phone JPEG may be stored turned
    except DataError as err:
        raise DataError(f"image {path}: {err}") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataError(
            f"cannot decode image {path}: {err}. Fix: re-download or re-export the file, or delete it (or its CSV row)"
        ) from err


def _resize(gray: np.ndarray, size: int) -> np.ndarray:
    if gray.shape == (size, size):
        return gray
    resized = Image.fromarray(np.ascontiguousarray(gray, dtype=np.float32)).resize(
        (size, size), Image.Resampling.BILINEAR
    )
    return np.clip(np.asarray(resized), 0.0, 1.0)


def _decode(path: Path, size: int, window=LUNG_WINDOW) -> tuple[np.ndarray, tuple[int, int]]:
    """One 2-D file, resized, with its original shape."""
    gray = read_gray(path, window)
    return _resize(gray, size), gray.shape


def _decode_job(job: tuple[Path, list[int | None]], size: int, window) -> list[tuple[np.ndarray, tuple[int, int]]]:
    """A file's resized slices with their original shapes: one for a 2-D file, the chosen ones of a volume."""
    path, slices = job
    if slices == [None]:
        return [_decode(path, size, window)]
    return [(_resize(g, size), g.shape) for g in read_nifti_slices(path, slices, window)]


def _decode_all(index: _Index, size: int, window, progress: bool) -> tuple[torch.Tensor, list[list]]:
    """Decodes in a thread pool (Pillow releases the GIL while decoding and resampling); a volume is one task.

    Returns:
        The images, and ``[name, height, width]`` of each image smaller than ``MIN_SIDE`` on a side.
    """
    # Filled with NumPy: a torch copy per image wakes torch's intra-op threads and can cost milliseconds each.
    images = np.empty((len(index.paths), 1, size, size), dtype=np.float32)
    names = index.names()
    slices = index.slices or [None] * len(index.paths)
    jobs, starts = [], []
    for i, (path, z) in enumerate(zip(index.paths, slices)):
        if z is not None and jobs and jobs[-1][0] == path and jobs[-1][1][0] is not None:
            jobs[-1][1].append(z)  # the slices of one volume are adjacent in the sorted index
        else:
            jobs.append((path, [z]))
            starts.append(i)
    workers = min(8, 2 * (os.cpu_count() or 1))
    tiny = []
    bar = tqdm(total=len(index.paths), desc=f"decoding {size}px", unit="img", **progress_options(progress))
    with ThreadPoolExecutor(workers) as pool:
        try:
            for start, decoded in zip(starts, pool.map(_decode_job, jobs, [size] * len(jobs), [window] * len(jobs))):
                for offset, (gray, shape) in enumerate(decoded):
                    images[start + offset, 0] = gray
                    if min(shape) < MIN_SIDE or max(shape) > MAX_ASPECT * min(shape):
                        tiny.append([names[start + offset], int(shape[0]), int(shape[1])])
                bar.update(len(decoded))
        except BaseException:
            # Without this a corrupt file would wait for every queued decode before it is reported.
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        finally:
            bar.close()
    return torch.from_numpy(images), tiny


def _warn_tiny(odd: list[list], size: int) -> None:
    """Warns of images too small to hold anatomy, and of elongated ones that resizing squashes to a square."""
    kinds = (
        (
            [entry for entry in odd if min(entry[1:]) >= MIN_SIDE],
            f"with sides more than {MAX_ASPECT}:1 apart were squashed to {size}x{size}",
            "crop them to the slice (a CT slice is about square) or delete them",
        ),
        (
            [entry for entry in odd if min(entry[1:]) < MIN_SIDE],
            f"smaller than {MIN_SIDE} px on a side were enlarged to {size}x{size} and hold no anatomy",
            "replace them with the real slices or delete them",
        ),
    )
    for entries, what, fix in kinds:
        if entries:
            shown = ", ".join(f"{name} ({h}x{w})" for name, h, w in entries[:5])
            more = ", ..." if len(entries) > 5 else ""
            warnings.warn(f"{len(entries)} image(s) {what}: {shown}{more}. Fix: {fix}", stacklevel=3)


# ---------------------------------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    """``ROBUSTMED_CACHE`` if set, else ``~/.cache/robustmed_lite``."""
    return Path(os.environ.get("ROBUSTMED_CACHE") or Path.home() / ".cache" / "robustmed_lite").expanduser()


def _cache_key(index: _Index, size: int, window) -> str:
    files, stats = [], {}
    for path, name in zip(index.paths, index.names()):
        if path not in stats:
            stat = path.stat()
            stats[path] = (stat.st_size, stat.st_mtime_ns)
        files.append([name, *stats[path]])
    record = {"layout": index.layout, "size": size, "version": LOADER_VERSION, "files": files}
    if any(file_kind(p) != "image" for p in stats):  # the window changes DICOM and NIfTI pixels only
        record["window"] = list(_check_window(window))
    return hashlib.sha256(json.dumps(record).encode()).hexdigest()


def _read_cache(file: Path, key: str, paths: list[str]) -> tuple[dict | None, bool]:
    """The cached payload, and whether ``file`` may be written (it must not exist: never clobber a stranger)."""
    if not file.exists():
        return None, True
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable file: reported, left alone, and the images decoded afresh
        warnings.warn(f"ignoring unreadable cache file {file} ({err}); delete it to cache again", stacklevel=3)
        return None, False
    if not (
        isinstance(payload, dict)
        and payload.get("format") == _CACHE_FORMAT
        and payload.get("key") == key
        and payload.get("paths") == paths
    ):
        warnings.warn(f"{file} is not this data's cache; leaving it alone and decoding afresh", stacklevel=3)
        return None, False
    return payload, False


def _write_cache(file: Path, key: str, paths: list[str], images: torch.Tensor, tiny: list[list]) -> None:
    """Writes to a temporary file and renames it, so a crash never leaves half a cache behind."""
    tmp = None
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=file.stem + "-", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": _CACHE_FORMAT, "key": key, "paths": paths, "images": images, "tiny": tiny}, f)
        if file.exists():  # written meanwhile by someone else: keep theirs
            return
        os.replace(tmp, file)
        tmp = None
    except (OSError, RuntimeError) as err:  # RuntimeError: torch's writer on a full disk; costs speed, not data
        warnings.warn(f"could not write cache {file} ({err}); images were loaded but not cached", stacklevel=3)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


# ----------------------------------------------------------------------------------------------- public API


def load_images(
    root: str | os.PathLike,
    size: int,
    *,
    layout: str = "auto",
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    window: tuple[float, float] = LUNG_WINDOW,
    slice_step: int = 1,
    slice_range: tuple[int, int] | None = None,
) -> ImageSet:
    """Loads a lung-CT slice collection (2-D images, DICOM slices, NIfTI volumes) as one-channel tensors.

    Files without an image extension inside class folders are skipped and reported in one ``UserWarning``, and
    so are images smaller than ``MIN_SIDE`` px (policy in the module docstring).

    Args:
        root: Folder of the data set, or an index CSV.
        size: Output side in pixels; every image becomes ``size x size``.
        layout: One of ``LAYOUTS``; ``"auto"`` detects it (UCSD folders, then Kaggle, then any class folders,
            then a single index CSV).
        cache: Reuse and store decoded tensors, keyed by layout, files (with sizes and mtimes), size, window and
            ``LOADER_VERSION``; an entry takes 4 bytes a pixel (475 MiB for the Soares set at 224 px).
        cache_dir: Where the cache lives; default ``default_cache_dir()``.
        progress: Show a progress bar while decoding.
        window: (width, level) in HU that maps DICOM and NIfTI values to [0, 1]; default the lung window.
        slice_step: NIfTI: every k-th axial slice.
        slice_range: NIfTI: ``(start, stop)`` axial slices, counted from 0 = the most inferior, stop excluded
            (Python slicing); None: all.

    Returns:
        An ImageSet in sorted path order (a volume's slices inferior to superior).

    Raises:
        DataError: A missing folder, an empty class folder, an unreadable image, non-finite pixels, a bad CSV or
            split list, or an unknown layout; the message names the file and the fix.
        ValueError: A bad ``size``, ``window``, ``slice_step`` or ``slice_range``.
    """
    if isinstance(size, bool) or int(size) != size or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    size = int(size)
    _check_window(window)
    if isinstance(slice_step, bool) or int(slice_step) != slice_step or slice_step < 1:
        raise ValueError(f"slice_step takes an integer >= 1 (every k-th slice), got {slice_step!r}")
    if slice_range is not None and (len(slice_range) != 2 or any(int(v) != v for v in slice_range)):
        raise ValueError(f"slice_range takes (start, stop) axial slice indices, got {slice_range!r}")
    root = Path(root).expanduser()
    check_link(root, ROOT_LINK_TARGET)
    root = root.resolve()
    index = build_index(root, layout)
    if index.non_images:
        names = ", ".join(p.name for p in index.non_images[:3])
        warnings.warn(
            f"ignored {len(index.non_images)} non-image file(s) in the class folders under {root}, e.g. "
            f"{names} (image extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})",
            stacklevel=2,
        )
    _expand_volumes(index, int(slice_step), None if slice_range is None else tuple(int(v) for v in slice_range))
    paths = index.names()
    payload, file, writable = None, None, False
    if cache:
        key = _cache_key(index, size, window)
        file = Path(cache_dir or default_cache_dir()).expanduser() / f"{index.layout}-{size}px-{key[:20]}.pt"
        payload, writable = _read_cache(file, key, paths)
    if payload is not None:
        images, tiny = payload["images"], payload.get("tiny", [])
    else:
        images, tiny = _decode_all(index, size, window, progress)
        if writable:
            _write_cache(file, key, paths, images, tiny)
    _warn_tiny(tiny, size)
    return ImageSet(
        images,
        torch.tensor(index.labels, dtype=torch.int64),
        paths,
        index.patient_ids,
        index.official_split,
        index.layout,
        root,
    )


def load_covid19c(root: str | os.PathLike, size: int, **kwargs) -> dict[str, ImageSet]:
    """Loads a COVID19-C-style benchmark: one subfolder per national subset (e.g. ``COV_C``, ``COV_I``,
    ``COV_M``, ``COV_R``), each holding one index CSV (``MetaInfo.csv``: ``path,label`` relative to that
    subfolder, Windows backslashes allowed) and its images.

    Args:
        root: The folder holding the subset folders.
        size: Output side in pixels.
        **kwargs: Passed to ``load_images`` (cache, cache_dir, progress, window, ...).

    Returns:
        Subset name -> ImageSet, in name order.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(
            f"COVID19-C folder {root} does not exist. Fix: point root at the folder that holds the "
            "subset folders (COV_C/, COV_I/, ...)"
        )
    subsets = sorted(
        d for d in _visible_dirs(root) if any(p.suffix.lower() == ".csv" for p in d.iterdir() if p.is_file())
    )
    if not subsets:
        found = ", ".join(d.name for d in _visible_dirs(root)) or "no folders"
        raise DataError(
            f"no subset folder with an index CSV under {root} (found: {found}). Fix: each subset "
            "folder needs a CSV such as MetaInfo.csv with columns path,label"
        )
    return {d.name: load_images(d, size, layout="csv", **kwargs) for d in subsets}


def _split_counts(n: int, fractions: tuple[float, float, float]) -> np.ndarray:
    val, test = (int(np.floor(f * n + 0.5)) for f in fractions[1:])
    return np.array([n - val - test, val, test])


def _stratified_assign(labels: np.ndarray, fractions, rng: np.random.Generator) -> np.ndarray:
    assign = np.empty(len(labels), dtype=np.int64)
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        assign[members] = np.repeat(np.arange(3), _split_counts(len(members), fractions))
    return assign


def _grouped_assign(labels: np.ndarray, groups, fractions, rng: np.random.Generator) -> np.ndarray:
    """Whole groups, biggest first, each to the split whose per-class quota it fills best."""
    _, group_of = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
    _, class_of_item = np.unique(labels, return_inverse=True)
    counts = np.zeros((group_of.max() + 1, class_of_item.max() + 1))
    np.add.at(counts, (group_of, class_of_item), 1)
    target = np.asarray(fractions)[:, None] * counts.sum(0)[None, :]
    filled = np.zeros_like(target)
    order = rng.permutation(len(counts))
    order = order[np.argsort(-counts[order].sum(1), kind="stable")]  # random among equal sizes
    split_of_group = np.empty(len(counts), dtype=np.int64)
    for g in order:
        score = (target - filled) @ counts[g]
        score[np.asarray(fractions) == 0] = -np.inf
        split_of_group[g] = int(np.argmax(score))
        filled[split_of_group[g]] += counts[g]
    return split_of_group[group_of]


def split_indices(
    labels, *, val: float = 0.15, test: float = 0.15, seed: int = 0, groups=None
) -> dict[str, np.ndarray]:
    """Stratified train / val / test indices, patient-grouped when ``groups`` is given.

    Args:
        labels: One label per item (array, list or tensor).
        val: Validation fraction, > 0: every experiment selects checkpoints on a validation split.
        test: Test fraction, >= 0; 0 gives an empty test split (e.g. when the test set is another site).
        seed: Seed; the same seed gives the same split.
        groups: Optional group (patient) per item; no group is spread over two splits, and the class mix of
            each split is only approximately stratified.

    Returns:
        ``{"train", "val", "test"}`` -> sorted int64 index arrays, disjoint and covering every item.

    Raises:
        ValueError: Fractions out of range.
        DataError: A split would be empty (too few items or groups).
    """
    labels = np.asarray(labels).reshape(-1)
    if not (0 < val < 1 and 0 <= test < 1 and val + test < 1):
        raise ValueError(f"need 0 < val, 0 <= test and val + test < 1; got val={val}, test={test}")
    if groups is not None and len(groups) != len(labels):
        raise ValueError(f"groups has {len(groups)} entries for {len(labels)} labels")
    fractions = (1.0 - val - test, val, test)
    rng = np.random.default_rng(seed)
    if groups is None:
        assign = _stratified_assign(labels, fractions, rng)
    else:
        assign = _grouped_assign(labels, groups, fractions, rng)
    parts = {name: np.flatnonzero(assign == k) for k, name in enumerate(SPLITS)}
    for name, fraction in zip(SPLITS, fractions):
        if fraction > 0 and len(parts[name]) == 0:
            unit = "groups" if groups is not None else "items"
            raise DataError(
                f"the {name} split would be empty ({len(labels)} items, val={val}, test={test}). "
                f"Fix: use more {unit} or a larger {name} fraction"
            )
    return parts


def stratified_subset(labels, n: int | None, seed: int = 0) -> np.ndarray:
    """A seeded sample of ``n`` indices with the classes in proportion (largest remainders), sorted.

    Use it wherever cost forces a subset: the first n images of a folder layout are all of one class.

    Args:
        labels: One label per item.
        n: Size of the sample; None or ``n >= len(labels)`` gives every index.
        seed: Seed; the same seed gives the same sample.

    Raises:
        ValueError: ``n < 1``.
    """
    labels = np.asarray(labels).reshape(-1)
    if n is None or n >= len(labels):
        return np.arange(len(labels))
    if int(n) != n or n < 1:
        raise ValueError(f"a subset needs n >= 1 images, got {n!r}")
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * n / len(labels)
    take = np.floor(quota).astype(np.int64)
    remainder_order = np.argsort(-(quota - take), kind="stable")
    take[remainder_order[: n - take.sum()]] += 1
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(labels == c), size=k, replace=False) for c, k in zip(classes, take)]
    return np.sort(np.concatenate(chosen))


def official_splits(imageset: ImageSet) -> dict[str, np.ndarray]:
    """The split the data set itself records (UCSD's official one, or train/val/test parent folders).

    Returns:
        ``{"train", "val", "test"}`` -> sorted index arrays; a part the data set lacks is empty.

    Raises:
        DataError: The set records no split.
    """
    if imageset.official_split is None:
        raise DataError(
            f"the {imageset.layout} data at {imageset.root} records no official split. Fix: use "
            "ImageSet.splits() or split_indices()"
        )
    split = np.asarray(imageset.official_split)
    return {name: np.flatnonzero(split == name) for name in SPLITS}


def choose_splits(
    labels: np.ndarray,
    official_split: list[str] | None,
    patient_ids: list | None,
    *,
    val: float = 0.15,
    test: float = 0.15,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Train / val / test indices as ``ImageSet.splits`` describes them, from labels and what the set records.

    Args:
        labels: One label per slice.
        official_split: 'train' / 'val' / 'test' per slice, or None where the set records no split.
        patient_ids: One id per slice, or None.
        val: Validation fraction (of the training part where a split is recorded without one).
        test: Test fraction when no split is recorded.
        seed: Seed of the random parts.
    """
    if official_split is None:
        return split_indices(labels, val=val, test=test, seed=seed, groups=patient_ids)
    recorded = np.asarray(official_split)
    parts = {name: np.flatnonzero(recorded == name) for name in SPLITS}
    if len(parts["val"]) == 0:
        train = parts["train"]
        groups = None if patient_ids is None else [patient_ids[i] for i in train]
        inner = split_indices(labels[train], val=val, test=0.0, seed=seed, groups=groups)
        parts["train"], parts["val"] = train[inner["train"]], train[inner["val"]]
    return parts


# ------------------------------------------------------------------------------------------------- download


def _find_kaggle_root(dest: Path) -> Path | None:
    for folder in (dest, *(_visible_dirs(dest) if dest.is_dir() else [])):
        if (folder / "COVID").is_dir() and (folder / "non-COVID").is_dir():
            return folder
    return None


def _kaggle_credentials_present() -> bool:
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return True
    if os.environ.get("KAGGLE_API_TOKEN"):
        return True
    config = Path(os.environ.get("KAGGLE_CONFIG_DIR") or Path.home() / ".kaggle").expanduser()
    return (config / "kaggle.json").is_file()


_MANUAL_HELP = (
    f"To get the data by hand, download the zip from {KAGGLE_URL} on a machine with internet, unzip it "
    "so that COVID/ and non-COVID/ sit in one folder, and pass that folder to load_images"
)


def download_sarscov2(dest: str | os.PathLike) -> Path:
    """Downloads the SARS-CoV-2 CT-scan set from Kaggle (for Colab users); a no-op if it is already there.

    Needs the optional ``kaggle`` package (``pip install 'robustmed-lite[kaggle]'``) and Kaggle credentials:
    ``~/.kaggle/kaggle.json`` or ``KAGGLE_USERNAME`` and ``KAGGLE_KEY``.

    Args:
        dest: Folder to download and unzip into.

    Returns:
        The folder holding ``COVID/`` and ``non-COVID/``, ready for ``load_images``.

    Raises:
        DownloadError: Missing credentials or package, no network, or a refused download; the message says
            what to do.
    """
    dest = Path(dest).expanduser()
    found = _find_kaggle_root(dest)
    if found is not None:
        return found
    # Checked before importing kaggle, which authenticates on import and fails with a less helpful message.
    if not _kaggle_credentials_present():
        raise DownloadError(
            "no Kaggle credentials: create an API token at https://www.kaggle.com/settings (API > Create New "
            "Token), save kaggle.json as ~/.kaggle/kaggle.json (chmod 600; on Colab upload it there), or set "
            f"KAGGLE_USERNAME and KAGGLE_KEY. {_MANUAL_HELP}"
        )
    try:
        import kaggle
    except ImportError as err:
        raise DownloadError(
            "the kaggle package is missing: pip install 'robustmed-lite[kaggle]' (or pip install "
            f"kaggle). {_MANUAL_HELP}"
        ) from err
    except Exception as err:  # kaggle raises plain errors when authenticating on import
        raise DownloadError(
            f"Kaggle rejected the credentials ({err}): create a fresh API token. {_MANUAL_HELP}"
        ) from err
    dest.mkdir(parents=True, exist_ok=True)
    try:
        kaggle.api.dataset_download_files(KAGGLE_DATASET, path=str(dest), unzip=True, quiet=False)
    except OSError as err:  # requests' connection errors are OSErrors too
        raise DownloadError(
            f"could not reach Kaggle ({err}): you seem to be offline or behind a firewall. {_MANUAL_HELP}"
        ) from err
    except Exception as err:
        raise DownloadError(
            f"Kaggle refused the download of {KAGGLE_DATASET} ({err}): check the credentials and "
            f"accept the data set's terms on {KAGGLE_URL}. {_MANUAL_HELP}"
        ) from err
    found = _find_kaggle_root(dest)
    if found is None:
        raise DownloadError(f"the download to {dest} holds no COVID/ and non-COVID/ folders. {_MANUAL_HELP}")
    return found
