"""book/_ext/verdict.py: the intro's and closing page's verdict, written from a reproduction's files, and a clear
error, never an empty verdict, where the files are missing."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "book" / "_ext"))
import verdict  # noqa: E402  (book/_ext is not a package)

STUDY = ROOT / "results" / "reproduction" / "cpu-shared-gamma"  # the former study: its files do not change


def test_the_verdict_states_each_claims_gain_and_verdict_from_the_files():
    verdicts = pd.read_csv(STUDY / "verdicts.csv")
    text = verdict.verdict_markdown(STUDY, table=True, link="https://example.org/README.md")
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == len(verdicts), "one table row per claim and comparator"
    for row, (_, v) in zip(rows, verdicts.iterrows()):
        gain = f"{100 * v['gain_mean']:+.1f} [{100 * v['gain_ci_low']:+.1f}, {100 * v['gain_ci_high']:+.1f}]"
        assert row.startswith(f"| {v['claim']} |") and gain in row and row.endswith(f"| {v['verdict']} |")
    for _, v in verdicts[verdicts["primary"]].iterrows():
        assert f"points, **{v['verdict']}**" in text
    assert "`tiny_visformer`" in text and "64 px" in text and "3 seeds" in text
    assert "[write-up](https://example.org/README.md)" in text
    assert "| claim |" not in verdict.verdict_markdown(STUDY, table=False)


def test_a_folder_without_the_files_is_an_error_that_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"lacks verdicts.csv, table.csv, gains.csv, profile.json\. Fix:"):
        verdict.verdict_markdown(tmp_path)
    for name in verdict.NEEDED:
        shutil.copy(STUDY / name, tmp_path / name)
    (tmp_path / "verdicts.csv").write_text(",".join(pd.read_csv(STUDY / "verdicts.csv").columns) + "\n")
    with pytest.raises(ValueError, match="has no rows"):
        verdict.verdict_markdown(tmp_path)


def test_the_folder_is_the_configured_one_unless_the_environment_overrides_it(monkeypatch, tmp_path):
    monkeypatch.delenv("ROBUSTMED_VERDICT_RESULTS", raising=False)
    assert verdict.results_folder() == ROOT / "results" / "reproduction" / "cpu"
    monkeypatch.setenv("ROBUSTMED_VERDICT_RESULTS", str(tmp_path))
    assert verdict.results_folder() == tmp_path
