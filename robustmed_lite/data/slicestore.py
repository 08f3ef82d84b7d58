"""Slices larger than memory: an on-disk uint8 store, written once and read by index.

``load_images`` decodes a whole data set into one float32 tensor: 4 bytes a pixel, 475 MiB for the 2,481 Soares
slices at 224 px but tens of GB for the large public sets. A slice store keeps each pixel in one byte on disk and
hands out float32 batches on demand, so a training process holds only the batch it works on (plus whatever pages
the operating system keeps cached, which every process reading the store shares).

Layout of a store folder::

    slices.npy   uint8 array (N, 1, S, S), NumPy's .npy format, opened with ``mmap_mode="r"``
    index.json   format, size, count, labels, paths, split / patient ids / sites where known, provenance

Pixels are ``round(255 x)`` of the decoded [0, 1] value and are read back as ``u / 255`` (``dequantize``). That is
exact for 8-bit PNG or JPEG slices kept at their own size; after resizing, or windowing DICOM and NIfTI Hounsfield
units, it rounds each pixel to the nearest 1/255 (an error of at most 1/510, half the smallest attack budget this
package uses). Reading a store by index and loading it whole into memory (``SliceStore.load``) give the same
tensors bit for bit, which is what makes the two interchangeable for training.

A store is written into ``<out>.partial`` and renamed when complete. An interrupted write resumes where it stopped
(the chunks already flushed are kept) when it is started again with the same arguments; an existing store is
never overwritten.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..runinfo import environment_info, progress_options
from .loaders import (
    LUNG_WINDOW,
    DataError,
    _cache_key,
    _check_window,
    _decode_all,
    _expand_volumes,
    _warn_tiny,
    build_index,
    choose_splits,
)

FORMAT = "robustmed_lite.slicestore/1"
IMAGES_FILE, INDEX_FILE, PROGRESS_FILE = "slices.npy", "index.json", "progress.json"


def quantize(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """[0, 1] values to uint8: ``round(255 x)``."""
    values = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return np.rint(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)


def dequantize(u: np.ndarray) -> torch.Tensor:
    """uint8 pixels to float32 in [0, 1]: ``u / 255`` (the one conversion every read uses)."""
    return torch.from_numpy(np.ascontiguousarray(u)).to(torch.float32).div_(255.0)


def is_slice_store(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding a complete slice store."""
    return (Path(path).expanduser() / INDEX_FILE).is_file() and (Path(path).expanduser() / IMAGES_FILE).is_file()


class SliceStore:
    """A complete slice store, opened read-only.

    Attributes:
        root: The store folder.
        size: Side of every slice in pixels.
        labels: int64 tensor (N,), 0 = non-COVID, 1 = COVID.
        paths: One name per slice (the source file, or ``phantom:<site>:seed<k>#<i>``).
        official_split: 'train' / 'val' / 'test' per slice where the source records one, else None.
        patient_ids: One id per slice where known, else None.
        info: The whole ``index.json``.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        index_file = self.root / INDEX_FILE
        if not self.root.is_dir():
            raise DataError(
                f"slice store {self.root} does not exist. Fix: write it first with `python -m "
                "robustmed_lite data store --data DIR|phantom --size S --out DIR`"
            )
        if not is_slice_store(self.root):
            partial = (
                " (an unfinished write: run the same `data store` command again to finish it)"
                if (self.root / PROGRESS_FILE).exists()
                else ""
            )
            raise DataError(f"{self.root} is not a slice store: it needs {IMAGES_FILE} and {INDEX_FILE}{partial}")
        try:
            self.info = json.loads(index_file.read_text())
        except (OSError, ValueError) as err:
            raise DataError(f"cannot read {index_file} ({err}). Fix: write the store again") from err
        if self.info.get("format") != FORMAT:
            raise DataError(
                f"{index_file} has format {self.info.get('format')!r}, this version reads {FORMAT!r}. "
                "Fix: write the store again with this version"
            )
        self.size, count = int(self.info["size"]), int(self.info["count"])
        self.labels = torch.tensor(self.info["labels"], dtype=torch.int64)
        self.paths = list(self.info["paths"])
        self.official_split = self.info.get("official_split")
        self.patient_ids = self.info.get("patient_ids")
        self._array = None
        shape = tuple(self.array.shape)
        if shape != (count, 1, self.size, self.size) or self.array.dtype != np.uint8 or len(self.labels) != count:
            raise DataError(
                f"{self.root / IMAGES_FILE} holds {self.array.dtype} {shape}, but {INDEX_FILE} says "
                f"{count} uint8 slices of {self.size} px. Fix: write the store again"
            )

    @property
    def array(self) -> np.memmap:
        """The uint8 slices, memory-mapped read-only (opened on first use in each process)."""
        if self._array is None:
            self._array = np.load(self.root / IMAGES_FILE, mmap_mode="r")
        return self._array

    @property
    def megabytes_on_disk(self) -> float:
        """Size of the pixel file in MiB."""
        return (self.root / IMAGES_FILE).stat().st_size / 2**20

    def __getstate__(self) -> dict:
        # A DataLoader worker or another rank reopens the file instead of receiving a copy of the pixels.
        return {**self.__dict__, "_array": None}

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, indices) -> torch.Tensor:
        """float32 slices (len(indices), 1, S, S) in [0, 1], read from disk in ``indices``' order."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"slice index out of range for a store of {len(self)} slices")
        order = np.argsort(idx, kind="stable")  # ascending reads: the disk and the page cache prefer them
        out = np.empty((len(idx), 1, self.size, self.size), dtype=np.uint8)
        out[order] = self.array[idx[order]]
        # Unmap the pages just read: they stay in the operating system's file cache (shared by every process
        # reading the store), but no longer count as this process's resident memory, which would otherwise grow to
        # the whole file over an epoch.
        if getattr(self.array, "_mmap", None) is not None:  # None for an empty store
            self.array._mmap.madvise(mmap.MADV_DONTNEED)
        return dequantize(out)

    def load(self, indices=None) -> torch.Tensor:
        """The in-memory path: the chosen slices (default all) as one float32 tensor."""
        return self.read(np.arange(len(self)) if indices is None else indices)

    def view(self, indices=None) -> StoredImages:
        """The chosen slices (default all), read on demand: a stand-in for an images tensor."""
        return StoredImages(self, np.arange(len(self)) if indices is None else indices)

    def splits(self, *, val: float = 0.15, test: float = 0.15, seed: int = 0) -> dict[str, np.ndarray]:
        """Train / val / test indices as ``ImageSet.splits`` chooses them: the recorded split, else patient-grouped,
        else stratified."""
        return choose_splits(self.labels.numpy(), self.official_split, self.patient_ids, val=val, test=test, seed=seed)


