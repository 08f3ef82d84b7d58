"""A study's summary: one row per run, the mean and 95% t-interval per row and metric, the method's paired
gain over the best prior method, and the verdicts on the paper's claims (the rule of ``stats.py``).

The comparator ("best prior method", "best prior defence") is fixed before the test split is read: the prior
method with the best mean over seeds on the validation split, at each run's selected checkpoint (validation
clean accuracy, or validation PGD accuracy for the robust metrics; the OOD data have no validation split, so the
OOD claim's comparator is chosen on validation clean accuracy). CAP is a prior method. Results written before
validation metrics were recorded fall back to the test split, and the tables say so (``chosen_on``). Each
verdict also gives the study's minimum detectable effect (80% power, ``stats.minimum_detectable_effect``).

Also the schema of the result files, with ``check_results`` to read and check them and ``find_results`` to find
the committed ones (or download them on Colab).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..config import METHODS
from ..data.augment import ACQUISITION
from ..evaluation.corruptions import CAP_IMAGENET_C, CORRUPTIONS, FAMILIES
from ..evaluation.stats import (
    VERDICT_RULE,
    Interval,
    minimum_detectable_effect,
    paired_differences,
    t_interval,
    verdict,
)
from .plan import RunSpec
from .run_evaluation import EvalSettings, read_json, selected_validation

THE_METHOD = "robustmed"  # the paper's method; every other method, CAP (its predecessor) included, is prior
# The per-run validation metrics (the selected checkpoint's epoch of the run's log) the comparators are chosen on.
VALIDATION_COLUMNS = ("val_clean", "val_robust")
MDE_POWER = 0.8
CT_PHYSICS = FAMILIES["ct_physics"]


@dataclass(frozen=True)
class Claim:
    """A claim of the paper: ``metric`` of the method beats the best prior method by ``gain``."""

    name: str
    metric: str
    gain: float
    source: str


CLAIMS = (
    Claim(
        "natural accuracy +3.4 points",
        "clean_accuracy",
        0.034,
        "Visformer on SARS-CoV-2: natural accuracy about 3.4 points above the best prior method",
    ),
    Claim(
        "OOD accuracy +25 points",
        "ood_mean_accuracy",
        0.25,
        "average out-of-distribution accuracy (cross-nation data and corruptions) about 25 points higher",
    ),
)


def _corruption_means(table: pd.DataFrame) -> dict:
    corr = table[table["severity"] > 0]
    return {
        "corruption_cap15": corr[corr["corruption"].isin(CAP_IMAGENET_C)]["accuracy"].mean(),
        "corruption_ct": corr[corr["corruption"].isin(CT_PHYSICS)]["accuracy"].mean(),
        "corruption_all": corr["accuracy"].mean(),
        # without the types that acquisition augmentation shows a model (milder) during training
        "corruption_not_augmented": corr[~corr["corruption"].isin(ACQUISITION)]["accuracy"].mean(),
    }


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
        record = read_json(settings.eval_file(spec.run_dir))
        corr_file = settings.corruption_file(spec.run_dir)
        if record is None or record.get("settings") != settings.to_dict() or not corr_file.exists():
            continue
        tables[(spec.name, spec.seed)] = pd.read_csv(corr_file)
        # An evaluation recorded before the validation metrics were: read them from the run's log.
        log = spec.run_dir / "log.jsonl"
        validation = {}
        if "val_clean" not in record["row"] and log.exists() and "selected_epoch" in record["row"]:
            history = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
            validation = selected_validation(history, int(record["row"]["selected_epoch"]))
        # The plan names the row: a record keeps the name its run had when evaluated (a folder may be renamed).
        rows.append(
            {
                **record["row"],
                **validation,
                "name": spec.name,
                "run_dir": str(spec.run_dir),
                **_corruption_means(tables[(spec.name, spec.seed)]),
            }
        )
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    reference = {s.name: s.reference for s in specs}
    for col, names in (("mce_cap15", CAP_IMAGENET_C), ("mce_ct", CT_PHYSICS), ("mce_all", CORRUPTIONS)):
        frame[col] = [
            (_mce(tables[(n, s)], tables[(reference[n], s)], names) if (reference[n], s) in tables else math.nan)
            for n, s in zip(frame["name"], frame["seed"])
        ]
    ood_cols = [f"{d}_accuracy" for d in domains_of(frame)]
    frame["ood_mean_accuracy"] = frame[ood_cols + ["corruption_cap15"]].mean(axis=1)
    return frame


def domains_of(runs: pd.DataFrame) -> list[str]:
    """The other-site domains of the per-run rows, in order of first appearance."""
    names = [d for text in runs.get("domains", pd.Series(dtype=str)).fillna("") for d in str(text).split(",")]
    return list(dict.fromkeys(d for d in names if d))


# The columns each result file must have (others, such as one set per other-site domain, may follow).
SCHEMA = {
    "runs.csv": (
        "name",
        "method",
        "seed",
        "checkpoint",
        "selected_epoch",
        "test_n",
        "clean_accuracy",
        "clean_auc",
        "clean_sensitivity",
        "clean_specificity",
        "train_eps",
        "pgd10_train_eps",
        "pgd10_8_255",
        "ensemble_train_eps",
        "ensemble_8_255",
        "ensemble_n",
        "ensemble",
        "domains",
        *(f"{score}_{suite}" for score in ("corruption", "mce") for suite in ("cap15", "ct", "all")),
        "ood_mean_accuracy",
        "train_minutes",
    ),
    "table.csv": ("name", "method", "metric", "label", "mean", "ci_low", "ci_high", "std", "n_seeds", "seeds"),
    "gains.csv": (
        "metric",
        "higher_is_better",
        "comparator",
        "best_prior",
        "best_prior_mean",
        "method",
        "method_mean",
        "gain_mean",
        "gain_ci_low",
        "gain_ci_high",
        "n_pairs",
        "seeds",
    ),
    "verdicts.csv": (
        "claim",
        "metric",
        "claimed_gain",
        "comparator",
        "comparator_method",
        "gain_mean",
        "gain_ci_low",
        "gain_ci_high",
        "n_pairs",
        "verdict",
        "rule",
        "primary",
    ),
    "ensemble_check.csv": ("run", "condition", "attack", "eps", "n", "accuracy", "ensemble_at_least_as_strong"),
}


RESULTS_URL = "https://raw.githubusercontent.com/robustmed-lite/robustmed-lite/main/results"


def find_results(profile: str = "cpu", study: str = "reproduction", names=None, download: bool = True) -> Path:
    """The committed results of a study and profile (``results/<study>/<profile>``): in this checkout (found
    from the working directory or the package's own folder), else downloaded from the repository on GitHub
    (Colab, where the package is installed without the repository) into the cache.

    Args:
        profile: ``cpu``, ``gpu`` or ``paper``.
        study: ``reproduction``, ``sites``, ``ablation`` or ``fidelity``.
        names: Files to download, relative to the study's folder (default: the reproduction's ``SCHEMA`` files and
            ``table.md``); the first one decides whether the checkout has the results.
        download: Fall back to the download.

    Raises:
        FileNotFoundError: Neither present nor downloadable; the message says how to get them.
    """
    names = list(names or (*SCHEMA, "table.md", "profile.json", "environment.json"))
    relative = Path("results") / study / profile
    for base in (Path.cwd(), *Path.cwd().parents, Path(__file__).resolve().parents[2]):
        if all((base / relative / name).exists() for name in names[:1]):
            return base / relative
    if download:
        import urllib.request

        from ..data.loaders import default_cache_dir

        dest = default_cache_dir() / "results" / study / profile
        dest.mkdir(parents=True, exist_ok=True)
        try:
            for name in names:  # a timeout: offline, a blocked connection must fail, not hang the notebook
                with urllib.request.urlopen(f"{RESULTS_URL}/{study}/{profile}/{name}", timeout=30) as response:
                    (dest / name).parent.mkdir(parents=True, exist_ok=True)
                    (dest / name).write_bytes(response.read())
            return dest
        except OSError as err:
            command = {"reproduction": "reproduce"}.get(study, study)
            raise FileNotFoundError(
                f"no {relative} here and the download failed ({err}). Fix: clone the "
                f"repository, or run python -m robustmed_lite {command}"
            ) from err
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
            raise ValueError(
                f"{path} lacks the columns {missing}: it was written by another version; run the reproduction again"
            )
    return frames


@dataclass(frozen=True)
class Metric:
    column: str
    label: str
    higher_is_better: bool = True


def metrics_of(runs: pd.DataFrame) -> list[Metric]:
    """The summary's metrics, in table order (domain columns as found)."""
    fixed = [
        Metric("clean_accuracy", "natural accuracy"),
        Metric("clean_auc", "AUC"),
        Metric("clean_sensitivity", "sensitivity"),
        Metric("clean_specificity", "specificity"),
    ]
    for kind, label in (("pgd10", "PGD-10"), ("ensemble", "ensemble")):
        for key, eps in (("train_eps", "train eps"), ("8_255", "8/255")):
            if f"{kind}_{key}" in runs:
                fixed.append(Metric(f"{kind}_{key}", f"{label} @ {eps}"))
    fixed += [
        Metric("corruption_cap15", "corruptions, CAP's 15 ImageNet-C types"),
        Metric("corruption_ct", "corruptions, CT physics"),
        Metric("corruption_all", "corruptions, all"),
        Metric("mce_cap15", "mCE vs ERM, CAP's 15", False),
        Metric("mce_ct", "mCE vs ERM, CT physics", False),
        Metric("mce_all", "mCE vs ERM, all", False),
    ]  # ERM trained on the same data and preparation
    for domain in domains_of(runs):
        for adapted in ("", "_adabn", "_tent"):
            for suffix, label in (("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy"), ("auc", "AUC")):
                fixed.append(Metric(f"{domain}{adapted}_{suffix}", f"{domain}{adapted.replace('_', ' + ')}: {label}"))
    fixed += [
        Metric("ood_mean_accuracy", "OOD mean (other sites + CAP's 15 corruptions)"),
        Metric("train_minutes", "train minutes", False),
    ]
    return [m for m in fixed if m.column in runs]


