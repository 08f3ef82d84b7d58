"""The train / validation / test splits a config asks for, with the prior views of the training images."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..common import CLASS_NAMES
from ..config import SIZE_KEYS, TrainConfig
from .dataset import PriorDataset
from .loaders import SPLITS, DataError, load_images, stratified_subset
from .phantom import make_phantom_dataset
from .preprocess import domain_label, load_domain, prepare, source_size
from .slicestore import SliceStore, is_slice_store

MIN_EVAL_PER_CLASS = 10  # fewer images of a class in a validation or test split give meaningless rates


@dataclass
class DataSplits:
    """Training dataset (with prior views) and held-out tensors: val (model selection), test, a shifted test set
    (another phantom site, or another hospital) where one exists, and the pooled site's own test split when
    training on several sites. Every split went through the same preparation (``preprocess.prepare``).

    Attributes:
        crop_fallbacks: Per split, slices a lung crop could not frame (kept whole) or a lung-region test
            blanked; empty without either.
    """

    train: PriorDataset
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    shift: tuple[torch.Tensor, torch.Tensor] | None
    shift_name: str | None
    extra_test: tuple[torch.Tensor, torch.Tensor] | None = None
    extra_name: str | None = None
    crop_fallbacks: dict[str, int] = field(default_factory=dict)
    duplicates: dict[str, dict] = field(default_factory=dict)
    sampled: dict[str, dict] = field(default_factory=dict)

    def record(self) -> dict:
        """What a run records of its data: split sizes and class counts, crop fallbacks, the duplicate check, and
        the splits sampled down to a size the user set (``sampled_splits``)."""
        sizes = {"train": self.train.labels, "val": self.val[1], "test": self.test[1]}
        return {
            "splits": {
                k: {"n": len(y), "per_class": torch.bincount(y.long(), minlength=2).tolist()} for k, y in sizes.items()
            },
            "crop_fallbacks": self.crop_fallbacks,
            "duplicates": self.duplicates,
            "sampled": self.sampled,
        }


def _class_counts(labels: torch.Tensor) -> list[int]:
    return torch.bincount(torch.as_tensor(labels).long(), minlength=2).tolist()


def sampled_splits(cfg: TrainConfig, parts: dict, labels: torch.Tensor, report: dict | None = None) -> dict:
    """Real data's splits cut to the sizes the user set (``cfg.subsample_real``; a size of None keeps the split
    whole): a stratified sample of each, after the duplicate-aware split. The training sample is seeded by the
    run's seed; the validation and test samples by the split's seed (0), so that every run of a study is selected
    and scored on the same images.

    Args:
        cfg: The run's config.
        parts: Split name -> index array into ``labels``.
        labels: One label per image.
        report: Filled with split name -> {"n", "of", "seed"} for each sampled split, where given.

    Raises:
        DataError: A size larger than its split (the message gives the split's count).
    """
    if not cfg.subsample_real:
        return parts
    out, said = dict(parts), []
    for name, key in zip(SPLITS, SIZE_KEYS):
        size, held = getattr(cfg, key), len(parts[name])
        if size is None:
            continue
        if size > held:
            raise DataError(
                f"--{key} {size} asks for more images than the {name} split of {cfg.data} holds ({held}). Fix: "
                f"pass --{key} {held} or less, or leave --{key} out to use every image of the split"
            )
        seed = cfg.seed if name == "train" else 0
        indices = parts[name][stratified_subset(labels[parts[name]].numpy(), size, seed=seed)]
        out[name] = indices
        counts = _class_counts(labels[indices])
        said.append(f"{name} {size} of {held} ({', '.join(f'{n} {CLASS_NAMES[c]}' for c, n in enumerate(counts))})")
        if report is not None:
            report[name] = {"n": size, "of": held, "seed": seed}
    if said:
        whole = [name for name, key in zip(SPLITS, SIZE_KEYS) if getattr(cfg, key) is None]
        kept = f"; {' and '.join(whole)}: every image" if whole else ""
        warnings.warn(
            f"{cfg.data}: the sizes you set take a stratified sample of each split: {'; '.join(said)}{kept}",
            stacklevel=2,
        )
    return out


def build_data(cfg: TrainConfig) -> DataSplits:
    """The splits a config asks for. Phantom data uses fixed data seeds (0, 1, 2: train, val, test), so the
    training seed changes only the training; the shifted test set shows the test patients at ``ood_site``.
    Real data are split by the data set's own split where it has one, else stratified with seed 0; with
    ``extra_data`` the other site's train and val parts join training and validation (``site_balanced``:
    each site fills half of every epoch) and its test part is reported as ``extra_test``. Sizes the user set
    sample the splits of ``cfg.data`` (``sampled_splits``), not those of ``extra_data``."""
    prior_kwargs = dict(
        threshold=cfg.prior_threshold, radius=cfg.prior_radius, eps=cfg.prior_eps, s=cfg.prior_s, view=cfg.prior_view
    )
    fallbacks, duplicates, sampled = {}, {}, {}

    def prepared(name: str, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images, report = prepare(images, cfg.img_size, cfg.lung_crop, cfg.intensity, cfg.lung_region)
        if report is not None:
            fallbacks[name] = report.n_fallback
        return images, labels

    extra_test = extra_name = None
    if cfg.data == "phantom":
        train = prepared("train", *make_phantom_dataset(cfg.n_train, cfg.img_size, cfg.site, seed=0)[:2])
        val = prepared("val", *make_phantom_dataset(cfg.n_val, cfg.img_size, cfg.site, seed=1)[:2])
        test = prepared("test", *make_phantom_dataset(cfg.n_test, cfg.img_size, cfg.site, seed=2)[:2])
        shift = prepared("shift", *make_phantom_dataset(cfg.n_test, cfg.img_size, cfg.ood_site, seed=2)[:2])
        shift_name = f"phantom site {cfg.ood_site}"
    else:
        if is_slice_store(cfg.data):  # larger than memory: training slices are read from disk batch by batch
            store = open_training_store(cfg)
            parts = sampled_splits(
                cfg, store.splits(val=cfg.val_fraction, test=cfg.test_fraction, seed=0), store.labels, sampled
            )
            train = (store.view(parts["train"]), store.labels[parts["train"]])
            val, test = (prepared(k, store.load(parts[k]), store.labels[parts[k]]) for k in ("val", "test"))
        else:
            data = load_images(cfg.data, source_size(cfg.img_size, cfg.lung_crop), progress=cfg.progress)
            parts = data.splits(val=cfg.val_fraction, test=cfg.test_fraction, seed=0, duplicates=cfg.duplicates)
            duplicates[str(cfg.data)] = parts.duplicates.to_dict()
            parts = sampled_splits(cfg, parts, data.labels, sampled)
            train, val, test = (prepared(k, data.images[parts[k]], data.labels[parts[k]]) for k in SPLITS)
        shift, shift_name = None, None
        if cfg.ood_data:
            images, labels, report = load_domain(
                cfg.ood_data, cfg.img_size, cfg.lung_crop, cfg.intensity, cfg.lung_region, progress=cfg.progress
            )
            shift, shift_name = (images, labels), domain_label(cfg.ood_data)
            if report is not None:
                fallbacks["shift"] = report.n_fallback
    sites = None
    if cfg.extra_data:
        other = load_images(cfg.extra_data, source_size(cfg.img_size, cfg.lung_crop), progress=cfg.progress)
        other_parts = other.splits(val=cfg.val_fraction, test=cfg.test_fraction, seed=0, duplicates=cfg.duplicates)
        duplicates[str(cfg.extra_data)] = other_parts.duplicates.to_dict()
        extra = {k: prepared(f"extra {k}", other.images[other_parts[k]], other.labels[other_parts[k]]) for k in SPLITS}
        sites = torch.cat(
            [torch.zeros(len(train[1]), dtype=torch.long), torch.ones(len(extra["train"][1]), dtype=torch.long)]
        )
        train = tuple(torch.cat([a, b]) for a, b in zip(train, extra["train"]))
        val = tuple(torch.cat([a, b]) for a, b in zip(val, extra["val"]))
        extra_test, extra_name = extra["test"], f"{Path(cfg.extra_data).name} (test)"
    check_split_classes({"train": train[1], "val": val[1], "test": test[1]}, cfg.data, cfg.extra_data)
    # Training never reads the phantom's masks, so the dataset does not gather and flip them every batch.
    dataset = PriorDataset(
        *train,
        prior=cfg.prior,
        hflip=cfg.hflip,
        vflip=cfg.vflip,
        seed=cfg.seed,
        prior_kwargs=prior_kwargs,
        sites=sites if cfg.site_balanced else None,
    )
    return DataSplits(dataset, val, test, shift, shift_name, extra_test, extra_name, fallbacks, duplicates, sampled)


def raw_test_split(cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The test split of a config *before* its preparation (crop, standardisation, lung region), at the size the
    preparation starts from (``preprocess.source_size``): what a scanner change acts on. ``prepare`` turns it into
    ``build_data(cfg).test``."""
    if cfg.data == "phantom":
        return make_phantom_dataset(cfg.n_test, cfg.img_size, cfg.site, seed=2)[:2]
    if is_slice_store(cfg.data):
        store = open_training_store(cfg)
        parts = store.splits(val=cfg.val_fraction, test=cfg.test_fraction, seed=0)
        test = _sampled_quietly(cfg, parts, store.labels)["test"]
        return store.load(test), store.labels[test]
    data = load_images(cfg.data, source_size(cfg.img_size, cfg.lung_crop), progress=False)
    parts = data.splits(val=cfg.val_fraction, test=cfg.test_fraction, seed=0, duplicates=cfg.duplicates)
    test = _sampled_quietly(cfg, parts, data.labels)["test"]
    return data.images[test], data.labels[test]


