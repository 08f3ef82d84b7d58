"""Experiments built from the pieces: the standard attack suite, checkpoint evaluation, method comparisons."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pandas as pd
import torch

from ..checkpoints import model_from_checkpoint
from ..common import parse_eps
from ..config import DATA_KEYS
from ..data.duplicates import content_hashes
from ..data.loaders import stratified_subset
from ..data.preprocess import load_domain, prepare, source_size
from ..data.splits import build_data
from .adapt import adapt as adapt_model
from .attacks import APGD, FGSM, MIM, PGD, RFGSM, CWLinf
from .metrics import evaluate


def attack_suite(eps: float | str, names=("fgsm", "pgd10", "pgd50", "apgd", "cw"), seed: int = 0) -> dict:
    """Named evaluation attacks at one L-inf radius (L2 PGD at ``eps * 16``, about 0.5 at 8/255 on 64 px).

    Full-strength attacks only: early-stopped (feedback) PGD is a training device and is not offered here.
    """
    eps = parse_eps(eps)
    makers = {
        "fgsm": lambda: FGSM(eps),
        "rfgsm": lambda: RFGSM(eps, seed=seed),
        "pgd10": lambda: PGD(eps, alpha=eps / 4, steps=10, seed=seed),
        "pgd50": lambda: PGD(eps, alpha=eps / 4, steps=50, seed=seed),
        "pgd_l2": lambda: PGD(eps * 16, alpha=eps * 4, steps=20, norm="l2", seed=seed),
        "mim": lambda: MIM(eps, steps=10),
        "cw": lambda: CWLinf(eps, steps=30, seed=seed),
        "apgd": lambda: APGD(eps, steps=100, seed=seed),
    }
    unknown = [n for n in names if n not in makers]
    if unknown:
        raise ValueError(f"unknown attacks {unknown}: choose from {sorted(makers)}")
    suite = {}
    for name in names:
        attack = makers[name]()
        suite[attack.short_name] = attack
    return suite


def _evaluation_splits(cfg):
    """A run's val/test/shift splits, rebuilt from its config, without the training set's prior view (which no
    evaluation reads: the splits are the same, the guided filter over every training image is skipped; and so
    neither are the prior views trained on as extra samples)."""
    cfg.progress, cfg.prior, cfg.prior_samples = False, False, 0.0
    return build_data(cfg.resolve())


def warn_training_overlap(images: torch.Tensor, cfg, where: str) -> int:
    """Warns when evaluated images are pixel for pixel among the run's training images (the run's own data
    rebuilt from its config, prepared alike); returns how many are. A phantom-trained run shares none."""
    if cfg.data == "phantom":
        return 0
    trained = set(content_hashes(_evaluation_splits(copy.copy(cfg)).train.images))
    overlap = sum(h in trained for h in content_hashes(images))
    if overlap:
        warnings.warn(
            f"{overlap} of {len(images)} images of {where} are training images of this run ({cfg.data}): "
            "their accuracy says nothing about new patients. Fix: evaluate on the run's test split or on data "
            "it never saw",
            stacklevel=2,
        )
    return overlap


def subsample(images, labels, n: int | None, seed: int = 0):
    """``(images, labels)`` reduced to a seeded stratified sample of ``n`` (``data.loaders.stratified_subset``): the
    first n images of a folder layout are sorted by class, so they would all be COVID. None keeps them all."""
    if n is None:
        return images, labels
    idx = torch.from_numpy(stratified_subset(labels.numpy(), n, seed=seed))
    return images[idx], labels[idx]


def evaluate_checkpoint(
    path: str | Path,
    split: str = "test",
    attacks=("fgsm", "pgd10", "pgd50", "apgd", "cw"),
    eps=None,
    n: int | None = None,
    data: str | None = None,
    adapt: str = "none",
    progress: bool = True,
    seed: int = 0,
):
    """Evaluation table of a checkpoint on its run's val/test/shift split (rebuilt from its config) or on
    another data root, optionally after test-time adaptation to those images.

    Args:
        path: A checkpoint written by the trainer.
        split: 'val', 'test' or 'shift' (the other phantom site / the run's ``ood_data``).
        attacks: Names for ``attack_suite``.
        eps: Attack radius; default the one the model was trained with.
        n: Evaluate a seeded stratified sample of n images (both classes in proportion); None: all.
        data: A data root (or ``root:test`` for one split of it) to evaluate on instead, prepared as the run's
            own data (lung crop, intensity standardisation).
        adapt: ``none``, ``adabn`` or ``tent``: adapt a copy of the model to the evaluated images first (their
            labels are never passed to it; the checkpoint is not modified).
        progress: Progress bars.
        seed: Seed of the ``n`` sample.

    Returns:
        ``evaluate``'s table (with ``n_covid`` and ``n_noncovid``), and ``attrs["sample"]`` describing the images.
    """
    model, cfg = model_from_checkpoint(path)
    if data is not None:
        images, labels, _ = load_domain(
            data, cfg.img_size, cfg.lung_crop, cfg.intensity, cfg.lung_region, progress=progress
        )
        warn_training_overlap(images, cfg, data)
    else:
        splits = _evaluation_splits(cfg)
        chosen = {"val": splits.val, "test": splits.test, "shift": splits.shift}[split]
        if chosen is None:
            raise ValueError("the run has no shifted test set: train with --ood_data, or pass --data")
        images, labels = chosen
    total = len(labels)
    images, labels = subsample(images, labels, n, seed)
    suite = attack_suite(cfg.eps if eps is None else eps, attacks)  # bad names fail before any adaptation
    model = adapt_model(model, images, adapt)
    table = evaluate(model, (images, labels), suite, progress=progress)
    where = data if data is not None else f"the run's {split} split"
    table.attrs["sample"] = f"{len(labels)} of {total} images of {where}" + (
        f", a stratified sample (seed {seed})" if len(labels) < total else ""
    )
    return table


def run_ood(
    checkpoints,
    out_dir: str | Path = "results/ood",
    corruptions=None,
    severities=(1, 2, 3, 4, 5),
    n: int | None = None,
    covid19c: str | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, pd.DataFrame]:
    """The OOD suite for one or more checkpoints: corruption accuracy, mCE and a shift table, as CSV and PNG.

    Models are named by their method (``erm`` is the mCE reference when present, else the first checkpoint).
    The data are the first checkpoint's run splits: its test split for corruptions, and test vs the shifted
    split (another phantom site or the run's ``ood_data``) plus any COVID19-C subsets for the shift table.

    Args:
        checkpoints: Checkpoint paths written by the trainer.
        out_dir: Where the CSVs and figures go.
        corruptions: Names (default all of ``corruptions.CORRUPTIONS``).
        severities: Severities to run.
        n: Score a seeded stratified sample of n images of the test split and of the shifted split (both
            classes in proportion; ``shift.csv`` has ``n_covid`` and ``n_noncovid``); None: all.
        covid19c: A COVID19-C root (subset folders with index CSVs) to add as shift domains.
        seed: Seed of the corruptions and of the ``n`` samples.
        progress: Progress bars.

    Returns:
        ``{"corruptions": ..., "summary": ..., "shift": ...}``.
    """
    from ..data.loaders import load_covid19c
    from ..figures import plot_corruption_heatmap, plot_shift_bars
    from .corruptions import CORRUPTIONS
    from .ood import corruption_summary, corruption_table, shift_table

    models, cfg, first = {}, None, None
    for path in checkpoints:
        model, run_cfg = model_from_checkpoint(path)
        name = run_cfg.method if run_cfg.method not in models else f"{run_cfg.method}:{Path(path).parent.name}"
        models[name] = model
        if cfg is None:
            cfg, first = run_cfg, path
        # Every model is scored on the first run's splits: they must be the same data at the same size.
        differ = [
            k
            for k in (*DATA_KEYS, "ood_data", "ood_site", "extra_data")
            if getattr(run_cfg, k, None) != getattr(cfg, k, None)
        ]
        if differ:
            raise ValueError(
                f"{path} and {first} were trained on different data ({', '.join(differ)}): the OOD "
                "suite compares models on one test split. Fix: pass checkpoints of runs that share "
                "their data settings"
            )
    splits = _evaluation_splits(cfg)
    x, y = subsample(*splits.test, n, seed)
    domains = {f"{cfg.data} test": (x, y)}
    if splits.shift is not None:
        domains[splits.shift_name] = subsample(*splits.shift, n, seed)
    if covid19c:
        size = source_size(cfg.img_size, cfg.lung_crop)
        for name, subset in load_covid19c(covid19c, size, progress=progress).items():
            images, _ = prepare(subset.images, cfg.img_size, cfg.lung_crop, cfg.intensity, cfg.lung_region)
            domains[f"COVID19-C {name}"] = (images, subset.labels)
    reference = "erm" if "erm" in models else next(iter(models))
    table = corruption_table(models, x, y, corruptions or CORRUPTIONS, severities, seed=seed, progress=progress)
    results = {
        "corruptions": table,
        "summary": corruption_summary(table, reference=reference),
        "shift": shift_table(models, domains),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for key, frame in results.items():
        frame.to_csv(out / f"{key}.csv", index=False)
    plot_corruption_heatmap(table).savefig(out / "corruption_heatmap.png", dpi=120, bbox_inches="tight")
    plot_shift_bars(results["shift"]).savefig(out / "shift.png", dpi=120, bbox_inches="tight")
    return results
