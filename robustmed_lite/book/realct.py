"""Real-CT results for the chapters whose own real-CT runs are absent (every book build): the per-run rows that a
committed study wrote, read into the tables the chapters draw."""

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
