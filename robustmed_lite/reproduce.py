"""The paper's comparison on real CT in one command: every method x seed trained and evaluated the same way,
summarised with t-intervals over seeds, paired gains over the best prior method, and verdicts on the claims.

    python -m robustmed_lite reproduce --profile cpu --data ../shared/data/sarscov2 \\
        --ood_data ../shared/data/ucsd_covidct

Stages, each resumable (a second call after a kill redoes nothing that finished):

1. **train** every (method, seed) under ``--runs``: a finished run is reused, an interrupted one resumes from its
   ``last.pt``. CAP's protocol has two stages, and so do the profiles: a clean (ERM) model is trained first, and
   every robust run of the same seed starts from its validation-chosen checkpoint (``init_from``).
2. **evaluate** each run's validation-chosen checkpoint (``eval-<key>.json`` in its run directory, the key a hash
   of the evaluation settings, so that several studies can share one run): the whole test
   split (accuracy, AUC, sensitivity, specificity), PGD-10 and the attack ensemble (``ensemble.py``) at the
   training eps and at 8/255, and every other-site domain, whole.
3. **corruptions** for all runs at once (the corrupted test images are made once and shared):
   ``corruptions-<key>.csv`` per run, every corruption at severities 1-5.
4. **summary** in ``--out``: ``runs.csv`` (one row per run), ``table.csv`` (mean and 95% t-interval per method and
   metric), ``gains.csv`` (the best prior method per metric and the paired gain over it), ``verdicts.csv`` (the
   paper's claims, by the rule of ``stats.py``), ``table.md``, two figures, ``ensemble_check.csv`` and the
   provenance (``environment.json``, ``profile.json``, ``commands.txt``).

Checkpoints are chosen on the validation split, never on test. Where cost forces a subset (the ensemble in the
``cpu`` profile) it is a seeded, stratified sample, and its size is in the tables.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from tqdm.auto import tqdm

from .attacks import PGD, format_eps, parse_eps
from .config import METHODS, load_config
from .corruptions import CAP_IMAGENET_C, CORRUPTIONS, FAMILIES
from .adapt import adapt
from .augment import ACQUISITION
from .data import DataError, find_shared_data, load_covid19c, load_images, stratified_subset
from .ensemble import binary_ensemble
from .evaluate import clinical_metrics, evaluate, predict_logits
from .experiments import _evaluation_splits, selected_checkpoint_name
from .preprocess import load_domain, prepare, source_size, split_spec
from .runinfo import environment_info, flush_denormal, get_device, progress_options
from .stats import VERDICT_RULE, Interval, paired_differences, t_interval, verdict
from .trainer import Trainer, config_differences, load_checkpoint, model_from_checkpoint

ALL_METHODS = tuple(METHODS)
PAPER_METHODS = ("cap", "robustmed")  # CAP and the paper's extension of it: not "prior" methods
THE_METHOD = "robustmed"
DEFAULT_SEEDS = (0, 1, 2)
EIGHT = 8 / 255
CT_PHYSICS = FAMILIES["ct_physics"]


@dataclass(frozen=True)
class Claim:
    """A claim of the paper: ``metric`` of the method beats the best prior defence by ``gain``."""

    name: str
    metric: str
    gain: float
    source: str


CLAIMS = (
    Claim("natural accuracy +3.4 points", "clean_accuracy", 0.034,
          "Visformer on SARS-CoV-2: natural accuracy about 3.4 points above the best prior defence"),
    Claim("OOD accuracy +25 points", "ood_mean_accuracy", 0.25,
          "average out-of-distribution accuracy (cross-nation data and corruptions) about 25 points higher"),
)


@dataclass(frozen=True)
class Profile:
    """How a reproduction trains and evaluates.

    Attributes:
        name: ``cpu``, ``gpu`` or ``paper``.
        preset: The training preset (``configs/*.yaml``).
        train: Overrides of the preset.
        two_stage: Start every robust run from the same seed's clean (ERM) model, as CAP does.
        jobs: Runs trained at once (processes; on a GPU they share it).
        ensemble_n: Test images attacked by the ensemble (seeded, stratified); None: all of them; 0: no ensemble.
        apgd_steps: Iterations of each APGD member.
        fab_steps: FAB iterations.
        square_queries: Square's queries per image.
        corruption_n: Test images scored under the corruptions (seeded, stratified); None: all of them.
    """

    name: str
    preset: str
    train: dict = field(default_factory=dict)
    two_stage: bool = True
    jobs: int = 1
    ensemble_n: int | None = None
    apgd_steps: int = 100
    fab_steps: int = 100
    square_queries: int = 5000
    corruption_n: int | None = None


PROFILES = {
    # 64 px, the narrow Visformer, 10 epochs: the five core methods x 3 seeds fit in an hour on 2 CPU cores.
    # Two processes of one thread each train 25% faster than one of two threads at this size (measured).
    # The ensemble runs on a stratified subset with reduced budgets (AutoAttack's: 100 / 100 / 5000).
    "cpu": Profile("cpu", "cpu-demo", dict(img_size=64, epochs=10), jobs=2, ensemble_n=128, apgd_steps=50,
                   fab_steps=20, square_queries=500),
    # 128 px visformer_tiny, several runs sharing one GPU; sized for about 10 minutes of one H100/H200 (estimate:
    # not run in this workplace, see the README).
    "gpu": Profile("gpu", "colab", dict(img_size=128, epochs=12, warmup_epochs=1, attack_warmup_epochs=3,
                                        weight_noise_warmup=2, eval_n=372), jobs=4, ensemble_n=None,
                   apgd_steps=100, fab_steps=50, square_queries=1000),
    # CAP's protocol: 224 px, 200 epochs, ImageNet weights, AutoAttack's budgets. Hours of GPU.
    "paper": Profile("paper", "paper", {}, jobs=1, ensemble_n=None),
}


# ------------------------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class RunSpec:
    """One training run of the plan: a row name (a method, or a named variant of one) and a seed."""

    name: str
    seed: int
    preset: str
    overrides: dict
    run_dir: Path
    init_from: Path | None
    reference: str = "erm"  # the clean row trained on the same data: stage 1, and mCE's reference

    @property
    def method(self) -> str:
        return self.overrides["method"]

    def config(self):
        return load_config(self.preset, self.overrides)


def parse_seeds(text: str | list | tuple) -> tuple[int, ...]:
    """``"0,1,2"`` or ``"0-4"`` -> seeds, with a clear error for anything else."""
    if isinstance(text, (list, tuple)):
        values = list(text)
    else:
        values = []
        for part in str(text).split(","):
            part = part.strip()
            match = re.fullmatch(r"(\d+)-(\d+)", part)
            if match and int(match.group(1)) <= int(match.group(2)):
                values += list(range(int(match.group(1)), int(match.group(2)) + 1))
            elif re.fullmatch(r"\d+", part):
                values.append(int(part))
            else:
                raise ValueError(f"cannot read seeds {text!r}: give comma-separated integers such as 0,1,2 "
                                 "(or a range such as 0-4)")
    if not values or len(set(values)) != len(values):
        raise ValueError(f"seeds must be distinct integers, got {text!r}")
    return tuple(int(v) for v in values)


def parse_methods(text: str | list | tuple | None) -> tuple[str, ...]:
    """Comma-separated method names (default: all nine), checked against ``config.METHODS``."""
    if text is None or text == "all":
        return ALL_METHODS
    names = [m.strip() for m in (text.split(",") if isinstance(text, str) else text) if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise ValueError(f"unknown method(s) {unknown or names}: choose from {', '.join(ALL_METHODS)}")
    return tuple(dict.fromkeys(names))


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"i/n"`` (1 <= i <= n) -> (i, n); None -> (1, 1)."""
    if text is None:
        return 1, 1
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not match or not 1 <= int(match.group(1)) <= int(match.group(2)):
        raise ValueError(f"--shard takes i/n with 1 <= i <= n (e.g. 2/4), got {text!r}")
    return int(match.group(1)), int(match.group(2))


def parse_variant(text: str) -> tuple[str, dict]:
    """``"NAME=METHOD,key=value,..."`` -> (NAME, overrides): an extra row, a method with other settings."""
    name, _, rest = text.partition("=")
    parts = [p.strip() for p in rest.split(",") if p.strip()]
    if not name.strip() or not parts or "=" in parts[0]:
        raise ValueError(f"cannot read variant {text!r}: use NAME=METHOD,key=value,... "
                         "(e.g. robustmed+crop=robustmed,lung_crop=true)")
    overrides = {"method": parse_methods(parts[0])[0]}
    for part in parts[1:]:
        key, eq, value = part.partition("=")
        if not eq:
            raise ValueError(f"variant {name!r}: {part!r} is not key=value")
        overrides[key.strip()] = value.strip()
    return name.strip(), overrides


def build_plan(profile: Profile, data: str, methods, seeds, runs_root: Path, overrides: dict | None = None,
               variants: dict[str, dict] | None = None) -> list[RunSpec]:
    """The runs of a reproduction, stage-1 (clean) runs first, each with its run directory.

    With ``profile.two_stage`` every robust row starts from the clean (ERM) row trained on the same data and
    preparation: ``erm`` for the methods, and for a variant the ERM row with the same settings, which is added
    (named ``erm+<suffix>``, the suffix of the variant's name) when the variants do not include one.
    """
    rows = {m: {"method": m} for m in methods}
    for name, values in (variants or {}).items():
        if name in rows or name in METHODS:
            raise ValueError(f"variant name {name!r} is taken by a method: choose another name")
        rows[name] = dict(values)

    def settings_of(row: dict) -> dict:
        return {k: v for k, v in row.items() if k != "method"}

    references = {}
    if profile.two_stage:
        clean = {json.dumps(settings_of(r), sort_keys=True): n for n, r in rows.items() if r["method"] == "erm"}
        added = {}
        for name, row in rows.items():
            key = json.dumps(settings_of(row), sort_keys=True)
            if key not in clean:
                clean[key] = "erm" if not settings_of(row) else f"erm+{name.split('+', 1)[-1]}"
                added[clean[key]] = {"method": "erm", **settings_of(row)}
            references[name] = clean[key]
        rows = {**added, **rows}
    base = {**profile.train, **(overrides or {}), "data": data, "progress": False}
    plan = []
    for seed in seeds:
        for name, row in rows.items():
            run_dir = runs_root / f"{name}-seed{seed}"
            reference = references.get(name, "erm")
            init = None
            if profile.two_stage and row["method"] != "erm":
                init = runs_root / f"{reference}-seed{seed}" / "best_clean.pt"
            values = {**base, **row, "seed": seed, "out_dir": str(run_dir)}
            if init is not None:
                values["init_from"] = str(init)
            plan.append(RunSpec(name, seed, profile.preset, values, run_dir, init, reference))
    plan.sort(key=lambda s: (s.init_from is not None, s.seed))  # stage 1 first, stable otherwise
    for spec in plan:
        spec.config()  # every config resolves before anything trains
    return plan


def shard_of(plan: list[RunSpec], shard: tuple[int, int]) -> list[RunSpec]:
    """The runs of shard i of n, deterministically: the clean run of seed s goes to shard ``s mod n`` (so each
    shard trains its own stage-1 runs first), the others round-robin in plan order. A shard whose robust run
    starts from another shard's clean run waits for that checkpoint."""
    i, n = shard
    if n == 1:
        return list(plan)
    mine, k = [], 0
    for spec in plan:
        if spec.init_from is None and spec.method == "erm":
            owner = spec.seed % n
        else:
            owner, k = k % n, k + 1
        if owner == i - 1:
            mine.append(spec)
    return mine


# -------------------------------------------------------------------------------------------- train + eval
def _finished_epochs(run_dir: Path) -> int:
    log = run_dir / "log.jsonl"
    return sum(1 for line in log.read_text().splitlines() if line.strip()) if log.exists() else 0


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, payload) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)


def check_existing(spec: RunSpec) -> None:
    """A run directory that already holds a run of other settings is an error, not something to reuse."""
    saved = spec.run_dir / "config.yaml"
    if saved.exists():
        changed = config_differences(yaml.safe_load(saved.read_text()), spec.config())
        if changed:
            raise ValueError(f"{spec.run_dir} holds a run with other settings ({', '.join(changed)}): it is not "
                             "reused. Fix: pass another --runs folder, or delete that run to retrain it")


def train_run(spec: RunSpec, wait_poll: float = 5.0) -> None:
    """Trains a run, or resumes it, or does nothing if it finished; waits for its clean checkpoint if another
    process (shard) is still training it."""
    cfg = spec.config()
    check_existing(spec)
    if _finished_epochs(spec.run_dir) >= cfg.epochs and (spec.run_dir / "last.pt").exists():
        return
    if spec.init_from is not None:
        clean_dir = spec.init_from.parent
        while not (spec.init_from.exists() and _finished_epochs(clean_dir) >= cfg.epochs):
            time.sleep(wait_poll)  # another shard trains the clean model of this seed
    trainer = Trainer(cfg, resume=(spec.run_dir / "last.pt").exists())
    trainer.fit()


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


def _eps_key(eps: float, train_eps: float) -> str:
    return "8_255" if abs(eps - EIGHT) < 1e-9 else "train_eps" if abs(eps - train_eps) < 1e-9 else format_eps(eps)


def domain_name(spec: str) -> str:
    """A column-safe name for a domain: ``.../ucsd_covidct`` -> ``ucsd_covidct``, ``...:test`` -> ``..._test``."""
    path, split = split_spec(spec)
    name = Path(path).name + (f"_{split}" if split else "")
    return re.sub(r"[^0-9A-Za-z]+", "_", name).strip("_").lower() or "domain"


def _domains(cfg, splits, settings: EvalSettings) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every other-site domain, whole, prepared as the run's own data (crop, intensity): phantom site B for
    phantom runs, the pooled site's own test split for multi-source runs, each ``--ood_data`` spec (a folder,
    or ``folder:test`` for one split), COVID19-C subsets."""
    domains = {}
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
    row = {"name": spec.name, "method": spec.method, "seed": spec.seed, "checkpoint": checkpoint.name,
           "selected_epoch": int(state_epoch), "epochs": cfg.epochs, "img_size": cfg.img_size, "model": cfg.model,
           "train_eps": format_eps(cfg.eps), "test_n": len(y), "test_n_covid": int((y == 1).sum()),
           "test_n_noncovid": int((y == 0).sum())}
    probs = predict_logits(model, x).softmax(1).numpy()
    row.update({f"clean_{k}": v for k, v in clinical_metrics(y.numpy(), probs).items()})
    eps_values = list(dict.fromkeys([cfg.eps, *settings.eps]))
    pgd = {_eps_key(e, cfg.eps): PGD(e, alpha=e / 4, steps=10, seed=spec.seed) for e in eps_values}
    table = evaluate(model, (x, y), pgd, progress=False).set_index("condition")
    for key in pgd:
        row[f"pgd10_{key}"] = float(table.loc[key, "accuracy"])
    if settings.ensemble_n == 0:  # a study that does not need the ensemble (the columns stay, empty)
        row.update({f"ensemble_{_eps_key(e, cfg.eps)}": math.nan for e in eps_values},
                   ensemble_n=0, ensemble_clean_accuracy=math.nan, ensemble="not run")
    else:
        subset = stratified_subset(y.numpy(), settings.ensemble_n, seed=0)
        ens = {_eps_key(e, cfg.eps): binary_ensemble(e, settings.apgd_steps, settings.fab_steps,
                                                      settings.square_queries, seed=spec.seed) for e in eps_values}
        table = evaluate(model, (x[subset], y[subset]), ens, batch_size=256, progress=False).set_index("condition")
        for key in ens:
            row[f"ensemble_{key}"] = float(table.loc[key, "accuracy"])
        row.update(ensemble_n=len(subset), ensemble_clean_accuracy=float(table.loc["clean", "accuracy"]),
                   ensemble=ens[_eps_key(cfg.eps, cfg.eps)].describe())
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
            row.update({f"{key}_accuracy": metrics["accuracy"], f"{key}_auc": metrics["auc"],
                        f"{key}_balanced_accuracy": (metrics["sensitivity"] + metrics["specificity"]) / 2,
                        f"{key}_share_covid": float((probs.argmax(1) == 1).mean())})
    row["train_minutes"] = sum(r["epoch_seconds"] for r in history) / 60
    return row


def _task(spec: RunSpec, settings: EvalSettings, threads: int | None) -> str:
    """Train (or reuse) and evaluate one run; the unit of work of a worker process."""
    if threads:
        torch.set_num_threads(threads)
    train_run(spec)
    eval_file = settings.eval_file(spec.run_dir)
    record = _read_json(eval_file)
    if record is None or record.get("settings") != settings.to_dict():
        with flush_denormal():
            row = evaluate_run(spec, settings)
        _write_json(eval_file, {"settings": settings.to_dict(), "row": row})
    return spec.name


# ------------------------------------------------------------------------------------------- corruptions
def corruption_stage(specs: list[RunSpec], settings: EvalSettings, seed: int = 0, progress: bool = True) -> None:
    """The corruption table of every run that lacks it, all models scored on the same corrupted images (the
    whole test split, or a stratified subset of ``settings.corruption_n``)."""
    from .ood import corruption_table

    todo = [s for s in specs if not settings.corruption_file(s.run_dir).exists()]
    if not todo:
        return
    groups = {}  # runs that prepare their data alike share one (prepared) test split and its corrupted copies
    for spec in todo:
        c = spec.config()
        groups.setdefault((c.img_size, c.lung_crop, c.intensity, c.lung_region, c.extra_data), []).append(spec)
    device = get_device()
    for members in groups.values():
        models = {s.run_dir.name: model_from_checkpoint(s.run_dir / selected_checkpoint_name(s.method), device)[0]
                  for s in members}
        x, y = _evaluation_splits(members[0].config()).test
        subset = stratified_subset(y.numpy(), settings.corruption_n, seed=0)
        with flush_denormal():
            table = corruption_table(models, x[subset], y[subset], CORRUPTIONS, (1, 2, 3, 4, 5), seed=seed,
                                     progress=progress)
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
    ensemble = binary_ensemble(cfg.eps, settings.apgd_steps, settings.fab_steps, settings.square_queries,
                               seed=spec.seed)
    attacks = {m.short_name: m for m in ensemble.members}
    attacks["ensemble"] = ensemble
    with flush_denormal():
        table = evaluate(model, (x[subset], y[subset]), attacks, progress=False)
    table = table[table["condition"] != "worst case"].assign(run=spec.run_dir.name)
    strongest_member = table[~table["condition"].isin(["clean", "ensemble"])]["accuracy"].min()
    table["ensemble_at_least_as_strong"] = bool(table.set_index("condition").loc["ensemble", "accuracy"]
                                                <= strongest_member + 1e-12)
    return table[["run", "condition", "attack", "eps", "steps", "n", "accuracy", "seconds",
                  "ensemble_at_least_as_strong"]]


# ------------------------------------------------------------------------------------------------ summary
def _corruption_means(table: pd.DataFrame) -> dict:
    corr = table[table["severity"] > 0]
    return {"corruption_cap15": corr[corr["corruption"].isin(CAP_IMAGENET_C)]["accuracy"].mean(),
            "corruption_ct": corr[corr["corruption"].isin(CT_PHYSICS)]["accuracy"].mean(),
            "corruption_all": corr["accuracy"].mean(),
            # without the types that acquisition augmentation shows a model (milder) during training
            "corruption_not_augmented": corr[~corr["corruption"].isin(ACQUISITION)]["accuracy"].mean()}


def _mce(table: pd.DataFrame, reference: pd.DataFrame, names) -> float:
    """mean over corruptions of sum_s err / sum_s err(reference) (ImageNet-C's mCE, ERM as the reference)."""
    def errors(t):
        t = t[(t["severity"] > 0) & t["corruption"].isin(names)]
        return (1 - t["accuracy"]).groupby(t["corruption"]).sum()

    mine, ref = errors(table), errors(reference)
    ratio = (mine / ref.where(ref > 1e-12)).dropna()
    return float(ratio.mean()) if len(ratio) else math.nan


def collect_rows(specs: list[RunSpec], settings: EvalSettings) -> pd.DataFrame:
    """One row per finished run (evaluated, corruptions scored) with the corruption columns, mCE against ERM of
    the same seed and the OOD mean; unfinished runs are left out."""
    rows, tables = [], {}
    for spec in specs:
        record = _read_json(settings.eval_file(spec.run_dir))
        corr_file = settings.corruption_file(spec.run_dir)
        if record is None or record.get("settings") != settings.to_dict() or not corr_file.exists():
            continue
        tables[(spec.name, spec.seed)] = pd.read_csv(corr_file)
        rows.append({**record["row"], "run_dir": str(spec.run_dir), **_corruption_means(tables[(spec.name,
                                                                                                 spec.seed)])})
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    reference = {s.name: s.reference for s in specs}
    for col, names in (("mce_cap15", CAP_IMAGENET_C), ("mce_ct", CT_PHYSICS), ("mce_all", CORRUPTIONS)):
        frame[col] = [(_mce(tables[(n, s)], tables[(reference[n], s)], names) if (reference[n], s) in tables
                       else math.nan) for n, s in zip(frame["name"], frame["seed"])]
    ood_cols = [f"{d}_accuracy" for d in domains_of(frame)]
    frame["ood_mean_accuracy"] = frame[ood_cols + ["corruption_cap15"]].mean(axis=1)
    return frame


def domains_of(runs: pd.DataFrame) -> list[str]:
    """The other-site domains of the per-run rows, in order of first appearance."""
    names = [d for text in runs.get("domains", pd.Series(dtype=str)).fillna("") for d in str(text).split(",")]
    return list(dict.fromkeys(d for d in names if d))


# The columns each result file must have (others, such as one set per other-site domain, may follow).
SCHEMA = {
    "runs.csv": ("name", "method", "seed", "checkpoint", "selected_epoch", "test_n", "clean_accuracy", "clean_auc",
                 "clean_sensitivity", "clean_specificity", "train_eps", "pgd10_train_eps", "pgd10_8_255",
                 "ensemble_train_eps", "ensemble_8_255", "ensemble_n", "ensemble", "domains", "corruption_cap15",
                 "corruption_ct", "corruption_all", "mce_cap15", "mce_ct", "mce_all", "ood_mean_accuracy",
                 "train_minutes"),
    "table.csv": ("name", "method", "metric", "label", "mean", "ci_low", "ci_high", "std", "n_seeds", "seeds"),
    "gains.csv": ("metric", "comparator", "best_prior", "best_prior_mean", "method", "method_mean", "gain_mean",
                  "gain_ci_low", "gain_ci_high", "n_pairs", "seeds"),
    "verdicts.csv": ("claim", "metric", "claimed_gain", "comparator", "comparator_method", "gain_mean",
                     "gain_ci_low", "gain_ci_high", "n_pairs", "verdict", "rule", "primary"),
    "ensemble_check.csv": ("run", "condition", "attack", "eps", "n", "accuracy", "ensemble_at_least_as_strong"),
}


RESULTS_URL = "https://raw.githubusercontent.com/robustmed-lite/robustmed-lite/main/results"


def find_results(profile: str = "cpu", study: str = "reproduction", names=None, download: bool = True) -> Path:
    """The committed results of a study and profile (``results/<study>/<profile>``): in this checkout (found
    from the working directory or the package's own folder), else downloaded from the repository on GitHub
    (Colab, where the package is installed without the repository) into the cache.

    Args:
        profile: ``cpu``, ``gpu`` or ``paper``.
        study: ``reproduction`` or ``sites``.
        names: Files to download (default: the reproduction's ``SCHEMA`` files and ``table.md``).
        download: Fall back to the download.

    Raises:
        FileNotFoundError: Neither present nor downloadable; the message says how to get them.
    """
    names = list(names or (*SCHEMA, "table.md", "profile.json", "environment.json"))
    relative = Path("results") / study / profile
    for base in (Path.cwd(), *Path.cwd().parents, Path(__file__).resolve().parents[1]):
        if all((base / relative / name).exists() for name in names[:1]):
            return base / relative
    if download:
        import urllib.request

        from .data import default_cache_dir

        dest = default_cache_dir() / "results" / study / profile
        dest.mkdir(parents=True, exist_ok=True)
        try:
            for name in names:
                urllib.request.urlretrieve(f"{RESULTS_URL}/{study}/{profile}/{name}", dest / name)
            return dest
        except OSError as err:
            command = {"reproduction": "reproduce"}.get(study, study)
            raise FileNotFoundError(f"no {relative} here and the download failed ({err}). Fix: clone the "
                                    f"repository, or run python -m robustmed_lite {command}") from err
    raise FileNotFoundError(f"no {relative} found: clone the repository or run the {study} command")


def check_results(folder: str | Path, schema: dict | None = None) -> dict[str, pd.DataFrame]:
    """Reads a reproduction's result files and checks their columns against ``schema`` (default ``SCHEMA``).

    Raises:
        FileNotFoundError: A file is missing (the message names it and the command that writes it).
        ValueError: A file lacks columns (named).
    """
    folder = Path(folder)
    frames = {}
    for name, columns in (SCHEMA if schema is None else schema).items():
        path = folder / name
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: run python -m robustmed_lite reproduce --out {folder}")
        frames[name] = pd.read_csv(path)
        missing = [c for c in columns if c not in frames[name]]
        if missing:
            raise ValueError(f"{path} lacks the columns {missing}: it was written by another version; run the "
                             "reproduction again")
    return frames


@dataclass(frozen=True)
class Metric:
    column: str
    label: str
    higher_is_better: bool = True


def metrics_of(runs: pd.DataFrame) -> list[Metric]:
    """The summary's metrics, in table order (domain columns as found)."""
    fixed = [Metric("clean_accuracy", "natural accuracy"), Metric("clean_auc", "AUC"),
             Metric("clean_sensitivity", "sensitivity"), Metric("clean_specificity", "specificity")]
    for kind, label in (("pgd10", "PGD-10"), ("ensemble", "ensemble")):
        for key, eps in (("train_eps", "train eps"), ("8_255", "8/255")):
            if f"{kind}_{key}" in runs:
                fixed.append(Metric(f"{kind}_{key}", f"{label} @ {eps}"))
    fixed += [Metric("corruption_cap15", "corruptions, CAP's 15 ImageNet-C types"),
              Metric("corruption_ct", "corruptions, CT physics"), Metric("corruption_all", "corruptions, all"),
              Metric("mce_cap15", "mCE vs ERM, CAP's 15", False), Metric("mce_ct", "mCE vs ERM, CT physics", False),
              Metric("mce_all", "mCE vs ERM, all", False)]
    for domain in domains_of(runs):
        for adapted in ("", "_adabn", "_tent"):
            for suffix, label in (("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy"),
                                  ("auc", "AUC")):
                fixed.append(Metric(f"{domain}{adapted}_{suffix}",
                                    f"{domain}{adapted.replace('_', ' + ')}: {label}"))
    fixed += [Metric("ood_mean_accuracy", "OOD mean (other sites + CAP's 15 corruptions)"),
              Metric("train_minutes", "train minutes", False)]
    return [m for m in fixed if m.column in runs]


def summarise(runs: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """table (mean, t-interval per row name and metric), gains (over the best prior method and the best prior
    defence, paired by seed) and verdicts (the claims) from the per-run rows."""
    metrics = metrics_of(runs)
    table = []
    for name, group in runs.groupby("name", sort=False):
        for m in metrics:
            iv = t_interval(group[m.column])
            table.append({"name": name, "method": group["method"].iloc[0], "metric": m.column, "label": m.label,
                          "mean": iv.mean, "ci_low": iv.low, "ci_high": iv.high, "std": iv.std, "n_seeds": iv.n,
                          "seeds": ",".join(str(s) for s in sorted(group["seed"]))})
    table = pd.DataFrame(table)
    gains, verdicts = [], []
    prior = [n for n in runs["name"].unique() if n in METHODS and n not in PAPER_METHODS]
    comparators = {"best prior method": prior, "best prior defence": [n for n in prior if n != "erm"]}
    if THE_METHOD in set(runs["name"]):
        ours = runs[runs["name"] == THE_METHOD]
        for m in metrics:
            for comparator, pool in comparators.items():
                means = table[(table["metric"] == m.column) & table["name"].isin(pool)].set_index("name")["mean"]
                means = means.dropna()
                if means.empty:
                    continue
                best = means.idxmax() if m.higher_is_better else means.idxmin()
                theirs = runs[runs["name"] == best]
                diffs = paired_differences(dict(zip(ours["seed"], ours[m.column])),
                                           dict(zip(theirs["seed"], theirs[m.column])))
                sign = 1.0 if m.higher_is_better else -1.0
                iv = t_interval([sign * d for d in diffs.values()])
                gains.append({"metric": m.column, "label": m.label, "comparator": comparator, "best_prior": best,
                              "best_prior_mean": means[best], "method": THE_METHOD,
                              "method_mean": float(ours[m.column].mean()), "gain_mean": iv.mean,
                              "gain_ci_low": iv.low, "gain_ci_high": iv.high, "n_pairs": iv.n,
                              "seeds": ",".join(str(s) for s in diffs)})
        gain_frame = pd.DataFrame(gains)
        for claim in CLAIMS:
            for comparator in comparators:
                match = gain_frame[(gain_frame["metric"] == claim.metric) & (gain_frame["comparator"] == comparator)] \
                    if len(gain_frame) else gain_frame
                if match.empty:
                    continue
                g = match.iloc[0]
                iv = Interval(g["gain_mean"], g["gain_ci_low"], g["gain_ci_high"], int(g["n_pairs"]), math.nan)
                verdicts.append({"claim": claim.name, "metric": claim.metric, "claimed_gain": claim.gain,
                                 "comparator": comparator, "comparator_method": g["best_prior"],
                                 "gain_mean": g["gain_mean"], "gain_ci_low": g["gain_ci_low"],
                                 "gain_ci_high": g["gain_ci_high"], "n_pairs": int(g["n_pairs"]),
                                 "verdict": verdict(iv, claim.gain), "rule": VERDICT_RULE,
                                 "primary": comparator == "best prior defence", "claim_source": claim.source})
    return {"table": table, "gains": pd.DataFrame(gains), "verdicts": pd.DataFrame(verdicts)}


def _markdown(runs: pd.DataFrame, summary: dict, header: dict) -> str:
    table, gains, verdicts = summary["table"], summary["gains"], summary["verdicts"]
    lines = [f"# Reproduction, profile `{header['profile']}`", ""]
    lines += [f"- {k}: {v}" for k, v in header.items() if k != "profile"]
    lines += ["", "Mean ± half-width of the 95% t-interval over seeds (n_seeds per row in `table.csv`).", ""]
    shown = [m for m in metrics_of(runs) if m.column in set(table["metric"])]
    names = list(dict.fromkeys(table["name"]))
    lines.append("| metric | " + " | ".join(names) + " |")
    lines.append("| --- | " + " | ".join("---" for _ in names) + " |")
    for m in shown:
        cells = []
        for name in names:
            r = table[(table["name"] == name) & (table["metric"] == m.column)]
            if r.empty or math.isnan(r["mean"].iloc[0]):
                cells.append("n/a")
            else:
                r = r.iloc[0]
                half = (r["ci_high"] - r["ci_low"]) / 2
                cells.append(f"{r['mean']:.3f}" + ("" if math.isnan(half) else f" ± {half:.3f}"))
        lines.append(f"| {m.label} | " + " | ".join(cells) + " |")
    if len(verdicts):
        lines += ["", "## The paper's claims", "", VERDICT_RULE, "",
                  "| claim | comparator | gain (95% CI) | verdict |", "| --- | --- | --- | --- |"]
        for _, v in verdicts.iterrows():
            lines.append(f"| {v['claim']} | {v['comparator']} ({v['comparator_method']}) | {v['gain_mean']:+.3f} "
                         f"[{v['gain_ci_low']:+.3f}, {v['gain_ci_high']:+.3f}], n = {v['n_pairs']} | "
                         f"**{v['verdict']}** |")
    if len(gains):
        lines += ["", f"## Paired gain of `{THE_METHOD}` over the best prior defence, per metric", "",
                  "| metric | best prior defence | gain (95% CI) |", "| --- | --- | --- |"]
        for _, g in gains[gains["comparator"] == "best prior defence"].iterrows():
            lines.append(f"| {g['label']} | {g['best_prior']} | {g['gain_mean']:+.3f} [{g['gain_ci_low']:+.3f}, "
                         f"{g['gain_ci_high']:+.3f}] |")
    return "\n".join(lines) + "\n"


def write_summary(runs: pd.DataFrame, out: Path, header: dict) -> dict[str, pd.DataFrame]:
    """runs.csv, table.csv, gains.csv, verdicts.csv, table.md and the figures, in ``out``."""
    from .figures import plot_reproduction_bars, plot_robust_vs_clean

    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(runs)
    runs.to_csv(out / "runs.csv", index=False)
    for key, frame in summary.items():
        frame.to_csv(out / f"{key}.csv", index=False)
    (out / "table.md").write_text(_markdown(runs, summary, header))
    import matplotlib.pyplot as plt

    for name, fig in (("metrics.png", plot_reproduction_bars(summary["table"])),
                      ("robust_vs_clean.png", plot_robust_vs_clean(runs))):
        fig.savefig(out / name, dpi=120, bbox_inches="tight")
        plt.close(fig)
    return summary


# ---------------------------------------------------------------------------------------------- the driver
def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def default_data() -> tuple[str, list[str]]:
    """The Soares folder and the UCSD folder beside it, from ``ROBUSTMED_DATA`` or ``../shared/data``."""
    root = find_shared_data()
    if root is None or not (root / "sarscov2").is_dir():
        raise DataError("no --data given and no real CT found (ROBUSTMED_DATA or ../shared/data/sarscov2). Fix: "
                        "pass --data with the SARS-CoV-2 folder (COVID/, non-COVID/; download it with "
                        "robustmed_lite.data.download_sarscov2) and --ood_data with other sites")
    ood = [str(root / "ucsd_covidct")] if (root / "ucsd_covidct").is_dir() else []
    return str(root / "sarscov2"), ood


def check_paths(data: str, ood_data, covid19c: str | None) -> None:
    """Clear errors for folders that do not exist, before anything is planned or trained."""
    if data != "phantom" and not Path(data).exists():
        raise FileNotFoundError(f"--data {data} does not exist. Fix: pass the folder holding the training slices "
                                "(e.g. the Kaggle COVID/ and non-COVID/ folders)")
    for spec in ood_data:
        if not Path(split_spec(spec)[0]).exists():
            raise FileNotFoundError(f"--ood_data {spec} does not exist. Fix: pass existing folders of other sites "
                                    "(e.g. UCSD COVID-CT; folder:test for one split of it), or leave --ood_data out")
    if covid19c and not Path(covid19c).is_dir():
        raise FileNotFoundError(f"--covid19c {covid19c} is not a folder. Fix: pass the COVID19-C root or leave "
                                "it out")


def check_classes(data: str, img_size: int) -> None:
    """Training data must hold both classes (misnamed folders would otherwise train a one-class model)."""
    if data == "phantom":
        return
    labels = load_images(data, img_size, progress=False).labels
    present = sorted(set(labels.tolist()))
    if present != [0, 1]:
        names = {0: "non-COVID", 1: "COVID"}
        raise DataError(f"--data {data} holds only {', '.join(names[p] for p in present)} images ({len(labels)}): "
                        "a reproduction trains COVID vs non-COVID and needs both classes. Fix: check the class "
                        "folder names (COVID/, non-COVID/ or the aliases in the README)")


class _ProgressPoller:
    """One bar over all runs, fed by a thread that reads the run directories (epochs logged, evaluations
    written). Epochs are weighted by their cost in forward-backward passes (an ERM epoch 1, a robust epoch with
    k attack steps k + 3) and an evaluation by a few robust epochs, so that the ETA means something."""

    EVAL_WEIGHT = 6

    def __init__(self, specs: list[RunSpec], settings: EvalSettings, enabled: bool):
        self.items, self.settings = [], settings
        for spec in specs:
            cfg = spec.config()
            self.items.append((spec, cfg.epochs, 1 if cfg.attack == "none" else cfg.attack_steps + 3))
        total = sum(e * w + self.EVAL_WEIGHT for _, e, w in self.items)
        self.bar = tqdm(total=total, initial=self._done()[0], desc="reproduction", unit="work",
                        bar_format="{l_bar}{bar}| {percentage:3.0f}% [{elapsed}<{remaining}] {postfix}",
                        **progress_options(enabled))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _done(self) -> tuple[int, int, int]:
        work = epochs = runs = 0
        for spec, n_epochs, weight in self.items:
            e = min(_finished_epochs(spec.run_dir), n_epochs)
            evaluated = self.settings.eval_file(spec.run_dir).exists()
            work += e * weight + self.EVAL_WEIGHT * evaluated
            epochs, runs = epochs + e, runs + evaluated
        return work, epochs, runs

    def refresh(self) -> None:
        work, epochs, runs = self._done()
        self.bar.set_postfix_str(f"runs {runs}/{len(self.items)}, epochs {epochs}/"
                                 f"{sum(e for _, e, _ in self.items)}", refresh=False)
        self.bar.update(max(0, work - self.bar.n))

    def _loop(self) -> None:
        while not self._stop.wait(2.0):
            self.refresh()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.refresh()
        self.bar.close()


def _execute(specs: list[RunSpec], settings: EvalSettings, jobs: int) -> list[tuple[str, BaseException]]:
    """Runs the tasks, ``jobs`` at a time; a robust run starts once its clean run finished (within a shard).
    Returns the failures (name, error); runs already started finish, no new run starts after a failure."""
    failures = []
    if jobs <= 1:
        for spec in specs:
            try:
                _task(spec, settings, None)
            except Exception as err:  # noqa: BLE001 - reported with the run's name, then re-raised by the caller
                failures.append((f"{spec.name}-seed{spec.seed}", err))
                break
        return failures
    threads = max(1, torch.get_num_threads() // jobs)
    pending, running = list(specs), {}
    own = {s.run_dir / "best_clean.pt": s for s in specs if s.init_from is None}
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
        while pending or running:
            ready = [s for s in pending if s.init_from is None or s.init_from not in own
                     or own[s.init_from] not in pending and own[s.init_from] not in running.values()]
            while ready and len(running) < jobs and not failures:
                spec = ready.pop(0)
                pending.remove(spec)
                running[pool.submit(_task, spec, settings, threads)] = spec
            if not running:
                break
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in done:
                spec = running.pop(future)
                try:
                    future.result()
                except Exception as err:  # noqa: BLE001
                    failures.append((f"{spec.name}-seed{spec.seed}", err))
            if failures:
                pending.clear()
    return failures


def reproduce(profile: str | Profile = "cpu", data: str | None = None, ood_data=None, covid19c: str | None = None,
              methods=None, seeds=DEFAULT_SEEDS, out: str | Path | None = None, runs: str | Path | None = None,
              shard: str | None = None, jobs: int | None = None, overrides: dict | None = None,
              variants: dict[str, dict] | None = None, ensemble_n: int | None | str = "profile",
              adapt_methods=(), corruption_n: int | None | str = "profile", progress: bool = True,
              command: list[str] | None = None) -> dict[str, pd.DataFrame]:
    """Trains, evaluates and summarises a reproduction (see the module docstring).

    With ``jobs > 1`` the runs train in spawned processes: a script that calls this needs the usual
    ``if __name__ == "__main__":`` guard (the command line has it).

    Args:
        profile: ``cpu``, ``gpu``, ``paper`` or a ``Profile``.
        data: Training set root (default: ``default_data()``), or ``"phantom"`` (for tests and demos).
        ood_data: Other-site roots, each its own domain (default with ``data=None``: UCSD beside the Soares set).
        covid19c: A COVID19-C root, its subsets added as domains.
        methods: Names (default all nine of ``config.METHODS``).
        seeds: Training seeds, e.g. ``(0, 1, 2)`` or ``"0,1,2"``.
        out: Results folder (default ``results/reproduction/<profile>``).
        runs: Run directories (default ``runs/reproduction/<profile>``).
        shard: ``"i/n"``: train only this shard's runs; the summary merges whatever has finished.
        jobs: Runs at once (default: the profile's).
        overrides: TrainConfig overrides for every run (e.g. ``{"epochs": 2}``).
        variants: Extra rows, name -> overrides with a ``method`` (see ``parse_variant``).
        ensemble_n: Images attacked by the ensemble (None: all; 0: none; default: the profile's).
        adapt_methods: Test-time adaptations (``adabn``, ``tent``) also evaluated on every other-site domain.
        corruption_n: Test images scored under the corruptions (None: all; default: the profile's).
        progress: Progress bars.
        command: The command line to record (default ``sys.argv``).

    Returns:
        ``{"runs", "table", "gains", "verdicts"}`` DataFrames (the same as the CSVs written).
    """
    if isinstance(profile, str) and profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}: choose one of {', '.join(PROFILES)}")
    prof = PROFILES[profile] if isinstance(profile, str) else profile
    methods = parse_methods(methods)
    seeds = parse_seeds(seeds)
    shard_i_n = parse_shard(shard)
    if data is None:
        data, found_ood = default_data()
        ood_data = found_ood if ood_data is None else ood_data
    ood_data = [str(Path(p)) for p in (ood_data or [])]
    data = data if data == "phantom" else str(Path(data))
    out = Path(out or f"results/reproduction/{prof.name}")
    runs_root = Path(runs or f"runs/reproduction/{prof.name}")
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    check_paths(data, ood_data, covid19c)
    plan = build_plan(prof, data, methods, seeds, runs_root, overrides, variants)
    base_cfg = plan[0].config()
    for spec in plan:
        check_existing(spec)
    check_classes(data, base_cfg.img_size)
    n_ens = prof.ensemble_n if ensemble_n == "profile" else ensemble_n
    n_corr = prof.corruption_n if corruption_n == "profile" else corruption_n
    unknown = [m for m in adapt_methods if m not in ("adabn", "tent")]
    if unknown:
        raise ValueError(f"unknown test-time adaptation {unknown}: choose adabn or tent")
    settings = EvalSettings(tuple(sorted({base_cfg.eps, EIGHT})), n_ens, prof.apgd_steps, prof.fab_steps,
                            prof.square_queries, tuple(ood_data), covid19c, tuple(adapt_methods), n_corr)
    mine = shard_of(plan, shard_i_n)
    jobs = prof.jobs if jobs is None else int(jobs)
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    if not torch.cuda.is_available():
        jobs = min(jobs, os.cpu_count() or 1)  # on a CPU a process per core at most
    out.mkdir(parents=True, exist_ok=True)
    _record_provenance(out, prof, plan, settings, command, shard_i_n, jobs)

    with _ProgressPoller(mine, settings, progress):
        failures = _execute(mine, settings, jobs)
    finished = [s for s in mine if settings.eval_file(s.run_dir).exists()]
    corruption_stage(finished, settings, progress=progress)
    results = _finish(plan, settings, out, prof, ood_data, covid19c)
    if failures:
        name, err = failures[0]
        raise RuntimeError(f"run {name} failed ({type(err).__name__}: {err}); the summary holds the "
                           f"{len(results['runs'])} runs that finished. Fix the cause and call again: finished "
                           "runs are reused") from err
    return results


def _record_provenance(out: Path, prof: Profile, plan: list[RunSpec], settings: EvalSettings, command,
                       shard, jobs: int) -> None:
    command = command if command is not None else [Path(sys.executable).name, "-m", "robustmed_lite",
                                                    *sys.argv[1:]]
    with open(out / "commands.txt", "a") as f:
        f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}  shard {shard[0]}/{shard[1]}  jobs {jobs}  "
                f"{shlex.join(str(c) for c in command)}\n")
    env = {"environment": environment_info(), "git_commit": _git_commit(), "cpu_count": os.cpu_count(),
           "recorded": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    _write_json(out / "environment.json", env)
    base = plan[0].config().to_dict()
    _write_json(out / "profile.json", {"profile": dataclasses.asdict(prof), "evaluation": settings.to_dict(),
                                       "base_config": base,
                                       "runs": [{"name": s.name, "seed": s.seed, "run_dir": str(s.run_dir),
                                                 "init_from": str(s.init_from) if s.init_from else None}
                                                for s in plan]})


def _finish(plan, settings, out: Path, prof: Profile, ood_data, covid19c) -> dict[str, pd.DataFrame]:
    runs = collect_rows(plan, settings)
    if runs.empty:
        return {"runs": runs, "table": pd.DataFrame(), "gains": pd.DataFrame(), "verdicts": pd.DataFrame()}
    check = out / "ensemble_check.csv"
    done = [s for s in plan if settings.eval_file(s.run_dir).exists()]
    chosen = next((s for s in done if s.name == THE_METHOD), next((s for s in done if s.method != "erm"), None))
    if chosen is not None and settings.ensemble_n != 0:
        previous = pd.read_csv(check) if check.exists() else None
        wanted = json.dumps(settings.to_dict())
        if previous is None or previous["settings"].iloc[0] != wanted:
            ensemble_check(chosen, settings).assign(settings=wanted).to_csv(check, index=False)
    cfg = plan[0].config()
    header = {"profile": prof.name, "data": cfg.data, "other sites": ", ".join(ood_data) or "none",
              "COVID19-C": covid19c or "none", "model": f"{cfg.model}, {cfg.img_size} px, {cfg.epochs} epochs",
              "training eps": format_eps(cfg.eps) + ("" if abs(cfg.eps * 255 - round(cfg.eps * 255)) < 1e-4
                                                     else f" (= {cfg.eps:g})"),
              "two stages (robust runs start from the clean run)": prof.two_stage,
              "runs summarised": f"{len(runs)} of {len(plan)}",
              "seeds": ", ".join(str(s) for s in sorted(runs["seed"].unique())),
              "test images": int(runs["test_n"].iloc[0]),
              "ensemble": (f"{runs['ensemble'].iloc[0]}, on {int(runs['ensemble_n'].iloc[0])} test images "
                           "(seeded, stratified)") if settings.ensemble_n != 0 else "not run",
              "corruptions": "every test image" if settings.corruption_n is None else
                             f"{settings.corruption_n} test images (seeded, stratified)",
              "test-time adaptation": ", ".join(settings.adapt) or "none",
              "checkpoints": "chosen on validation (ERM: best clean, others: best PGD)"}
    summary = write_summary(runs, out, header)
    return {"runs": runs, **summary}
