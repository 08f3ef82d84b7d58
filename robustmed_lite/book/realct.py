"""Real-CT results for the chapters whose own real-CT runs are absent (every book build): the per-run rows that a
committed study wrote, read into the tables the chapters draw (chapter 06: the Soares -> UCSD shift of the
reproduction; chapter 05: where the reproduction's models look, ``attention``'s files)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

SOURCE = "Soares (test)"
TARGET = "UCSD (all)"
_COLUMNS = (
    "name",
    "seed",
    "test_n",
    "test_n_covid",
    "clean_accuracy",
    "clean_auc",
    "clean_sensitivity",
    "clean_specificity",
    "ucsd_covidct_n",
    "ucsd_covidct_accuracy",
    "ucsd_covidct_auc",
    "ucsd_covidct_balanced_accuracy",
    "ucsd_covidct_share_covid",
)


def committed_shift_table(runs_csv: Path | str, methods: Sequence[str]) -> pd.DataFrame:
    """The Soares -> UCSD shift of a committed reproduction (``reproduce`` writes ``runs.csv``), per method.

    Args:
        runs_csv: A reproduction's ``runs.csv``: one row per run, Soares' test split and all of UCSD scored.
        methods: The run names to keep, in the order the table lists them.

    Returns:
        One row per method and domain (``SOURCE``, ``TARGET``), in the long form of ``ood.shift_table``: ``model``,
        ``domain``, ``n``, ``n_seeds`` and the means over the seeds of ``accuracy``, ``balanced_accuracy``, ``auc``
        and ``predicted_covid_share`` (the share of slices called COVID), and ``drop_from_source``: the source
        accuracy minus this domain's (positive where accuracy falls).

    Raises:
        ValueError: The file lacks a column or one of the methods; the message names the file and the fix.
    """
    runs = pd.read_csv(runs_csv)
    missing = [c for c in _COLUMNS if c not in runs]
    if missing:
        raise ValueError(
            f"{runs_csv} lacks the columns {missing}: point at the runs.csv of a reproduction on Soares with UCSD "
            "as the other site (python -m robustmed_lite reproduce --profile cpu)"
        )
    absent = [m for m in methods if m not in set(runs["name"])]
    if absent:
        raise ValueError(
            f"{runs_csv} has no runs named {absent}: choose from {sorted(set(runs['name']))}, or run reproduce "
            f"with --methods {','.join(methods)}"
        )
    runs = runs[runs["name"].isin(methods)]
    sensitivity, specificity = runs["clean_sensitivity"], runs["clean_specificity"]
    covid_share = runs["test_n_covid"] / runs["test_n"]
    per_run = pd.concat(
        [
            pd.DataFrame(
                {
                    "model": runs["name"],
                    "domain": SOURCE,
                    "n": runs["test_n"],
                    "accuracy": runs["clean_accuracy"],
                    "balanced_accuracy": (sensitivity + specificity) / 2,
                    "auc": runs["clean_auc"],
                    "predicted_covid_share": covid_share * sensitivity + (1 - covid_share) * (1 - specificity),
                }
            ),
            pd.DataFrame(
                {
                    "model": runs["name"],
                    "domain": TARGET,
                    "n": runs["ucsd_covidct_n"],
                    "accuracy": runs["ucsd_covidct_accuracy"],
                    "balanced_accuracy": runs["ucsd_covidct_balanced_accuracy"],
                    "auc": runs["ucsd_covidct_auc"],
                    "predicted_covid_share": runs["ucsd_covidct_share_covid"],
                }
            ),
        ]
    )
    table = (
        per_run.groupby(["model", "domain"], sort=False)
        .agg(
            n=("n", "first"),
            n_seeds=("accuracy", "size"),
            accuracy=("accuracy", "mean"),
            balanced_accuracy=("balanced_accuracy", "mean"),
            auc=("auc", "mean"),
            predicted_covid_share=("predicted_covid_share", "mean"),
        )
        .reset_index()
    )
    order = {"model": list(methods), "domain": [SOURCE, TARGET]}
    table = table.sort_values(["model", "domain"], key=lambda column: column.map(order[column.name].index))
    source = table[table["domain"] == SOURCE].set_index("model")["accuracy"]
    table["drop_from_source"] = source.reindex(table["model"]).to_numpy() - table["accuracy"].to_numpy()
    return table.reset_index(drop=True)


ATTENTION_COMMAND = "python -m robustmed_lite attention --profile cpu"
ATTENTION_FILES = ("summary.csv", "paired.csv", "runs.csv", "attention.png")
ATTENTION_LABELS = {
    "erm": "ERM",
    "trades": "TRADES",
    "awp": "AWP",
    "cap": "CAP",
    "robustmed": "method",
    "untrained": "untrained",
}
_ATTENTION_COLUMNS = {
    "summary.csv": ("name", "map", "n_seeds", "lung_ratio_mean", "lung_ratio_ci_low", "lung_ratio_ci_high"),
    "paired.csv": ("map", "comparator", "n_pairs", "diff_mean", "diff_ci_low", "diff_ci_high", "mde"),
    "runs.csv": ("name", "seed", "map", "n_slices", "n_empty_mask", "lung_area"),
}


def committed_attention(folder: Path | str) -> dict[str, pd.DataFrame]:
    """The committed attention study (``attention`` writes it): its result files, and the chapter's two tables.

    Args:
        folder: The study folder, e.g. ``results/attention/cpu``.

    Returns:
        ``summary``, ``paired`` and ``runs`` as written; ``table``: one row per map (the key column first), the mean
        lung ratio over seeds per method, the untrained model and a uniform map (the lungs' area); ``pairs``: per
        map and comparator, the method minus it with its 95% t-interval and the smallest difference detectable at
        80% power.

    Raises:
        ValueError: A file lacks a column the study writes; the message names the file and the command.
    """
    folder = Path(folder)
    frames = {}
    for name, columns in _ATTENTION_COLUMNS.items():
        frame = pd.read_csv(folder / name)
        missing = [c for c in columns if c not in frame]
        if missing:
            raise ValueError(f"{folder / name} lacks the columns {missing}: write it again with {ATTENTION_COMMAND}")
        frames[name.removesuffix(".csv")] = frame
    summary, pairs = frames["summary"], frames["paired"]
    table = summary.pivot(index="map", columns="name", values="lung_ratio_mean")
    names = [n for n in dict.fromkeys(summary["name"]) if n in table.columns]
    table = table.reindex(index=list(dict.fromkeys(summary["map"])), columns=names)
    table.columns = [ATTENTION_LABELS.get(n, n) for n in names]
    table["uniform map"] = summary.groupby("map")["lung_area_mean"].mean().reindex(table.index)
    shown = pd.DataFrame(
        {
            "map": pairs["map"],
            "comparator": pairs["comparator"].map(lambda n: ATTENTION_LABELS.get(n, n)),
            "method minus it": pairs["diff_mean"],
            "95% low": pairs["diff_ci_low"],
            "95% high": pairs["diff_ci_high"],
            "detectable": pairs["mde"],
        }
    )
    return {**frames, "table": table.rename_axis("map"), "pairs": shown}


def attention_facts(summary: pd.DataFrame, pairs: pd.DataFrame, comparators: Sequence[str] = ("trades", "cap")) -> dict:
    """Numbers and short verdicts the chapter's prose quotes: the method's ratios against a uniform map, and per
    comparator how many of the paired intervals exclude zero, the range of the differences and of the detectable
    effect, and a sentence saying whether the method puts more of its maps on the lungs.

    Args:
        summary: ``summary.csv``.
        pairs: ``paired.csv``.
        comparators: The comparators to describe.
    """
    mine = summary[summary["name"] == "robustmed"]
    facts = {
        "att_n_seeds": int(mine["n_seeds"].max()),
        "att_n_maps": int(mine["map"].nunique()),
        "att_area": float(summary["lung_area_mean"].mean()),
        "att_method_low": float(mine["lung_ratio_mean"].min()),
        "att_method_high": float(mine["lung_ratio_mean"].max()),
    }
    for comparator in comparators:
        part = pairs[pairs["comparator"] == comparator]
        higher = part[part["diff_ci_low"] > 0]
        lower = part[part["diff_ci_high"] < 0]
        n = len(part)
        if len(higher) and not len(lower):
            verdict = f"the method puts more mass on the lungs on {len(higher)} of {n} maps (intervals above zero)"
        elif len(lower) and not len(higher):
            verdict = f"the method puts less mass on the lungs on {len(lower)} of {n} maps (intervals below zero)"
        elif len(higher) or len(lower):
            verdict = f"the method puts more mass on the lungs on {len(higher)} and less on {len(lower)} of {n} maps"
        else:
            verdict = f"no difference is resolved: all {n} paired intervals contain zero"
        facts.update(
            {
                f"att_{comparator}_verdict": verdict,
                f"att_{comparator}_low": float(part["diff_mean"].min()),
                f"att_{comparator}_high": float(part["diff_mean"].max()),
                f"att_{comparator}_ci_low": float(part["diff_ci_low"].min()),
                f"att_{comparator}_ci_high": float(part["diff_ci_high"].max()),
                f"att_{comparator}_mde_low": float(part["mde"].min()),
                f"att_{comparator}_mde_high": float(part["mde"].max()),
            }
        )
    return facts
