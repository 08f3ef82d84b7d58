"""The cross-site study: which component carries a model trained on one hospital to another?

    python -m robustmed_lite sites --profile cpu        # Soares -> UCSD, ERM / TRADES / the method, 3 seeds

Built on the reproduction's machinery (``reproduce.py``: the same runs, two stages, reuse and resumption), it
trains each method on the Soares set with and without every component of ``COMPONENTS``, and the lung-region
shortcut tests with ERM, then

1. scores every model on UCSD COVID-CT's official **validation** and **test** splits, without and with test-time
   adaptation (AdaBN, TENT), and on the corruptions (with and without the types the acquisition augmentation
   shows the model in a milder form);
2. picks the **best combination** among the components that use no label of the target site (crop, intensity,
   acquisition augmentation, and the test-time adaptation): each one whose mean paired gain in balanced accuracy
   over the baseline, on the target's *validation* split and averaged over the methods, is positive. That uses
   118 labelled target validation images to choose among a handful of switches (the optimistic "oracle"
   protocol of domain generalisation, said so in the output), never the test split;
3. trains that combination for every method and reports everything on the target's *test* split, the goal per
   method (no maximum over methods on test).

Multi-source training (``multi``) pools the target site's own *train* split: it is not transfer to an unseen site
but the reference of what target labels buy, reported beside the others and kept out of the choice and the goal.
The target's test split is the one domain every run can be compared on (n = 203 for UCSD); the reproduction's
"all of UCSD" is only open to single-source runs (``runeval`` refuses to score a run on images it trained on).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from ..evaluation.stats import paired_differences, paired_gain, t_interval
from .plan import PROFILES, Profile
from .reproduce import default_data, reproduce
from .run_evaluation import domain_name
from .summary import check_results, find_results
from .writeup import write_writeup

SITE_METHODS = ("erm", "trades", "robustmed")
ADAPTATIONS = ("none", "adabn", "tent")
LABEL_FREE = ("crop", "intensity", "acq")  # components that use no label of the target site


def components(extra_root: str) -> dict[str, dict]:
    """Each component as the TrainConfig settings that switch it on (``extra_root``: the site pooled in)."""
    return {
        "crop": {"lung_crop": True},
        "intensity": {"intensity": "anchor"},
        "acq": {"acq_aug": 0.5},
        "multi": {"extra_data": extra_root},
    }


GAIN_COLUMNS = ("gain_mean", "gain_ci_low", "gain_ci_high", "n_pairs")  # a paired gain (``stats.paired_gain``)
SHORTCUT_TESTS = {"no_lungs": {"lung_region": "no_lungs"}, "lungs_only": {"lung_region": "lungs_only"}}
SCHEMA = {
    "sites_table.csv": ("method", "component", "adaptation", "split", "metric", "mean", "ci_low", "ci_high", "n_seeds"),
    "component_gains.csv": ("method", "component", "adaptation", "split", "metric", *GAIN_COLUMNS),
    "method_gains.csv": ("component", "adaptation", "comparator", "split", "metric", *GAIN_COLUMNS),
    "shortcut_tests.csv": ("test", "domain", "metric", "mean", "ci_low", "ci_high", "n_seeds", "n_images"),
    "goal.csv": ("method", "component", "adaptation", "mean", "ci_low", "ci_high", "goal", "reached"),
}


def _row_name(method: str, parts: list[str]) -> str:
    return method if not parts else f"{method}+{'+'.join(parts)}"


def _column(target: str, split: str, adaptation: str, metric: str) -> str:
    """A per-run column of the target site: ``<target>_<split>[_<adaptation>]_<metric>``."""
    return f"{target}_{split}{'' if adaptation == 'none' else '_' + adaptation}_{metric}"


def _variants(methods, parts: list[list[str]], comps: dict) -> dict[str, dict]:
    out = {}
    for method in methods:
        for chosen in parts:
            if chosen:
                settings = {k: v for c in chosen for k, v in comps[c].items()}
                out[_row_name(method, chosen)] = {"method": method, **settings}
    return out


def screening_variants(methods, screen, comps: dict) -> dict[str, dict]:
    """The study's first round: each method of ``screen`` with each single component, and the ERM shortcut tests
    (the baselines are the plain methods, trained by the reproduction)."""
    if not set(screen) <= set(methods):
        raise ValueError(
            f"--screen {','.join(screen)}: every screened method must be among --methods {','.join(methods)}"
        )
    variants = _variants(screen, [[c] for c in comps], comps)
    variants.update({f"erm+{t}": {"method": "erm", **v} for t, v in SHORTCUT_TESTS.items()})
    return variants


def choose_best(
    runs: pd.DataFrame, methods, names: list[str], target: str = "ucsd_covidct", candidates=LABEL_FREE
) -> tuple[list[str], str, pd.DataFrame]:
    """The components of ``candidates`` (and the adaptation) whose mean paired gain in the target's *validation*
    balanced accuracy over the baseline, averaged over ``methods``, is positive.

    Returns:
        (components, adaptation, the table the choice was read from).
    """
    rows = []
    for name in names:
        for adaptation in ADAPTATIONS:
            gains = []
            for method in methods:
                col = _column(target, "val", adaptation, "balanced_accuracy")
                base = runs[runs["name"] == method].set_index("seed")[
                    _column(target, "val", "none", "balanced_accuracy")
                ]
                mine = runs[runs["name"] == _row_name(method, [name] if name != "baseline" else [])]
                if mine.empty or col not in mine:
                    continue
                gains += list(paired_differences(dict(zip(mine["seed"], mine[col])), dict(base)).values())
            if gains:
                rows.append(
                    {
                        "component": name,
                        "adaptation": adaptation,
                        "val_gain_mean": sum(gains) / len(gains),
                        "n_pairs": len(gains),
                    }
                )
    table = pd.DataFrame(rows)
    chosen = [
        c
        for c in names
        if c in candidates
        and ((table["component"] == c) & (table["adaptation"] == "none") & (table["val_gain_mean"] > 0)).any()
    ]
    adapt_gain = table[table["component"] == "baseline"].set_index("adaptation")["val_gain_mean"]
    adaptation = adapt_gain.drop("none").idxmax() if (adapt_gain.drop("none") > 0).any() else "none"
    return chosen, adaptation, table


def _long_table(runs: pd.DataFrame, rows: list[tuple[str, str, str]], target: str) -> pd.DataFrame:
    out = []
    for name, method, component in rows:
        part = runs[runs["name"] == name]
        if part.empty:
            continue
        for split in ("val", "test"):
            for adaptation in ADAPTATIONS:
                for metric in ("balanced_accuracy", "auc", "accuracy", "share_covid"):
                    col = _column(target, split, adaptation, metric)
                    if col in part:
                        iv = t_interval(part[col])
                        out.append(
                            {
                                "method": method,
                                "component": component,
                                "adaptation": adaptation,
                                "split": split,
                                "metric": metric,
                                "mean": iv.mean,
                                "ci_low": iv.low,
                                "ci_high": iv.high,
                                "n_seeds": iv.n,
                            }
                        )
        for col in ("clean_accuracy", "pgd10_train_eps", "corruption_all", "corruption_not_augmented"):
            iv = t_interval(part[col])
            out.append(
                {
                    "method": method,
                    "component": component,
                    "adaptation": "none",
                    "split": "source test",
                    "metric": col,
                    "mean": iv.mean,
                    "ci_low": iv.low,
                    "ci_high": iv.high,
                    "n_seeds": iv.n,
                }
            )
    return pd.DataFrame(out)


def summarise_sites(
    runs: pd.DataFrame, methods, names: list[str], best: list[str], target: str = "ucsd_covidct"
) -> dict[str, pd.DataFrame]:
    """The study's tables from the per-run rows (``reproduce``'s runs.csv); ``target`` is the column stem of the
    other site (``runeval.domain_name`` of its folder)."""
    rows = []  # (run name, method, component): the best combination may be a single component's run too
    for method in methods:
        for name in names:
            rows.append((_row_name(method, [] if name == "baseline" else [name]), method, name))
        if best:
            rows.append((_row_name(method, best), method, "best: " + "+".join(best)))
    table = _long_table(runs, rows, target)
    component_gains, method_gains = [], []
    for name, method, component in rows:
        if component == "baseline":
            continue
        for split in ("val", "test"):
            for adaptation in ADAPTATIONS:
                for metric in ("balanced_accuracy", "auc"):
                    g = paired_gain(runs, name, method, _column(target, split, adaptation, metric))
                    if g:
                        component_gains.append(
                            {
                                "method": method,
                                "component": component,
                                "adaptation": adaptation,
                                "split": split,
                                "metric": metric,
                                **g,
                            }
                        )
    for component in dict.fromkeys(c for _, _, c in rows):
        ours = next((n for n, m, c in rows if m == "robustmed" and c == component), None)
        for comparator in ("erm", "trades"):
            theirs = next((n for n, m, c in rows if m == comparator and c == component), None)
            if ours is None or theirs is None:
                continue
            for adaptation in ADAPTATIONS:
                for metric in ("balanced_accuracy", "auc"):
                    g = paired_gain(runs, ours, theirs, _column(target, "test", adaptation, metric))
                    if g:
                        method_gains.append(
                            {
                                "component": component,
                                "adaptation": adaptation,
                                "comparator": comparator,
                                "split": "test",
                                "metric": metric,
                                **g,
                            }
                        )
            g = paired_gain(runs, ours, theirs, "pgd10_train_eps")
            if g:
                method_gains.append(
                    {
                        "component": component,
                        "adaptation": "none",
                        "comparator": comparator,
                        "split": "source test",
                        "metric": "pgd10_train_eps",
                        **g,
                    }
                )
    shortcut = []
    for test in ("baseline", *SHORTCUT_TESTS):
        part = runs[runs["name"] == ("erm" if test == "baseline" else f"erm+{test}")]
        for domain, col, metric, n_col in (
            ("source test", "clean_accuracy", "accuracy", "test_n"),
            (
                "target test",
                _column(target, "test", "none", "balanced_accuracy"),
                "balanced_accuracy",
                f"{target}_test_n",
            ),
        ):
            if part.empty:
                continue
            iv = t_interval(part[col])
            shortcut.append(
                {
                    "test": "lungs and all" if test == "baseline" else test,
                    "domain": domain,
                    "metric": metric,
                    "mean": iv.mean,
                    "ci_low": iv.low,
                    "ci_high": iv.high,
                    "n_seeds": iv.n,
                    "n_images": int(part[n_col].iloc[0]),
                }
            )
        if not part.empty:
            iv = t_interval(part["clean_auc"])
            shortcut.append(
                {
                    "test": "lungs and all" if test == "baseline" else test,
                    "domain": "source test",
                    "metric": "auc",
                    "mean": iv.mean,
                    "ci_low": iv.low,
                    "ci_high": iv.high,
                    "n_seeds": iv.n,
                    "n_images": int(part["test_n"].iloc[0]),
                }
            )
    return {
        "sites_table": table,
        "component_gains": pd.DataFrame(component_gains),
        "method_gains": pd.DataFrame(method_gains),
        "shortcut_tests": pd.DataFrame(shortcut),
    }


def _md_table(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "(no data)"
    rows = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + " --- |" * len(frame.columns)]
    rows += ["| " + " | ".join(map(str, r)) + " |" for r in frame.itertuples(index=False)]
    return "\n".join(rows)


def goal_per_method(tables: dict, adaptation: str, goal: float) -> pd.DataFrame:
    """Each method's best-combination balanced accuracy on the target's test split against the goal (one row per
    method: no maximum over methods on test)."""
    t = tables["sites_table"]
    best = t[
        t["component"].str.startswith("best")
        & (t["split"] == "test")
        & (t["metric"] == "balanced_accuracy")
        & (t["adaptation"] == adaptation)
    ]
    return best.assign(goal=goal, reached=best["mean"] >= goal)[
        ["method", "component", "adaptation", "mean", "ci_low", "ci_high", "n_seeds", "goal", "reached"]
    ]


def _markdown(
    tables: dict,
    best: list[str],
    adaptation: str,
    choice: pd.DataFrame,
    goals: pd.DataFrame,
    title: str,
    screen=SITE_METHODS,
) -> str:
    t = tables["sites_table"]
    test = t[(t["split"] == "test") & (t["metric"] == "balanced_accuracy")]
    lines = [
        f"# Cross-site study: {title}",
        "",
        f"Best combination (label-free components, chosen on the target's validation split, never its test "
        f"split, from the single-component runs of {', '.join(screen)}): {' + '.join(best) or 'none'}, "
        f"test-time adaptation {adaptation}. `multi` trains on the target's own train split: a reference for "
        "what target labels buy, not transfer.",
        "",
        "## Target test split: balanced accuracy, mean ± half-width of the 95% t-interval over seeds",
        "",
        "| method | component | " + " | ".join(ADAPTATIONS) + " |",
        "| --- | --- | " + " | ".join("---" for _ in ADAPTATIONS) + " |",
    ]
    for (method, component), part in test.groupby(["method", "component"], sort=False):
        cells = []
        for adapt in ADAPTATIONS:
            r = part[part["adaptation"] == adapt]
            half = "" if r.empty else (r["ci_high"].iloc[0] - r["ci_low"].iloc[0]) / 2
            cells.append("n/a" if r.empty else f"{r['mean'].iloc[0]:.3f} ± {half:.3f}")
        lines.append(f"| {method} | {component} | " + " | ".join(cells) + " |")
    lines += ["", "## The goal, per method (best combination, target test split)", "", _md_table(goals.round(3))]
    lines += [
        "",
        "## How the combination was chosen (target validation, mean paired gain over the baseline)",
        "",
        _md_table(choice.round(4)),
    ]
    lines += ["", "## Shortcut tests (ERM)", "", _md_table(tables["shortcut_tests"].round(3))]
    return "\n".join(lines) + "\n"


def run_sites(
    profile: str | Profile = "cpu",
    data: str | None = None,
    target: str | None = None,
    methods=SITE_METHODS,
    seeds=(0, 1, 2),
    out: str | Path | None = None,
    runs: str | Path | None = None,
    jobs: int | None = None,
    goal: float = 0.65,
    screen=None,
    progress: bool = True,
    overrides: dict | None = None,
) -> dict[str, pd.DataFrame]:
    """Runs the study (see the module docstring) and writes its tables to ``out``.

    Args:
        profile: A reproduction profile (its runs are shared: the baselines are the reproduction's runs).
        data: The training site (default: the Soares set beside the shared data).
        target: The other site, with an official split (default: UCSD COVID-CT beside it).
        methods: Methods compared.
        seeds: Training seeds.
        out: Results folder (default ``results/sites/<profile>``).
        runs: Run directories (default: the reproduction's, ``runs/reproduction/<profile>``).
        jobs: Runs at once.
        goal: The balanced accuracy on the target that the best combination is measured against.
        screen: The methods trained with each single component, whose validation gains choose the combination
            (default: every method; ``("erm",)`` screens on the cheapest model and trains the combination for
            every method, a third of the cost on a CPU).
        progress: Progress bars.
        overrides: TrainConfig overrides for every run (e.g. ``{"epochs": 2}``).
    """
    prof = PROFILES[profile] if isinstance(profile, str) else profile
    if data is None or target is None:
        found_data, found_ood = default_data()
        data = data or found_data
        target = target or (found_ood[0] if found_ood else None)
    if target is None or not Path(target).exists():
        raise FileNotFoundError(
            f"the target site {target} does not exist: pass --target (e.g. the UCSD COVID-CT "
            "folder, which has an official validation and test split)"
        )
    out = Path(out or f"results/sites/{prof.name}")
    stem = domain_name(str(target))
    comps = components(str(target))
    names = ["baseline", *comps]
    common = dict(
        profile=prof,
        data=data,
        ood_data=[f"{target}:val", f"{target}:test"],
        methods=",".join(methods),
        seeds=seeds,
        runs=runs,
        jobs=jobs,
        ensemble_n=0,
        adapt_methods=("adabn", "tent"),
        corruption_n=128,
        overrides=overrides,
        progress=progress,
        writeup=False,
    )
    methods = tuple(methods)
    screen = tuple(screen or methods)
    variants = screening_variants(methods, screen, comps)
    first = reproduce(out=out / "all_runs", variants=variants, **common)
    best, adaptation, choice = choose_best(first["runs"], screen, names, stem)
    if best:
        variants.update(_variants(methods, [best], comps))
        first = reproduce(out=out / "all_runs", variants=variants, **common)
    tables = summarise_sites(first["runs"], methods, names, best, stem)
    goals = goal_per_method(tables, adaptation, goal)
    for key, frame in {**tables, "goal": goals, "best_choice": choice}.items():
        frame.to_csv(out / f"{key}.csv", index=False)
    (out / "best.json").write_text(
        json.dumps(
            {
                "components": best,
                "adaptation": adaptation,
                "goal": goal,
                "methods": list(methods),
                "screened_on": list(screen),
                "rule": choose_best.__doc__.split("Returns")[0].strip(),
                "settings": {c: comps[c] for c in best},
            },
            indent=2,
        )
    )
    title = f"{Path(str(data)).name} -> {Path(str(target)).name}"
    (out / "table.md").write_text(_markdown(tables, best, adaptation, choice, goals, title, screen))
    write_writeup(out, "sites", machine_folder=out.resolve())
    return {**tables, "goal": goals, "runs": first["runs"], "best_choice": choice}


def compare_studies(before: pd.DataFrame, after: pd.DataFrame, names, columns) -> pd.DataFrame:
    """What re-training changed: for each run name of both studies, ``after`` minus ``before`` per column, paired
    by seed (two calls' ``all_runs/runs.csv``, e.g. the method before and after a change of its defaults).

    Returns:
        One row per name and column: the mean of each study over the seeds both have, the paired gain with its
        95% t-interval and the number of pairs; names or columns that either study lacks are left out.
    """
    rows = []
    for name in names:
        a, b = after[after["name"] == name], before[before["name"] == name]
        common = set(a["seed"]) & set(b["seed"])
        a, b = a[a["seed"].isin(common)], b[b["seed"].isin(common)]
        pair = pd.concat([a.assign(name="after"), b.assign(name="before")])
        for col in columns:
            gain = paired_gain(pair, "after", "before", col)
            if gain:
                rows.append({"name": name, "metric": col, "before": b[col].mean(), "after": a[col].mean(), **gain})
    return pd.DataFrame(rows)


def find_site_results(profile: str = "cpu", download: bool = True) -> Path:
    """The committed study of a profile (``results/sites/<profile>``), here or downloaded (``find_results``)."""
    return find_results(profile, "sites", [*SCHEMA, "best.json", "best_choice.csv", "table.md"], download)


def check_site_results(folder: str | Path) -> dict[str, pd.DataFrame]:
    """The committed study's files, with their columns checked (see ``summary.check_results``)."""
    return check_results(folder, SCHEMA)


def best_settings(folder: str | Path) -> tuple[dict, str]:
    """The best combination recorded by a study: its TrainConfig settings (for a ``reproduce`` variant) and its
    test-time adaptation (``none``, ``adabn`` or ``tent``)."""
    path = Path(folder) / "best.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: run python -m robustmed_lite sites first, or pass the folder "
            "it wrote (results/sites/<profile>)"
        )
    record = json.loads(path.read_text())
    return {k: v for c in record["components"] for k, v in record["settings"][c].items()}, record["adaptation"]