def _sampled_quietly(cfg: TrainConfig, parts: dict, labels: torch.Tensor) -> dict:
    """``sampled_splits`` without its warning: the run that made these splits has said it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return sampled_splits(cfg, parts, labels)


def open_training_store(cfg: TrainConfig) -> SliceStore:
    """The slice store ``cfg.data`` names, checked against the settings a store supports: slices are used as
    stored (no crop or per-slice standardisation up front, which would need the whole set in memory)."""
    store = SliceStore(cfg.data)
    refused = {
        "img_size": (
            cfg.img_size != store.size,
            f"write the store at --size {cfg.img_size}, or train with img_size {store.size}",
        ),
        "lung_crop": (cfg.lung_crop, "set lung_crop false"),
        "intensity": (cfg.intensity != "none", "set intensity none, or standardise before writing the store"),
        "lung_region": (cfg.lung_region != "all", "set lung_region all"),
        "extra_data": (cfg.extra_data is not None, "train on one store, or on folders held in memory"),
    }
    for key, (bad, fix) in refused.items():
        if bad:
            raise DataError(
                f"{key}={getattr(cfg, key)!r} is not supported with the slice store {store.root} "
                f"({store.size} px, {len(store)} slices). Fix: {fix}"
            )
    return store


def check_split_classes(labels: dict, data: str = "the data", extra: str | None = None) -> None:
    """Refuses a training split without both classes; warns when a validation or test split holds fewer than
    ``MIN_EVAL_PER_CLASS`` images of a class.

    Misnamed class folders (both classes under one alias, or one folder missing) would otherwise train a model
    that always answers the same, and every later AUC would be NaN.

    Args:
        labels: Split name -> label tensor (``train`` is required, ``val`` and ``test`` optional).
        data: The data's name for the messages.
        extra: The pooled site (``extra_data``), named in the messages where set.

    Raises:
        DataError: The training split lacks a class.
    """
    source = data if extra is None else f"{data} + {extra}"
    counts = {
        name: torch.bincount(torch.as_tensor(y).long().reshape(-1), minlength=2)[:2].tolist()
        for name, y in labels.items()
        if y is not None
    }
    train = counts["train"]
    if min(train) == 0:
        held = ", ".join(f"{n} {CLASS_NAMES[c]}" for c, n in enumerate(train) if n)
        raise DataError(
            f"the training split of {source} holds only {held or 'no'} images: a classifier needs both "
            f"classes ({CLASS_NAMES[0]} and {CLASS_NAMES[1]}). Fix: check the class folder names "
            "(COVID/, non-COVID/ or the aliases in the README) or the CSV's label column"
        )
    for name in ("val", "test"):
        if name in counts and min(counts[name]) < MIN_EVAL_PER_CLASS:
            shown = ", ".join(f"{n} {CLASS_NAMES[c]}" for c, n in enumerate(counts[name]))
            warnings.warn(
                f"the {name} split of {source} holds {shown}: fewer than {MIN_EVAL_PER_CLASS} images of a "
                "class make its accuracy, sensitivity and specificity noisy (or undefined). Use more "
                "data or a larger --val_fraction / --test_fraction",
                stacklevel=3,
            )
