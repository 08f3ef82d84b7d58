"""The numbers that the book's prose quotes from committed results are those results (chapters 00-04 and their
reproducibility notes); numbers that notebooks measure are glued from their outputs instead."""

import re
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
CAP_NOTE = ROOT / "book" / "notes" / "cap_code.md"
FIDELITY = {
    "Soares": ROOT / "results" / "fidelity" / "cpu",
    "Soares, AWP rerun": ROOT / "results" / "fidelity" / "cpu-awp",
    "phantom": ROOT / "results" / "fidelity" / "cpu-phantom",
}
INTERVAL = re.compile(r"[+-]\d\.\d{3} \[[+-]\d\.\d{3}, [+-]\d\.\d{3}\]")

# (study, row, metric) -> what the note quotes: the interval, or the mean alone (True)
QUOTED = {
    ("Soares", "cap", "ensemble_train_eps"): "interval",
    ("Soares", "robustmed", "ensemble_train_eps"): "interval",
    ("Soares", "robustmed-prior_view", "pgd10_train_eps"): "interval",
    ("Soares", "robustmed-prior_view", "ensemble_train_eps"): "interval",
    ("Soares", "robustmed-proxy_optimizer", "ensemble_train_eps"): "interval",
    ("Soares", "robustmed-target_grad", "ensemble_train_eps"): "interval",
    ("Soares", "robustmed+weight_feedback", "ensemble_train_eps"): "interval",
    ("Soares", "robustmed+prior_samples", "ensemble_train_eps"): "interval",
    ("Soares", "robustmed+prior_samples", "pgd10_8_255"): "interval",
    ("Soares", "awp", "ensemble_train_eps"): "interval",
    ("Soares, AWP rerun", "awp", "ensemble_train_eps"): "interval",
    ("Soares, AWP rerun", "awp+warmup", "ensemble_train_eps"): "interval",
    ("Soares, AWP rerun", "awp", "clean_accuracy"): "interval",
    ("Soares, AWP rerun", "awp+warmup", "clean_accuracy"): "interval",
    ("Soares", "awp+gamma1e-3", "ensemble_train_eps"): "interval",
    ("Soares", "awp", "clean_accuracy"): "mean",
    ("Soares", "awp+gamma1e-3", "clean_accuracy"): "mean",
    ("phantom", "cap", "ensemble_train_eps"): "interval",
    ("phantom", "robustmed", "ensemble_train_eps"): "interval",
    ("phantom", "robustmed-proxy_optimizer", "ensemble_train_eps"): "interval",
    ("phantom", "robustmed-proxy_optimizer", "pgd10_train_eps"): "interval",
    ("phantom", "robustmed+weight_feedback", "ensemble_train_eps"): "interval",
    ("phantom", "robustmed+prior_samples", "ensemble_train_eps"): "interval",
    ("phantom", "robustmed+prior_samples", "pgd10_8_255"): "interval",
}


def _effects(study: str) -> pd.DataFrame:
    return pd.read_csv(FIDELITY[study] / "effects.csv").set_index(["row", "metric"])


def _as_quoted(study: str, row: str, metric: str, form: str) -> str:
    mean, low, high = _effects(study).loc[(row, metric), ["gain_mean", "gain_ci_low", "gain_ci_high"]]
    return f"{mean:+.3f}" if form == "mean" else f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]"


def _note_text() -> str:
    return " ".join(CAP_NOTE.read_text().split())  # the note wraps its lines anywhere


@pytest.mark.parametrize("key", QUOTED, ids=lambda key: "/".join(key))
def test_the_cap_note_quotes_the_committed_fidelity_measurement(key):
    quoted = _as_quoted(*key, QUOTED[key])
    assert quoted in _note_text(), f"{key}: the measurement now says {quoted}; rewrite book/notes/cap_code.md"


def test_every_interval_in_the_cap_note_is_one_of_the_checked_ones():
    checked = {_as_quoted(*key, form) for key, form in QUOTED.items() if form == "interval"}
    unchecked = set(INTERVAL.findall(_note_text())) - checked
    assert not unchecked, f"intervals quoted in the note that no entry of QUOTED checks: {sorted(unchecked)}"


def test_the_cap_notes_summary_sentences_hold():
    soares, phantom = _effects("Soares"), _effects("phantom")
    for method in ("cap", "robustmed"):  # "natural accuracy moved by less than a point for both"
        assert abs(soares.loc[(method, "clean_accuracy"), "gain_mean"]) < 0.01
    ensemble = phantom.xs("ensemble_train_eps", level="metric")  # "no ensemble interval excludes zero"
    assert ((ensemble.gain_ci_low <= 0) & (ensemble.gain_ci_high >= 0)).all()
    reverted = soares[soares.index.get_level_values("row").str.startswith("robustmed-")]
    clear = reverted[(reverted.gain_ci_low > 0) | (reverted.gain_ci_high < 0)]  # "only one reverted change"
    assert set(clear.index.get_level_values("row")) == {"robustmed-prior_view"}
