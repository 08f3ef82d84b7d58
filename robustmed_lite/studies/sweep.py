"""The weight-noise scale chosen on validation: does each method's published ``gamma`` hold at this scale?

    python -m robustmed_lite sweep --profile cpu --methods robustmed,awp --seeds 0-2

Each method trains at ``GAMMAS`` (CAP's published 1e-4, TRADES-AWP's 5e-3, and 1e-3 between them), so each
method's published value is one of three. A row at the published value is the method itself (named as in the
reproduction); the others are variants named ``<method>+gamma<value>``. Every run's checkpoint is chosen on
validation as in the reproduction (best PGD accuracy), and the value with the highest mean validation PGD
accuracy over seeds is chosen (ties go to the published value). Nothing here reads the test split: the
reproduction then evaluates the chosen value as an extra row (``reproduce --variant``), beside the published one.

The runs live in the reproduction's run folder by default, so its clean (ERM) runs and its rows at the published
values are reused, not trained again; a run that another study trains at the same moment is waited for.

Writes ``runs.csv`` (per run: the validation metrics of its chosen checkpoint), ``choice.csv`` (per method and
value: mean and 95% t-interval over seeds, the published value, the chosen one), the provenance
(``environment.json``, ``profile.json``, ``commands.txt``, ``timings.json``) and ``README.md``.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import pandas as pd

from ..checkpoints import load_checkpoint, selected_checkpoint_name
from ..config import method_setting
from ..data.preprocess import resolve_spec
from ..evaluation.stats import t_interval
from .plan import DEFAULT_SEEDS, PROFILES, RunSpec, build_plan, parse_methods, parse_seeds
from .reproduce import (
    ProgressPoller,
    check_classes,
    check_existing,
    check_paths,
    default_data,
    execute,
    record_provenance,
    record_timing,
)
from .run_evaluation import selected_validation
from .writeup import write_writeup

GAMMAS = (1e-4, 1e-3, 5e-3)
SWEPT_METHODS = ("robustmed", "awp")


def published_gamma(method: str, epochs: int) -> float:
    """The scale ``method`` trains with when nobody sets it (``config.PUBLISHED_SETTINGS``)."""
    return float(method_setting(method, "gamma", method, epochs, 0.0))


def sweep_rows(methods, epochs: int, gammas=GAMMAS) -> tuple[list[str], dict[str, dict]]:
    """The rows: ``erm`` (the clean stage) and each method at its published value, and the variants at the other
    values, ``<method>+gamma<value>``."""
    variants = {}
    for method in methods:
        published = published_gamma(method, epochs)
        for gamma in gammas:
            if not math.isclose(gamma, published):
                variants[f"{method}+gamma{gamma:g}"] = {"method": method, "gamma": gamma}
    return ["erm", *methods], variants


def validation_row(spec: RunSpec) -> dict:
    """One run's validation metrics at the epoch of its chosen checkpoint (no test image is read)."""
    checkpoint = spec.run_dir / selected_checkpoint_name(spec.method)
    history = [json.loads(line) for line in (spec.run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    epoch = int(load_checkpoint(checkpoint)["epoch"])
    cfg = spec.config()
    return {
        "name": spec.name,
        "method": spec.method,
        "seed": spec.seed,
        "gamma": cfg.gamma,
        "checkpoint": checkpoint.name,
        "selected_epoch": epoch,
        "epochs": cfg.epochs,
        **selected_validation(history, epoch),
        "run_dir": str(spec.run_dir),
    }


def choose(runs: pd.DataFrame, published: dict[str, float]) -> pd.DataFrame:
    """Per method and gamma: validation means and 95% t-intervals over seeds; ``chosen`` marks the value with the
    highest mean validation PGD accuracy (a tie within 1e-9 goes to the published value)."""
    rows = []
    for (method, gamma), group in runs.groupby(["method", "gamma"], sort=True):
        robust, clean = t_interval(group["val_robust"]), t_interval(group["val_clean"])
        rows.append(
            {
                "method": method,
                "gamma": gamma,
                "published": math.isclose(gamma, published[method]),
                "n_seeds": robust.n,
                "val_robust_mean": robust.mean,
                "val_robust_ci_low": robust.low,
                "val_robust_ci_high": robust.high,
                "val_clean_mean": clean.mean,
                "val_clean_ci_low": clean.low,
                "val_clean_ci_high": clean.high,
            }
        )
    choice = pd.DataFrame(rows)
    choice["chosen"] = False
    for _, group in choice.groupby("method"):
        tied = group[group["val_robust_mean"] >= group["val_robust_mean"].max() - 1e-9]
        pick = tied[tied["published"]].index if tied["published"].any() else tied.index[:1]
        choice.loc[pick, "chosen"] = True
    return choice


def run_sweep(
    profile: str = "cpu",
    data: str | None = None,
    methods=SWEPT_METHODS,
    seeds=DEFAULT_SEEDS,
    out: str | Path | None = None,
    runs: str | Path | None = None,
    jobs: int | None = None,
    overrides: dict | None = None,
    progress: bool = True,
    command: list[str] | None = None,
) -> pd.DataFrame:
    """Trains (or reuses) every (method, gamma, seed) run, reads each run's validation metrics and writes the
    choice (see the module docstring).

    Returns:
        ``choice.csv``'s table.
    """
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}: choose one of {', '.join(PROFILES)}")
    prof = PROFILES[profile]
    methods, seeds = parse_methods(methods), parse_seeds(seeds)
    unknown = [m for m in methods if m not in SWEPT_METHODS]
    if unknown:
        raise ValueError(f"the sweep covers the methods with weight noise ({', '.join(SWEPT_METHODS)}), not {unknown}")
    data = default_data()[0] if data is None else data
    data = data if data == "phantom" else resolve_spec(data)  # absolute, as the reproduction's runs record it
    suffix = "-phantom" if data == "phantom" else ""
    out = Path(out or f"results/sweep/{prof.name}{suffix}")
    runs_root = Path(runs or f"runs/reproduction/{prof.name}{suffix}").resolve()
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    check_paths(data, [], None)
    epochs = int({**prof.train, **overrides}.get("epochs", 10))
    base_rows, variants = sweep_rows(methods, epochs)
    plan = build_plan(prof, data, base_rows, seeds, runs_root, overrides, variants)
    # The rows at the published values last: a reproduction sharing the run folder has often trained them by then.
    plan.sort(key=lambda s: (s.init_from is not None, s.name in methods, s.seed))
    for spec in plan:
        check_existing(spec)
    check_classes(data, plan[0].config().img_size)
    jobs = min(prof.jobs if jobs is None else int(jobs), os.cpu_count() or 1)
    out.mkdir(parents=True, exist_ok=True)
    record_provenance(out, prof, plan, None, command, (1, 1), jobs)
    clock = {"start": time.time()}
    with ProgressPoller(plan, None, progress, desc="sweep"):
        failures = execute(plan, None, jobs)
    if failures:
        name, err = failures[0]
        raise RuntimeError(f"run {name} failed ({type(err).__name__}: {err}). Fix the cause and call again") from err
    clock["trained"] = clock["corrupted"] = time.time()
    runs_table = pd.DataFrame([validation_row(s) for s in plan if s.method != "erm"])
    runs_table.to_csv(out / "runs.csv", index=False)
    choice = choose(runs_table, {m: published_gamma(m, epochs) for m in methods})
    choice.to_csv(out / "choice.csv", index=False)
    record_timing(out, clock, (1, 1), jobs, len(plan), len(plan))
    write_writeup(out, "sweep", machine_folder=out.resolve())
    return choice
