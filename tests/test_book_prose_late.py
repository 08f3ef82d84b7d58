"""The reproducibility note book/notes/measured_twice.md is static text: every number it quotes is recomputed here
from the committed sites studies (results/sites/cpu and results/sites/cpu-erm-robustmed)."""

import itertools
import re
from pathlib import Path

import pandas as pd
import pytest

from robustmed_lite.evaluation.stats import paired_gain
from robustmed_lite.studies.sites import compare_studies

ROOT = Path(__file__).resolve().parents[1]
NOTE = ROOT / "book" / "notes" / "measured_twice.md"
SITES = ROOT / "results" / "sites"
COLUMN = "ucsd_covidct_test_balanced_accuracy"
FIRST, SECOND = "cpu", "cpu-erm-robustmed"


def _runs(study):
    return pd.read_csv(SITES / study / "all_runs" / "runs.csv")


def _table_rows(heading):
    """The body rows of the first Markdown table after ``heading``, as lists of stripped cells."""
    lines = NOTE.read_text().split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = list(itertools.takewhile(lambda line: line.startswith("|"), lines[start:]))
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in table[2:]]


def _interval(low, high):
    return f"[{low:+.3f}, {high:+.3f}]"


def test_the_re_run_table_is_what_the_two_committed_studies_give():
    rows = _table_rows("## What a re-run moves")
    twice = compare_studies(_runs(FIRST), _runs(SECOND), [r[0] for r in rows], [COLUMN]).set_index("name")
    assert len(rows) == 12
    for name, before, after, gain, interval in rows:
        r = twice.loc[name]
        assert (before, after, gain) == (f"{r['before']:.3f}", f"{r['after']:.3f}", f"{r['gain_mean']:+.3f}"), name
        assert interval == _interval(r["gain_ci_low"], r["gain_ci_high"]), name


@pytest.mark.parametrize("method", ["erm", "robustmed"])
def test_the_intensity_fix_rows_are_the_paired_gains_of_each_study_and_seed_range(method):
    label = {"erm": "ERM", "robustmed": "the method"}[method]
    rows = [r for r in _table_rows("## What three seeds settle") if r[0] == label]
    assert [(r[1], r[2]) for r in rows] == [("first", "0-2"), ("second", "0-2"), ("second", "0-4")]
    for _, study, seeds, gain, interval, reading in rows:
        runs = _runs(FIRST if study == "first" else SECOND)
        last = int(seeds.split("-")[1])
        r = paired_gain(runs[runs["seed"] <= last], f"{method}+intensity", method, COLUMN)
        assert gain == f"{r['gain_mean']:+.3f}" and interval == _interval(r["gain_ci_low"], r["gain_ci_high"])
        assert reading == ("helps" if r["gain_ci_low"] > 0 else "interval contains 0")


def test_the_goal_and_the_choice_the_note_states_are_the_second_studys():
    text = re.sub(r"\s+", " ", NOTE.read_text())
    goal = pd.read_csv(SITES / SECOND / "goal.csv").set_index("method")
    for method in ("erm", "robustmed"):
        g = goal.loc[method]
        assert not g["reached"] and g["goal"] == 0.65
        assert f"{g['mean']:.3f} [{g['ci_low']:.3f}, {g['ci_high']:.3f}]" in text
    assert "intensity standardisation + acquisition augmentation, no test-time adaptation" in text
    for study in (FIRST, SECOND):
        best = pd.read_json(SITES / study / "best.json", typ="series")
        assert list(best["components"]) == ["intensity", "acq"] and best["adaptation"] == "none"