def summarise(runs: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """table (mean, t-interval per row name and metric), gains (over the best prior method and the best prior
    defence, paired by seed) and verdicts (the claims) from the per-run rows."""
    metrics = metrics_of(runs)
    table = []
    for name, group in runs.groupby("name", sort=False):
        for m in metrics:
            iv = t_interval(group[m.column])
            table.append(
                {
                    "name": name,
                    "method": group["method"].iloc[0],
                    "metric": m.column,
                    "label": m.label,
                    "mean": iv.mean,
                    "ci_low": iv.low,
                    "ci_high": iv.high,
                    "std": iv.std,
                    "n_seeds": iv.n,
                    "seeds": ",".join(str(s) for s in sorted(group["seed"])),
                }
            )
    table = pd.DataFrame(table)
    gains, verdicts = [], []
    prior = [n for n in runs["name"].unique() if n in METHODS and n != THE_METHOD]
    comparators = {"best prior method": prior, "best prior defence": [n for n in prior if n != "erm"]}
    if THE_METHOD in set(runs["name"]):
        ours = runs[runs["name"] == THE_METHOD]
        for m in metrics:
            for comparator, pool in comparators.items():
                means = table[(table["metric"] == m.column) & table["name"].isin(pool)].set_index("name")["mean"]
                means = means.dropna()
                if means.empty:
                    continue
                best, chosen_on = choose_comparator(runs, list(means.index), m)
                theirs = runs[runs["name"] == best]
                diffs = paired_differences(
                    dict(zip(ours["seed"], ours[m.column])), dict(zip(theirs["seed"], theirs[m.column]))
                )
                sign = 1.0 if m.higher_is_better else -1.0
                iv = t_interval([sign * d for d in diffs.values()])
                gains.append(
                    {
                        "metric": m.column,
                        "label": m.label,
                        "higher_is_better": m.higher_is_better,
                        "comparator": comparator,
                        "best_prior": best,
                        "best_prior_mean": means[best],
                        "chosen_on": chosen_on,
                        "method": THE_METHOD,
                        "method_mean": float(ours[m.column].mean()),
                        "gain_mean": iv.mean,
                        "gain_ci_low": iv.low,
                        "gain_ci_high": iv.high,
                        "ci_half_width": iv.half_width,
                        "mde": minimum_detectable_effect(iv.n, iv.std, MDE_POWER),
                        "n_pairs": iv.n,
                        "seeds": ",".join(str(s) for s in diffs),
                    }
                )
        gain_frame = pd.DataFrame(gains)
        for claim in CLAIMS:
            for comparator in comparators:
                match = (
                    gain_frame[(gain_frame["metric"] == claim.metric) & (gain_frame["comparator"] == comparator)]
                    if len(gain_frame)
                    else gain_frame
                )
                if match.empty:
                    continue
                g = match.iloc[0]
                iv = Interval(g["gain_mean"], g["gain_ci_low"], g["gain_ci_high"], int(g["n_pairs"]), math.nan)
                verdicts.append(
                    {
                        "claim": claim.name,
                        "metric": claim.metric,
                        "claimed_gain": claim.gain,
                        "comparator": comparator,
                        "comparator_method": g["best_prior"],
                        "chosen_on": g["chosen_on"],
                        "gain_mean": g["gain_mean"],
                        "gain_ci_low": g["gain_ci_low"],
                        "gain_ci_high": g["gain_ci_high"],
                        "n_pairs": int(g["n_pairs"]),
                        "ci_half_width": g["ci_half_width"],
                        "mde": g["mde"],
                        "verdict": verdict(iv, claim.gain),
                        "rule": VERDICT_RULE,
                        "primary": comparator == "best prior method",
                        "claim_source": claim.source,
                    }
                )
    return {"table": table, "gains": pd.DataFrame(gains), "verdicts": pd.DataFrame(verdicts)}


def validation_column(metric: str) -> str:
    """The validation metric a comparator for ``metric`` is chosen on: PGD accuracy for the robust metrics, clean
    accuracy for the rest (the OOD data and corruptions have no validation split of their own)."""
    return "val_robust" if metric.startswith(("pgd10_", "ensemble_")) else "val_clean"


def choose_comparator(runs: pd.DataFrame, pool: list[str], metric: Metric) -> tuple[str, str]:
    """The best of ``pool`` (row names) for ``metric``, chosen without the test split: the highest mean over seeds
    of ``validation_column(metric)``. Rows without validation metrics (results written before they were recorded)
    make the choice fall back to the test split's mean of ``metric`` itself.

    Returns:
        (row name, the split that chose it: "validation (val_clean)", "validation (val_robust)" or "test").
    """
    column = validation_column(metric.column)
    if column in runs:
        val = runs[runs["name"].isin(pool)].groupby("name")[column].mean()
        if val.notna().all() and len(val) == len(pool):
            return str(val.idxmax()), f"validation ({column})"
    test = runs[runs["name"].isin(pool)].groupby("name")[metric.column].mean().dropna()
    return str(test.idxmax() if metric.higher_is_better else test.idxmin()), "test"


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
        lines += [
            "",
            "## The paper's claims",
            "",
            VERDICT_RULE,
            "The primary comparator is the best prior method (every method but robustmed, CAP and ERM "
            "included); the best prior defence leaves ERM out. Each is chosen before the test split is read: "
            "the best mean over seeds on the validation split (column 'chosen on'; 'test' only for results "
            "written before validation metrics were recorded). The minimum detectable effect (MDE) is the "
            f"smallest true gain the paired t-test at 5% would find with {MDE_POWER:.0%} power at the measured "
            "seed-to-seed spread: an inconclusive verdict cannot tell a gain smaller than it from none.",
            "",
            "| claim | comparator | chosen on | gain (95% CI) | MDE | verdict |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for _, v in verdicts.iterrows():
            lines.append(
                f"| {v['claim']} | {v['comparator']} ({v['comparator_method']}) | {v['chosen_on']} | "
                f"{v['gain_mean']:+.3f} [{v['gain_ci_low']:+.3f}, {v['gain_ci_high']:+.3f}], n = {v['n_pairs']} | "
                f"{v['mde']:.3f} | **{v['verdict']}** |"
            )
    if len(gains):
        lines += [
            "",
            f"## Paired gain of `{THE_METHOD}` per metric",
            "",
            "Per seed, the method minus the comparator (the comparator minus the method where lower is better, "
            "e.g. mCE and minutes): a positive gain always means the method is better.",
            "",
            "| metric | best prior method | gain (95% CI) | best prior defence | gain (95% CI) |",
            "| --- | --- | --- | --- | --- |",
        ]
        for label, part in gains.groupby("label", sort=False):
            cells = []
            for comparator in ("best prior method", "best prior defence"):
                g = part[part["comparator"] == comparator]
                cells += (
                    ["n/a", "n/a"]
                    if g.empty
                    else [
                        g["best_prior"].iloc[0],
                        f"{g['gain_mean'].iloc[0]:+.3f} [{g['gain_ci_low'].iloc[0]:+.3f}, "
                        f"{g['gain_ci_high'].iloc[0]:+.3f}]",
                    ]
                )
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_summary(runs: pd.DataFrame, out: Path, header: dict) -> dict[str, pd.DataFrame]:
    """runs.csv, table.csv, gains.csv, verdicts.csv, table.md and the figures, in ``out``."""
    from ..figures import plot_reproduction_bars, plot_robust_vs_clean

    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(runs)
    runs.to_csv(out / "runs.csv", index=False)
    for key, frame in summary.items():
        frame.to_csv(out / f"{key}.csv", index=False)
    (out / "table.md").write_text(_markdown(runs, summary, header))
    import matplotlib.pyplot as plt

    for name, fig in (
        ("metrics.png", plot_reproduction_bars(summary["table"])),
        ("robust_vs_clean.png", plot_robust_vs_clean(runs)),
    ):
        fig.savefig(out / name, dpi=120, bbox_inches="tight")
        plt.close(fig)
    return summary
