"""The committed real-CT results that chapters 06 and 08 read where their own runs are absent."""

from pathlib import Path

import pandas as pd
import pytest

from robustmed_lite.book.realct import SOURCE, TARGET, committed_shift_table

ROOT = Path(__file__).resolve().parents[1]


def _runs(tmp_path, without=()):
    """Two methods x two seeds, with known per-run numbers, less the columns ``without``."""
    rows = []
    for name, offset in (("erm", 0.0), ("robustmed", 0.1)):
        for seed in (0, 1):
            rows.append(
                {
                    "name": name,
                    "seed": seed,
                    "test_n": 100,
                    "test_n_covid": 40,
                    "clean_accuracy": 0.9 - offset + 0.02 * seed,
                    "clean_auc": 0.95,
                    "clean_sensitivity": 0.8,
                    "clean_specificity": 1.0 - offset,
                    "ucsd_covidct_n": 746,
                    "ucsd_covidct_accuracy": 0.45 + 0.02 * seed,
                    "ucsd_covidct_auc": 0.4,
                    "ucsd_covidct_balanced_accuracy": 0.47,
                    "ucsd_covidct_share_covid": 0.8,
                }
            )
    path = tmp_path / "runs.csv"
    pd.DataFrame(rows).drop(columns=list(without)).to_csv(path, index=False)
    return path


def test_the_shift_table_averages_the_seeds_per_method_and_domain_in_the_order_asked(tmp_path):
    table = committed_shift_table(_runs(tmp_path), ["robustmed", "erm"])
    assert list(zip(table["model"], table["domain"])) == [
        ("robustmed", SOURCE),
        ("robustmed", TARGET),
        ("erm", SOURCE),
        ("erm", TARGET),
    ]
    erm = table[table["model"] == "erm"].set_index("domain")
    assert erm.loc[SOURCE, "accuracy"] == pytest.approx(0.91)
    assert erm.loc[TARGET, "accuracy"] == pytest.approx(0.46)
    assert erm.loc[SOURCE, "n"] == 100 and erm.loc[TARGET, "n"] == 746
    assert (table["n_seeds"] == 2).all()


def test_the_drop_is_positive_where_accuracy_falls_at_the_other_site(tmp_path):
    table = committed_shift_table(_runs(tmp_path), ["erm"]).set_index("domain")
    assert table.loc[TARGET, "drop_from_source"] == pytest.approx(0.91 - 0.46)
    assert table.loc[SOURCE, "drop_from_source"] == 0


def test_the_source_share_called_covid_and_balanced_accuracy_come_from_sensitivity_and_specificity(tmp_path):
    table = committed_shift_table(_runs(tmp_path), ["robustmed"]).set_index("domain")
    # 40 COVID slices found at 0.8, 60 non-COVID at specificity 0.9: 32 + 6 of 100 called COVID
    assert table.loc[SOURCE, "predicted_covid_share"] == pytest.approx(0.38)
    assert table.loc[SOURCE, "balanced_accuracy"] == pytest.approx(0.85)
    assert table.loc[TARGET, "predicted_covid_share"] == pytest.approx(0.8)


def test_a_file_without_a_column_or_a_method_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match=r"runs\.csv lacks the columns \['ucsd_covidct_auc'\].*reproduce"):
        committed_shift_table(_runs(tmp_path, without=["ucsd_covidct_auc"]), ["erm"])
    with pytest.raises(ValueError, match=r"no runs named \['trades'\].*--methods erm,trades"):
        committed_shift_table(_runs(tmp_path), ["erm", "trades"])


def test_the_committed_cpu_reproduction_reads_and_shows_the_drop_to_ucsd():
    runs = ROOT / "results" / "reproduction" / "cpu-shared-gamma" / "runs.csv"
    table = committed_shift_table(runs, ["erm", "trades", "robustmed"])
    target = table[table["domain"] == TARGET]
    assert (target["n_seeds"] == 3).all() and (target["n"] == 746).all()
    assert (target["drop_from_source"] > 0.3).all()