class StoredImages:
    """Some slices of a store, indexed like an (N, 1, S, S) float32 tensor; each access reads from disk.

    ``PriorDataset`` takes it in place of an images tensor and then computes the prior view per batch.
    """

    def __init__(self, store: SliceStore, indices):
        self.store = store
        self.indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        self.shape = torch.Size((len(self.indices), 1, store.size, store.size))
        self.dtype = torch.float32

    def __len__(self) -> int:
        return len(self.indices)

    def dim(self) -> int:
        return 4

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, torch.Tensor):
            index = index.numpy()
        picked = self.indices[index]
        return self.store.read(picked) if np.ndim(picked) else self.store.read([picked])[0]


# ------------------------------------------------------------------------------------------------- writing


def _check_count(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or int(value) != value or value < minimum:
        raise ValueError(f"{name} takes an integer >= {minimum}, got {value!r}")
    return int(value)


def _write(
    out: Path, plan: dict, count: int, size: int, chunks: Callable[[int], Iterator[tuple]], progress: bool
) -> SliceStore:
    """Writes ``count`` slices chunk by chunk into ``<out>.partial``, resuming a matching partial write.

    ``chunks(start)`` yields ``(images (k,1,S,S) in [0,1], labels (k,), extra)`` from slice ``start`` on; ``extra``
    is a dict of per-slice lists (paths, official_split, patient_ids) or of one-off values (tiny).
    """
    out = out.expanduser().resolve()
    if out.exists():
        existing = SliceStore(out) if is_slice_store(out) else None
        if existing is not None and existing.info.get("plan") == plan:
            return existing  # written once, by this very command: reuse it
        raise DataError(
            f"{out} already exists and is not the store this command writes. Fix: choose another "
            "--out, or delete it to write it afresh"
        )
    partial = out.with_name(out.name + ".partial")
    progress_file = partial / PROGRESS_FILE
    state = json.loads(progress_file.read_text()) if progress_file.exists() else None
    if state is not None and state["plan"] != plan:
        raise DataError(
            f"{partial} is an unfinished write of another store (other data, size or counts). Fix: "
            "delete it, or run the command that started it"
        )
    if state is None:
        shutil.rmtree(partial, ignore_errors=True)  # a folder without progress holds nothing that can be kept
        partial.mkdir(parents=True)
        np.lib.format.open_memmap(
            partial / IMAGES_FILE, mode="w+", dtype=np.uint8, shape=(count, 1, size, size)
        ).flush()
        state = {"plan": plan, "done": 0, "labels": [], "extra": {}}
        progress_file.write_text(json.dumps(state))
    array = np.load(partial / IMAGES_FILE, mmap_mode="r+")
    bar = tqdm(
        total=count, initial=state["done"], desc=f"writing {out.name}", unit="slice", **progress_options(progress)
    )
    try:
        for images, labels, extra in chunks(state["done"]):
            start = state["done"]
            array[start : start + len(images)] = quantize(images)
            array.flush()  # the pixels reach the disk before the progress file says so
            state["done"] += len(images)
            state["labels"] += [int(v) for v in labels]
            for key, values in extra.items():
                state["extra"][key] = state["extra"].get(key, []) + list(values)
            tmp = progress_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(state))
            os.replace(tmp, progress_file)
            bar.update(len(images))
    finally:
        bar.close()
        del array
    if state["done"] != count:
        raise DataError(
            f"{partial}: wrote {state['done']} of {count} slices; the source changed while writing. "
            "Fix: delete the folder and write again"
        )
    index = {
        "format": FORMAT,
        "size": size,
        "count": count,
        "labels": state["labels"],
        "plan": plan,
        "environment": environment_info(),
        **{k: v for k, v in state["extra"].items()},
    }
    (partial / INDEX_FILE).write_text(json.dumps(index))
    progress_file.unlink()
    os.replace(partial, out)
    return SliceStore(out)


