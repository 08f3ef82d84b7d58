"""studies/sites.py: the cross-site study chooses its combination on validation, screens single components,
summarises its tables and compares two calls row by row, paired by seed."""

import pandas as pd
import pytest

from robustmed_lite.studies.sites import choose_best, components, screening_variants, summarise_sites


def _only_row(frame: pd.DataFrame, **equal) -> pd.Series:
    """The one row of ``frame`` whose columns hold the values of ``equal``."""
    rows = frame[(frame[list(equal)] == pd.Series(equal)).all(axis=1)]
    assert len(rows) == 1, f"{len(rows)} rows with {equal}"
    return rows.iloc[0]


def _runs(values: dict) -> pd.DataFrame:
    """Per-run rows with UCSD val/test balanced accuracy for a few row names (3 seeds each)."""
    rows = []
    for name, (val, test) in values.items():
        for seed in (0, 1, 2):
            row = {
                "name": name,
                "seed": seed,
                "clean_accuracy": 0.9,
                "clean_auc": 0.95,
                "test_n": 372,
                "ucsd_covidct_test_n": 203,
                "pgd10_train_eps": 0.5,
                "corruption_all": 0.7,
                "corruption_not_augmented": 0.7,
            }
            for split, v in (("val", val), ("test", test)):
                for adapt, bonus in (("", 0.0), ("_adabn", 0.02), ("_tent", -0.01)):
                    row[f"ucsd_covidct_{split}{adapt}_balanced_accuracy"] = v + bonus + 0.001 * seed
                    row[f"ucsd_covidct_{split}{adapt}_auc"] = v + bonus
            rows.append(row)
    return pd.DataFrame(rows)


def test_the_best_combination_is_chosen_on_validation_never_on_test():
    # crop helps on validation but not on test; intensity hurts on validation but helps on test: the choice
    # must follow validation.
    runs = _runs({"erm": (0.50, 0.50), "erm+crop": (0.60, 0.40), "erm+intensity": (0.45, 0.70)})
    best, adaptation, table = choose_best(runs, ["erm"], ["baseline", "crop", "intensity"])
    assert best == ["crop"] and adaptation == "adabn"
    row = _only_row(table, component="crop", adaptation="none")
    assert row["val_gain_mean"] == pytest.approx(0.10) and row["n_pairs"] == 3


def test_screening_trains_single_components_only_for_the_screened_methods():
    comps = components("/data/ucsd")
    full = screening_variants(("erm", "trades"), ("erm", "trades"), comps)
    assert {"erm+crop", "trades+crop", "trades+multi", "erm+no_lungs", "erm+lungs_only"} <= set(full)
    cheap = screening_variants(("erm", "trades"), ("erm",), comps)
    assert not any(name.startswith("trades") for name in cheap) and cheap["erm+multi"]["extra_data"] == "/data/ucsd"
    with pytest.raises(ValueError, match="screened method must be among"):
        screening_variants(("erm",), ("trades",), comps)


def test_sites_summary_tables():
    runs = _runs(
        {
            "erm": (0.5, 0.5),
            "erm+crop": (0.6, 0.55),
            "robustmed": (0.52, 0.51),
            "robustmed+crop": (0.62, 0.58),
            "trades": (0.5, 0.5),
            "trades+crop": (0.6, 0.5),
            "erm+no_lungs": (0.5, 0.5),
            "erm+lungs_only": (0.5, 0.5),
        }
    )
    tables = summarise_sites(runs, ["erm", "trades", "robustmed"], ["baseline", "crop"], [])
    gains = tables["component_gains"]
    crop = _only_row(gains, method="erm", component="crop", split="test", adaptation="none", metric="balanced_accuracy")
    assert crop["gain_mean"] == pytest.approx(0.05) and crop["n_pairs"] == 3
    edge = tables["method_gains"]
    vs_erm = _only_row(edge, component="crop", comparator="erm", adaptation="none", metric="balanced_accuracy")
    assert vs_erm["gain_mean"] == pytest.approx(0.03)
    assert set(tables["shortcut_tests"]["test"]) == {"lungs and all", "no_lungs", "lungs_only"}


def test_two_calls_of_the_study_compare_row_by_row_paired_by_seed():
    from robustmed_lite.studies.sites import compare_studies

    before = _runs({"erm": (0.5, 0.5), "robustmed": (0.52, 0.50)})
    after = _runs({"erm": (0.5, 0.5), "robustmed": (0.52, 0.56), "robustmed+crop": (0.6, 0.6)})
    after.loc[(after["name"] == "robustmed") & (after["seed"] == 2), "ucsd_covidct_test_balanced_accuracy"] += 0.03
    table = compare_studies(
        before, after, ["erm", "robustmed", "robustmed+crop"], ["ucsd_covidct_test_balanced_accuracy", "clean_accuracy"]
    ).set_index(["name", "metric"])
    same = table.loc[("erm", "ucsd_covidct_test_balanced_accuracy")]
    assert same["gain_mean"] == 0 and same["n_pairs"] == 3
    moved = table.loc[("robustmed", "ucsd_covidct_test_balanced_accuracy")]
    assert moved["gain_mean"] == pytest.approx(0.07) and moved["gain_ci_low"] < 0.07 < moved["gain_ci_high"]
    assert moved["after"] - moved["before"] == pytest.approx(0.07)
    assert "robustmed+crop" not in table.index.get_level_values("name"), "a row only one study has is left out"
    longer = pd.concat([after, after[after["seed"] == 0].assign(seed=3, ucsd_covidct_test_balanced_accuracy=0.9)])
    extended = compare_studies(before, longer, ["robustmed"], ["ucsd_covidct_test_balanced_accuracy"]).iloc[0]
    assert extended["n_pairs"] == 3 and extended["after"] == pytest.approx(moved["after"]), "means over paired seeds"
