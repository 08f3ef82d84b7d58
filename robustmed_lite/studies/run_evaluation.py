"""How every run of a study is scored: its validation-chosen checkpoint on the whole test split, under PGD-10
and the attack ensemble, on every other-site domain (also after test-time adaptation), and under the corruptions.

Each run keeps its scores in its own folder, in files named by a hash of the evaluation settings
(``eval-<key>.json``, ``corruptions-<key>.csv``), so that several studies can score one run without overwriting
each other.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from ..checkpoints import load_checkpoint, model_from_checkpoint, selected_checkpoint_name
from ..common import format_eps
from ..config import DATA_KEYS
from ..data.loaders import load_covid19c, stratified_subset
from ..data.preprocess import load_domain, prepare, source_size, split_spec
from ..data.splits import raw_test_split
from ..evaluation.adapt import adapt
from ..evaluation.attacks import PGD
from ..evaluation.checkpoint_eval import _evaluation_splits
from ..evaluation.corruptions import CORRUPTIONS
from ..evaluation.ensemble import binary_ensemble
from ..evaluation.metrics import clinical_metrics, evaluate, predict_logits
from ..runinfo import flush_denormal, get_device
from .plan import RunSpec

EIGHT = 8 / 255


def logged_epochs(run_dir: Path) -> int:
    """Epochs a run's log holds (cheap; for progress bars). ``trainer.completed_epochs`` is the truth."""
    log = run_dir / "log.jsonl"
    return sum(1 for line in log.read_text().splitlines() if line.strip()) if log.exists() else 0


def selected_validation(history: list[dict], epoch: int) -> dict:
    """The validation metrics (``summary.VALIDATION_COLUMNS``) the run logged in the epoch of its selected
    checkpoint, which choose the study's comparators; NaN where the log lacks that epoch."""
    row = next((r for r in history if r.get("epoch") == epoch), {})
    return {key: float(row.get(key, math.nan)) for key in ("val_clean", "val_robust")}


def read_json(path: Path) -> dict | None:
    """A JSON file's content, or None where it is missing or half-written."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, payload) -> None:
    """Writes through a temporary file and a rename: a kill never leaves half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)


