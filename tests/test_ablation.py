"""The ablation of ``robustmed`` (issue 16, item 2): each row switches off one part and nothing else, the effects
are paired by seed, the committed results are what the committed runs give, and chapter 07 can fetch them."""

import io
import json
from pathlib import Path

import pandas as pd
import pytest

from robustmed_lite.config import METHOD_FIELDS, load_config
from robustmed_lite.studies import ablation
from robustmed_lite.studies.summary import find_results

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "results" / "ablation" / "cpu-phantom"
SWITCHED = {
    "cap": "feedback",
    "robustmed-prior": "prior",
    "robustmed-weight_noise": "weight_noise",
    "robustmed-square_loss": "loss",
}


@pytest.mark.parametrize("row", list(ablation.ABLATIONS))
def test_each_row_switches_off_one_part_of_robustmed_and_nothing_else(row):
    _, settings = ablation.ABLATIONS[row]
    reference = load_config("cpu-demo", {"method": ablation.REFERENCE}).to_dict()
    changed = load_config("cpu-demo", settings).to_dict()
    differs = [f for f in METHOD_FIELDS if changed[f] != reference[f]]
    assert differs == [SWITCHED[row]]
    others = {k for k in reference if k not in METHOD_FIELDS and k != "method" and changed.get(k) != reference[k]}
    if SWITCHED[row] == "weight_noise":  # without weight noise a run carries none of its settings (None)
        others -= {"gamma", "proxy_lr", "proxy_weight_decay"}
    assert not others, others


def test_the_switches_turn_the_part_off():
    def cfg(row):
        return load_config("cpu-demo", ablation.ABLATIONS[row][1])

    assert cfg("cap").feedback == "none" and cfg("robustmed-prior").prior is False
    assert cfg("robustmed-weight_noise").weight_noise == "none" and cfg("robustmed-square_loss").loss == "trades"


def test_summarise_ablation_pairs_each_row_with_robustmed_by_seed():
    rows = []
    for seed in (0, 1, 2):
        rows.append({"name": "robustmed", "seed": seed, **{m: 0.7 for m in ablation.METRICS}})
        for row in ablation.ABLATIONS:
            rows.append({"name": row, "seed": seed, **{m: 0.7 - 0.01 * (seed + 1) for m in ablation.METRICS}})
    effects = ablation.summarise_ablation(pd.DataFrame(rows))
    assert len(effects) == len(ablation.ABLATIONS) * len(ablation.METRICS)
    assert set(effects["reference"]) == {"robustmed"} and (effects["n_pairs"] == 3).all()
    assert effects["gain_mean"].tolist() == pytest.approx([-0.02] * len(effects))
    assert (effects["gain_ci_low"] < -0.02).all() and (effects["gain_ci_high"] > -0.02).all()
    # a row without runs is left out, not reported as zero
    assert "cap" not in set(ablation.summarise_ablation(pd.DataFrame(rows).query("name != 'cap'"))["row"])


def test_run_ablation_trains_cap_robustmed_and_the_switched_rows_beside_the_fidelity_runs(reproduce_calls, tmp_path):
    calls = reproduce_calls
    ablation.run_ablation("cpu", data="phantom")
    assert calls["methods"] == "cap,robustmed"
    assert set(calls["variants"]) == set(ablation.ABLATIONS) - {"cap"}
    assert Path(calls["runs"]) == Path("runs/fidelity/cpu-phantom")
    assert Path(calls["out"]) == Path("results/ablation/cpu-phantom/all_runs")
    assert "no finished pairs" in (tmp_path / "results/ablation/cpu-phantom/table.md").read_text()


@pytest.mark.skipif(not (COMMITTED / "effects.csv").exists(), reason="no committed ablation results")
def test_the_committed_effects_are_what_the_committed_runs_give():
    runs = pd.read_csv(COMMITTED / "all_runs" / "runs.csv")
    committed = pd.read_csv(COMMITTED / "effects.csv")
    pd.testing.assert_frame_equal(committed, ablation.summarise_ablation(runs), check_dtype=False)
    assert set(runs["name"]) >= {"erm", "robustmed", *ablation.ABLATIONS}
    assert sorted(runs["seed"].unique()) == [0, 1, 2]
    env = json.loads((COMMITTED / "all_runs" / "environment.json").read_text())
    assert env["environment"]["packages"].get("torch")


def test_find_results_downloads_files_in_subfolders(monkeypatch, tmp_path):
    """On Colab the package has no results/ beside it: the files, subfolders included, come from the repository."""
    import urllib.request

    fetched = []

    def fake_urlopen(url, timeout):
        fetched.append(url)
        return io.BytesIO(url.encode())

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    monkeypatch.setenv("ROBUSTMED_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        "robustmed_lite.studies.summary.__file__", str(tmp_path / "site-packages/robustmed_lite/studies/summary.py")
    )
    folder = find_results("cpu-phantom", study="ablation", names=["effects.csv", "all_runs/runs.csv"])
    assert folder == tmp_path / "cache" / "results" / "ablation" / "cpu-phantom"
    assert (folder / "all_runs" / "runs.csv").read_text().endswith("/ablation/cpu-phantom/all_runs/runs.csv")
    assert len(fetched) == 2


@pytest.mark.parametrize("study", ["ablation", "fidelity"])
def test_the_command_line_runs_each_paired_study(study, reproduce_calls, tmp_path):
    from robustmed_lite.cli import main

    calls = reproduce_calls
    assert main([study, "--data", "phantom", "--seeds", "0,1", "--quiet"]) == 0
    assert list(calls["seeds"]) == [0, 1] and calls["progress"] is False
    assert (tmp_path / "results" / study / "cpu-phantom" / "effects.csv").exists()