def write_phantom_store(
    out: str | os.PathLike,
    size: int,
    n_train: int,
    n_val: int = 256,
    n_test: int = 256,
    site: str = "A",
    chunk: int = 1024,
    progress: bool = True,
) -> SliceStore:
    """A phantom data set as a store: train, val and test parts with the data seeds 0, 1, 2 that
    ``build_data`` uses for ``data: phantom``, recorded as the store's split.

    Args:
        out: The store folder to create.
        size: Side in pixels.
        n_train: Training slices (50,000 for the larger-than-memory benchmark).
        n_val: Validation slices.
        n_test: Test slices.
        site: Phantom site.
        chunk: Slices rendered and flushed at a time (a multiple of the phantom's own chunk of 64).
        progress: Show a progress bar.
    """
    from .phantom import CHUNK, SITES, _render_chunk

    if site not in SITES:
        raise ValueError(f"unknown site {site!r}: choose one of {sorted(SITES)}")
    size, n_train = _check_count("size", size, 16), _check_count("n_train", n_train, 1)
    n_val, n_test = _check_count("n_val", n_val, 0), _check_count("n_test", n_test, 0)
    chunk = max(CHUNK, chunk // CHUNK * CHUNK)
    parts = [("train", n_train, 0), ("val", n_val, 1), ("test", n_test, 2)]
    plan = {"source": "phantom", "site": site, "size": size, "counts": [n for _, n, _ in parts]}

    def chunks(start: int):
        offset = 0
        for split, n, seed in parts:
            begin = max(start - offset, 0)  # resume: where this part stands (a multiple of CHUNK, or its end)
            for first in range(begin, n, chunk):
                stop = min(first + chunk, n)
                rendered = [
                    _render_chunk(c, size, SITES[site], seed) for c in range(first // CHUNK, math.ceil(stop / CHUNK))
                ]
                images = torch.cat([r[0] for r in rendered])[: stop - first]
                labels = torch.cat([r[1] for r in rendered])[: stop - first]
                names = [f"phantom:{site}:seed{seed}#{i}" for i in range(first, stop)]
                yield images, labels, {"paths": names, "official_split": [split] * len(names)}
            offset += n

    return _write(Path(out), plan, sum(n for _, n, _ in parts), size, chunks, progress)


def write_folder_store(
    root: str | os.PathLike,
    out: str | os.PathLike,
    size: int,
    *,
    layout: str = "auto",
    window: tuple[float, float] = LUNG_WINDOW,
    chunk: int = 1024,
    progress: bool = True,
) -> SliceStore:
    """A real data set (any layout ``load_images`` reads) as a store, decoded ``chunk`` files at a time, so that
    memory holds one chunk whatever the size of the set.

    Args:
        root: Folder of the data set, or an index CSV.
        out: The store folder to create.
        size: Side in pixels.
        layout: As in ``load_images``.
        window: (width, level) in HU for DICOM and NIfTI.
        chunk: Slices decoded and flushed at a time.
        progress: Show a progress bar.
    """
    size = _check_count("size", size, 1)
    _check_window(window)
    root = Path(root).expanduser().resolve()
    index = build_index(root, layout)
    _expand_volumes(index, 1, None)
    names = index.names()
    if not names:
        raise DataError(f"no images under {root}. Fix: point --data at the data set's folder")
    # The decode cache's key: the files with their sizes and times, the size and the window. A changed data set
    # is another store, never a reason to reuse an old one.
    plan = {
        "source": str(root),
        "layout": index.layout,
        "size": size,
        "count": len(names),
        "key": _cache_key(index, size, window),
    }

    def pick(items, start, stop):
        return None if items is None else items[start:stop]

    def chunks(start: int):
        for first in range(start, len(names), chunk):
            stop = min(first + chunk, len(names))
            part = replace(
                index,
                paths=index.paths[first:stop],
                labels=index.labels[first:stop],
                patient_ids=pick(index.patient_ids, first, stop),
                official_split=pick(index.official_split, first, stop),
                slices=pick(index.slices, first, stop),
            )
            images, tiny = _decode_all(part, size, window, progress=False)
            extra = {"paths": names[first:stop], "tiny": tiny}
            extra |= {k: getattr(part, k) for k in ("official_split", "patient_ids") if getattr(part, k) is not None}
            yield images, part.labels, extra

    store = _write(Path(out), plan, len(names), size, chunks, progress)
    _warn_tiny(store.info.get("tiny", []), size)
    return store