@dataclass(frozen=True)
class EvalSettings:
    """What the per-run evaluation depends on; other settings write another evaluation file."""

    eps: tuple[float, ...]
    ensemble_n: int | None
    apgd_steps: int
    fab_steps: int
    square_queries: int
    ood_data: tuple[str, ...]
    covid19c: str | None
    adapt: tuple[str, ...] = ()
    corruption_n: int | None = None
    version: int = 1

    def to_dict(self) -> dict:
        """As stored in the evaluation file (JSON types: tuples become lists), so that records compare equal."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def eval_file(self, run_dir: Path) -> Path:
        """Where a run's evaluation under these settings is kept."""
        digest = hashlib.sha1(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
        return Path(run_dir) / f"eval-{digest}.json"

    def corruption_file(self, run_dir: Path) -> Path:
        """Where a run's corruption table under these settings is kept (it depends on the image count only)."""
        key = json.dumps({"n": self.corruption_n, "version": self.version})
        return Path(run_dir) / f"corruptions-{hashlib.sha1(key.encode()).hexdigest()[:10]}.csv"


def domain_name(spec: str) -> str:
    """A column-safe name for a domain: ``.../ucsd_covidct`` -> ``ucsd_covidct``, ``...:test`` -> ``..._test``."""
    path, split = split_spec(spec)
    name = Path(path).name + (f"_{split}" if split else "")
    return re.sub(r"[^0-9A-Za-z]+", "_", name).strip("_").lower() or "domain"


def _domains(cfg, splits, settings: EvalSettings) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every other-site domain, whole, prepared as the run's own data (crop, intensity): phantom site B for
    phantom runs, the pooled site's own test split for multi-source runs, each ``--ood_data`` spec (a folder,
    or ``folder:test`` for one split), COVID19-C subsets.

    Raises:
        ValueError: An ``--ood_data`` spec holds images the run trained on (the whole pooled site, or its train
            split): they would be scored as "another site".
    """
    domains = {}
    for spec in settings.ood_data:
        path, split = split_spec(spec)
        if cfg.extra_data and Path(path).resolve() == Path(cfg.extra_data).resolve() and split in (None, "train"):
            raise ValueError(
                f"--ood_data {spec} holds training images of {cfg.out_dir} (it pools "
                f"{cfg.extra_data}'s train split): score that site on its test split, {path}:test"
            )
    if cfg.data == "phantom" and splits.shift is not None:  # the same test patients at another scanner site
        domains[domain_name(splits.shift_name)] = splits.shift
    if splits.extra_test is not None:
        domains[domain_name(f"{cfg.extra_data}:test")] = splits.extra_test
    for spec in settings.ood_data:
        images, labels, _ = load_domain(spec, cfg.img_size, cfg.lung_crop, cfg.intensity, cfg.lung_region)
        domains[domain_name(spec)] = (images, labels)
    if settings.covid19c:
        size = source_size(cfg.img_size, cfg.lung_crop)
        for name, subset in load_covid19c(settings.covid19c, size, progress=False).items():
            images, _ = prepare(subset.images, cfg.img_size, cfg.lung_crop, cfg.intensity, cfg.lung_region)
            domains[f"covid19c_{domain_name(name)}"] = (images, subset.labels)
    return domains


def evaluate_run(spec: RunSpec, settings: EvalSettings) -> dict:
    """The per-run row (everything but corruptions): in-domain test, PGD-10 and the ensemble at each eps, every
    other-site domain (also after each test-time adaptation of ``settings.adapt``), train minutes."""

    checkpoint = spec.run_dir / selected_checkpoint_name(spec.method)
    device = get_device()
    model, cfg = model_from_checkpoint(checkpoint, device)
    splits = _evaluation_splits(cfg)
    x, y = splits.test
    history = [json.loads(line) for line in (spec.run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    state_epoch = load_checkpoint(checkpoint)["epoch"]
    row = {
        "name": spec.name,
        "method": spec.method,
        "seed": spec.seed,
        "checkpoint": checkpoint.name,
        "selected_epoch": int(state_epoch),
        "epochs": cfg.epochs,
        "img_size": cfg.img_size,
        "model": cfg.model,
        "train_eps": format_eps(cfg.eps),
        "test_n": len(y),
        "test_n_covid": int((y == 1).sum()),
        "test_n_noncovid": int((y == 0).sum()),
        **selected_validation(history, int(state_epoch)),
    }
    probs = predict_logits(model, x).softmax(1).numpy()
    row.update({f"clean_{k}": v for k, v in clinical_metrics(y.numpy(), probs).items()})
    # Every radius once (the training eps may be 8/255 itself), then a column per name: train_eps, 8_255, ...
    radii = {"train_eps": cfg.eps, "8_255": EIGHT, **{format_eps(e): e for e in settings.eps}}
    unique = {format_eps(e): e for e in radii.values()}
    pgd = {k: PGD(e, alpha=e / 4, steps=10, seed=spec.seed) for k, e in unique.items()}
    table = evaluate(model, (x, y), pgd, progress=False).set_index("condition")
    row.update(
        {
            f"pgd10_{name}": float(table.loc[format_eps(e), "accuracy"])
            for name, e in radii.items()
            if name in ("train_eps", "8_255")
        }
    )
    if settings.ensemble_n == 0:  # a study that does not need the ensemble (the columns stay, empty)
        row.update(
            ensemble_train_eps=math.nan,
            ensemble_8_255=math.nan,
            ensemble_n=0,
            ensemble_clean_accuracy=math.nan,
            ensemble="not run",
        )
    else:
        subset = stratified_subset(y.numpy(), settings.ensemble_n, seed=0)
        ens = {
            k: binary_ensemble(e, settings.apgd_steps, settings.fab_steps, settings.square_queries, seed=spec.seed)
            for k, e in unique.items()
        }
        table = evaluate(model, (x[subset], y[subset]), ens, batch_size=256, progress=False).set_index("condition")
        row.update(
            {
                f"ensemble_{name}": float(table.loc[format_eps(e), "accuracy"])
                for name, e in radii.items()
                if name in ("train_eps", "8_255")
            }
        )
        row.update(
            ensemble_n=len(subset),
            ensemble_clean_accuracy=float(table.loc["clean", "accuracy"]),
            ensemble=ens[format_eps(cfg.eps)].describe(),
        )
    domains = _domains(cfg, splits, settings)
    row["domains"] = ",".join(domains)
    for name, (xd, yd) in domains.items():
        row[f"{name}_n"] = len(yd)
        for method in ("none", *settings.adapt):
            # Test-time adaptation sees the target images only (adapt.py refuses labels), never the source test.
            adapted = adapt(model, xd, method, seed=spec.seed) if method == "tent" else adapt(model, xd, method)
            probs = predict_logits(adapted, xd).softmax(1).numpy()
            metrics = clinical_metrics(yd.numpy(), probs)
            key = name if method == "none" else f"{name}_{method}"
            row.update(
                {
                    f"{key}_accuracy": metrics["accuracy"],
                    f"{key}_auc": metrics["auc"],
                    f"{key}_balanced_accuracy": (metrics["sensitivity"] + metrics["specificity"]) / 2,
                    f"{key}_share_covid": float((probs.argmax(1) == 1).mean()),
                }
            )
    row["train_minutes"] = sum(r["epoch_seconds"] for r in history) / 60
    return row


def corruption_stage(specs: list[RunSpec], settings: EvalSettings, seed: int = 0, progress: bool = True) -> None:
    """The corruption table of every run that lacks it (the whole test split, or a stratified subset of
    ``settings.corruption_n``), every corruption at severities 1-5.

    A scanner change happens before any preprocessing: each corruption acts on the test slices as stored, and
    a run that prepares its slices (crop, standardisation) then prepares the corrupted ones, so that what its
    preparation undoes counts in its favour. Runs that prepare alike are scored together, on the same corrupted
    images, made once.
    """
    from ..evaluation.ood import corruption_table

    todo = [s for s in specs if not settings.corruption_file(s.run_dir).exists()]
    if not todo:
        return
    groups = {}
    for spec in todo:
        c = spec.config()
        groups.setdefault(tuple(getattr(c, k) for k in DATA_KEYS), []).append(spec)
    device = get_device()
    for members in groups.values():
        models = {
            s.run_dir.name: model_from_checkpoint(s.run_dir / selected_checkpoint_name(s.method), device)[0]
            for s in members
        }
        cfg = members[0].config()
        x, y = raw_test_split(cfg)
        subset = stratified_subset(y.numpy(), settings.corruption_n, seed=0)

        def prepared(batch, cfg=cfg):
            return prepare(batch, cfg.img_size, cfg.lung_crop, cfg.intensity, cfg.lung_region)[0]

        with flush_denormal():
            table = corruption_table(
                models,
                x[subset],
                y[subset],
                CORRUPTIONS,
                (1, 2, 3, 4, 5),
                seed=seed,
                progress=progress,
                prepare=prepared,
            )
        for spec in members:
            part = table[table["model"] == spec.run_dir.name].drop(columns="model")
            target = settings.corruption_file(spec.run_dir)
            tmp = target.with_suffix(".tmp")
            part.to_csv(tmp, index=False)
            tmp.replace(target)


def ensemble_check(spec: RunSpec, settings: EvalSettings) -> pd.DataFrame:
    """Each ensemble member alone and the ensemble, on one model and the same stratified subset, at the training
    eps: the ensemble must be at least as strong (lower accuracy) as every member."""

    model, _ = model_from_checkpoint(spec.run_dir / selected_checkpoint_name(spec.method), get_device())
    cfg = spec.config()
    x, y = _evaluation_splits(cfg).test
    subset = stratified_subset(y.numpy(), settings.ensemble_n, seed=0)
    ensemble = binary_ensemble(
        cfg.eps, settings.apgd_steps, settings.fab_steps, settings.square_queries, seed=spec.seed
    )
    attacks = {m.short_name: m for m in ensemble.members}
    attacks["ensemble"] = ensemble
    with flush_denormal():
        table = evaluate(model, (x[subset], y[subset]), attacks, progress=False)
    table = table[table["condition"] != "worst case"].assign(run=spec.run_dir.name)
    strongest_member = table[~table["condition"].isin(["clean", "ensemble"])]["accuracy"].min()
    table["ensemble_at_least_as_strong"] = bool(
        table.set_index("condition").loc["ensemble", "accuracy"] <= strongest_member + 1e-12
    )
    return table[
        ["run", "condition", "attack", "eps", "steps", "n", "accuracy", "seconds", "ensemble_at_least_as_strong"]
    ]
