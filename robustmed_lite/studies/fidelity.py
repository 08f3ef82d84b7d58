"""Does following CAP's code change the results? The measurements behind the defaults of ``cap`` and ``robustmed``.

    python -m robustmed_lite fidelity --profile cpu                  # Soares, 3 seeds -> results/fidelity/cpu
    python -m robustmed_lite fidelity --profile cpu --data phantom   # the phantom -> results/fidelity/cpu-phantom
                                                                     # (the rows of PHANTOM_ROWS)
    python -m robustmed_lite fidelity --profile cpu --rows awp,awp+warmup --out results/fidelity/cpu-awp
                                                                     # some rows only, into their own folder

Every row is a reproduction variant (``reproduce.py``: the same runs, reuse, resumption and per-run rows, in their
own run folder ``runs/fidelity/<profile>``), and every comparison is a paired per-seed difference with a 95%
t-interval, on the in-domain test split (checkpoints chosen on validation, as everywhere):

* **before and after:** ``cap`` and ``robustmed`` as CAP's code trains them (the defaults: CAP's prior view, the
  stateful AdamW proxy, the gradient through the soft target) against the package's former defaults (``*_v0``:
  the earlier prior view, the stateless SGD proxy, the stop-gradient);
* **one change at a time** on ``robustmed``: each of the three reverted alone;
* **the two readings of the abstract** (``weight_feedback``, ``prior_samples``) against ``robustmed``;
* **AWP against TRADES** (item 7 of the fidelity issue): ``awp`` as configured (AWP's own gamma and warm-up, the
  warm-up scaled to the run, unless the preset sets one), with twice its clean epochs before the noise starts
  (``awp+warmup``, at least one clean epoch: always longer than ``awp``'s), and with a smaller gamma.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..config import load_config, method_setting
from ..evaluation.stats import paired_gain
from .plan import PROFILES
from .reproduce import reproduce
from .writeup import write_writeup

FORMER = {"prior_view": "package", "proxy_optimizer": "sgd", "target_grad": False}  # the package's former defaults
READINGS = {"weight_feedback": {"weight_feedback": True}, "prior_samples": {"prior_samples": 0.5}}


def variants(epochs: int, awp_warmup: int | None = None) -> dict[str, dict]:
    """The study's extra rows (name -> a method with other settings) for runs of ``epochs`` epochs.

    Args:
        awp_warmup: The first epoch with noise (from 1) that ``awp`` trains with in the study (its preset's, else
            AWP's scaled to ``epochs``): ``awp+warmup`` doubles its clean epochs.
    """
    if awp_warmup is None:
        awp_warmup = method_setting("awp", "weight_noise_warmup", "awp", epochs, 0.0)
    clean = max(1, 2 * (awp_warmup - 1))
    rows = {f"{m}_v0": {"method": m, **FORMER} for m in ("cap", "robustmed")}
    rows.update({f"robustmed-{key}": {"method": "robustmed", key: value} for key, value in FORMER.items()})
    rows.update({f"robustmed+{name}": {"method": "robustmed", **s} for name, s in READINGS.items()})
    rows["awp+warmup"] = {"method": "awp", "weight_noise_warmup": clean + 1}
    rows["awp+gamma1e-3"] = {"method": "awp", "gamma": 1e-3}
    return rows


# The phantom answers the phantom questions (before/after, the proxy optimiser, the two readings) with the
# rows they need; AWP against TRADES is a question about real CT, and the reverts of the prior view and the
# soft-target gradient are diagnostics of the real-CT table, so the phantom study leaves them out (a third of the
# runs of the full list).
PHANTOM_ROWS = (
    "cap_v0",
    "robustmed_v0",
    "robustmed-proxy_optimizer",
    "robustmed+weight_feedback",
    "robustmed+prior_samples",
)
PHANTOM_METHODS = "cap,robustmed"


def comparisons() -> list[tuple[str, str, str]]:
    """(group, row, reference): each a paired difference row minus reference."""
    out = [("before -> after", m, f"{m}_v0") for m in ("cap", "robustmed")]
    out += [("one change reverted", f"robustmed-{key}", "robustmed") for key in FORMER]
    out += [("reading of the abstract", f"robustmed+{name}", "robustmed") for name in READINGS]
    out += [("AWP vs TRADES", row, "trades") for row in ("awp", "awp+warmup", "awp+gamma1e-3")]
    return out


METRICS = ("clean_accuracy", "pgd10_train_eps", "pgd10_8_255", "ensemble_train_eps")


def summarise_effects(runs: pd.DataFrame, pairs, metrics=METRICS) -> pd.DataFrame:
    """Paired per-seed effects, row minus reference, of each ``(group, row, reference)`` of ``pairs`` on each of
    ``metrics`` (pairs whose runs are missing are left out)."""
    rows = []
    for group, row, reference in pairs:
        for metric in metrics:
            gain = paired_gain(runs, row, reference, metric)
            if gain:
                rows.append({"group": group, "row": row, "reference": reference, "metric": metric, **gain})
    return pd.DataFrame(
        rows, columns=["group", "row", "reference", "metric", "gain_mean", "gain_ci_low", "gain_ci_high", "n_pairs"]
    )


def summarise_fidelity(runs: pd.DataFrame) -> pd.DataFrame:
    """The paired effects of ``comparisons`` on ``METRICS``."""
    return summarise_effects(runs, comparisons())


def effects_markdown(effects: pd.DataFrame, heading: str) -> str:
    """A Markdown page of ``effects``: one line per (group, row, reference), one column per metric."""
    lines = [
        f"# {heading}",
        "",
        "Paired per-seed differences (row minus reference), mean [95% t-interval], in-domain test split.",
        "",
    ]
    if effects.empty:
        return "\n".join(lines + ["(no finished pairs)"]) + "\n"
    view = effects.assign(
        effect=[
            f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}] (n={n})"
            for m, lo, hi, n in zip(
                effects["gain_mean"], effects["gain_ci_low"], effects["gain_ci_high"], effects["n_pairs"]
            )
        ]
    )
    table = view.pivot_table(
        index=["group", "row", "reference"], columns="metric", values="effect", aggfunc="first", sort=False
    ).reset_index()
    lines.append("| " + " | ".join(table.columns) + " |")
    lines.append("|" + " --- |" * len(table.columns))
    lines += ["| " + " | ".join(str(v) for v in r) + " |" for r in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def select_rows(pairs, rows: dict[str, dict], methods: str, only) -> tuple[list, dict[str, dict], str]:
    """The comparisons whose row is one of ``only``, and the variants and methods they need.

    Raises:
        ValueError: ``only`` names a row the study does not compare; the message lists the rows.
    """
    known = [row for _, row, _ in pairs]
    unknown = [row for row in only if row not in known]
    if unknown or not only:
        raise ValueError(f"--rows {','.join(only)}: the fidelity study compares the rows {', '.join(known)}")
    pairs = [p for p in pairs if p[1] in only]
    needed = {row for _, row, _ in pairs} | {reference for _, _, reference in pairs}
    methods = ",".join(m for m in methods.split(",") if m in needed)
    return pairs, {k: v for k, v in rows.items() if k in needed}, methods


def run_fidelity(
    profile: str = "cpu",
    data: str | None = None,
    overrides: dict | None = None,
    only: list[str] | None = None,
    **options,
) -> dict[str, pd.DataFrame]:
    """Trains the study's rows (see the module docstring) and writes ``effects.csv`` and ``table.md`` to ``out``
    (default ``results/fidelity/<profile>[-phantom]``).

    Args:
        profile: A reproduction profile.
        data: The training set (default: the Soares set beside the shared data; ``"phantom"`` for the phantom).
        overrides: TrainConfig overrides for every run (e.g. ``{"epochs": 2}``).
        only: Train and compare only these rows (and their references), into a folder of their own: ``out`` is
            then required, so that a part of the study never replaces the whole.
        **options: Those of ``run_paired_study`` (seeds, out, runs, jobs, progress, command). Its run folders
            are not the reproduction's, whose ``cap`` and ``robustmed`` runs were trained with the former defaults.
    """
    awp = load_config(
        PROFILES[profile].preset, {"method": "awp", **(overrides or {})}, defaults=dict(PROFILES[profile].train)
    )
    rows, methods = variants(awp.epochs, awp.weight_noise_warmup), "trades,awp,cap,robustmed"
    if data == "phantom":
        rows, methods = {k: v for k, v in rows.items() if k in PHANTOM_ROWS}, PHANTOM_METHODS
    pairs = comparisons()
    if only is not None:
        if not options.get("out"):
            raise ValueError(
                "--rows without --out would replace the whole study's folder with a part of it. Fix: pass --out, "
                "e.g. results/fidelity/cpu-awp"
            )
        pairs, rows, methods = select_rows(pairs, rows, methods, only)
    return run_paired_study(
        "fidelity",
        "Fidelity to CAP",
        pairs,
        METRICS,
        profile=profile,
        data=data,
        methods=methods,
        rows=rows,
        overrides=overrides,
        **options,
    )


def run_paired_study(
    study: str,
    heading: str,
    pairs,
    metrics,
    *,
    profile: str,
    methods: str,
    rows: dict[str, dict],
    data: str | None = None,
    seeds=(0, 1, 2),
    out: str | Path | None = None,
    runs: str | Path | None = None,
    jobs: int | None = None,
    progress: bool = True,
    command: list[str] | None = None,
    overrides: dict | None = None,
) -> dict[str, pd.DataFrame]:
    """Trains a study's methods and extra rows as reproduction runs (their folders, reuse and resumption) and
    writes the paired effects of ``pairs`` on ``metrics`` (``effects.csv``, ``table.md``) to ``out``; every
    run's row and the table of means go to its ``all_runs``.

    Args:
        study: The study's name (its results folder and write-up).
        heading: The title of ``table.md``.
        pairs: ``(group, row, reference)`` comparisons, each a paired difference row minus reference.
        metrics: The per-run columns compared.
        profile: A reproduction profile.
        methods: The methods trained, comma-separated.
        rows: The extra rows: name -> a method with other settings (``reproduce``'s variants).
        data: The training set (default: the Soares set beside the shared data; ``"phantom"`` for the phantom).
        seeds: Training seeds.
        out: Results folder (default ``results/<study>/<profile>``, ``-phantom`` appended for the phantom).
        runs: Run directories (default ``runs/fidelity/<profile>``, likewise), which the studies share.
        jobs: Runs at once.
        progress: Progress bars.
        command: The command line to record.
        overrides: TrainConfig overrides for every run (e.g. ``{"epochs": 2}``).

    Returns:
        ``{"effects", "runs", "table"}``.
    """
    prof = PROFILES[profile]
    suffix = "-phantom" if data == "phantom" else ""
    out = Path(out or f"results/{study}/{prof.name}{suffix}")
    runs = Path(runs or f"runs/fidelity/{prof.name}{suffix}")
    result = reproduce(
        profile=prof,
        data=data,
        methods=methods,
        seeds=seeds,
        out=out / "all_runs",
        runs=runs,
        jobs=jobs,
        variants=rows,
        overrides=overrides,
        progress=progress,
        command=command,
        writeup=False,
    )
    effects = summarise_effects(result["runs"], pairs, metrics)
    out.mkdir(parents=True, exist_ok=True)
    effects.to_csv(out / "effects.csv", index=False)
    title = "the phantom" if data == "phantom" else Path(str(data or "sarscov2")).name
    (out / "table.md").write_text(
        effects_markdown(effects, f"{heading}: {title}, {prof.name} profile, seeds {','.join(map(str, seeds))}")
    )
    if not effects.empty:  # a page of no finished pairs would say nothing
        write_writeup(out, study, machine_folder=out.resolve())
    return {"effects": effects, "runs": result["runs"], "table": result["table"]}
