"""The attention study: its summary and paired differences on constructed rows, its clear errors, a tiny run on
fake checkpoints of the phantom, and chapter 05's reading of the committed folder."""

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from robustmed_lite.book.realct import attention_facts, committed_attention
from robustmed_lite.cli import main
from robustmed_lite.config import load_config
from robustmed_lite.models import create_model
from robustmed_lite.studies import attention
from robustmed_lite.studies.writeup import study_of, write_index, writeup

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "results" / "attention" / "cpu"


def _rows():
    """Three seeds of robustmed and trades on one map; robustmed is higher by 0.01, 0.02, 0.03."""
    rows = []
    for seed, (mine, theirs) in enumerate(((0.41, 0.40), (0.44, 0.42), (0.43, 0.40))):
        for name, ratio in (("robustmed", mine), ("trades", theirs)):
            rows.append(
                {
                    "name": name,
                    "seed": seed,
                    "map": "attention s2",
                    "n_slices": 10,
                    "lung_ratio": ratio,
                    "lung_area": 0.4,
                    "excess": ratio - 0.4,
                    "share_empty_mask": 0.1,
                    "test_accuracy": 0.9,
                }
            )
    return pd.DataFrame(rows)


def test_the_summary_is_the_mean_and_t_interval_over_seeds():
    summary = attention.summarise(_rows()).set_index("name")
    mine = summary.loc["robustmed"]
    assert mine["n_seeds"] == 3
    assert mine["lung_ratio_mean"] == pytest.approx(0.42667, abs=1e-5)
    # sd of (0.41, 0.44, 0.43) is 0.015275; t(0.975, 2) = 4.3027
    half = 4.302653 * 0.0152753 / 3**0.5
    assert mine["lung_ratio_ci_high"] - mine["lung_ratio_mean"] == pytest.approx(half, rel=1e-4)
    assert mine["excess_mean"] == pytest.approx(0.02667, abs=1e-5)
    assert mine["lung_area_mean"] == pytest.approx(0.4)


def test_the_paired_difference_is_the_method_minus_each_other_row_by_seed():
    pairs = attention.paired(_rows())
    assert len(pairs) == 1
    p = pairs.iloc[0]
    assert (p["reference"], p["comparator"], p["n_pairs"]) == ("robustmed", "trades", 3)
    assert p["diff_mean"] == pytest.approx(0.02)
    assert p["diff_sd"] == pytest.approx(0.01)
    half = 4.302653 * 0.01 / 3**0.5
    assert (p["diff_ci_low"], p["diff_ci_high"]) == pytest.approx((0.02 - half, 0.02 + half), rel=1e-4)
    assert p["mde"] > half  # 80% power needs more than the interval's half-width


def test_a_missing_runs_folder_is_one_line_naming_the_path_and_the_fix(tmp_path, capsys):
    missing = tmp_path / "no_runs"
    assert main(["attention", "--runs", str(missing), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "Fix:" in err and "reproduce" in err
    assert len(err.strip().splitlines()) == 1


def test_a_run_without_its_checkpoint_is_named(tmp_path, capsys):
    run = tmp_path / "runs" / "trades-seed0"
    run.mkdir(parents=True)
    (run / "trained.json").write_text("{}")
    args = ["attention", "--runs", str(tmp_path / "runs"), "--methods", "trades", "--seeds", "0"]
    assert main([*args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(run / "best_robust.pt") in err and "leave seed 0 out" in err


def _fake_runs(root: Path, methods, seeds) -> None:
    """Finished runs of the phantom at 32 px whose checkpoints hold random weights (nothing is trained)."""
    for method in methods:
        for seed in seeds:
            run = root / f"{method}-seed{seed}"
            run.mkdir(parents=True)
            cfg = load_config(
                "cpu-demo",
                dict(method=method, seed=seed, data="phantom", img_size=32, n_train=32, n_val=16, n_test=24),
            )
            cfg.out_dir = str(run)
            torch.manual_seed(seed + 10 * len(method))
            model = create_model(cfg.model, num_classes=2, img_size=32)
            state = {"model": model.state_dict(), "config": cfg.to_dict(), "epoch": 1}
            torch.save(state, run / attention.selected_checkpoint_name(method))
            (run / "trained.json").write_text(json.dumps({"epochs": 1}))


@pytest.mark.timeout(600)
def test_a_tiny_study_on_fake_runs_writes_its_files_and_page(tmp_path):
    runs_root = tmp_path / "runs" / "reproduction" / "cpu"
    _fake_runs(runs_root, ("erm", "robustmed"), (0, 1))
    out = tmp_path / "results" / "attention" / "cpu"
    result = attention.run_attention("cpu", "erm,robustmed", None, runs_root, out, progress=False, command=["x"])
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 4 * len(attention.MAPS) and runs["test_split"].nunique() == 1
    assert set(result["summary"]["name"]) == {"erm", "robustmed", "untrained"}
    assert set(result["paired"]["comparator"]) == {"erm"} and (result["paired"]["n_pairs"] == 2).all()
    for name in ("summary.csv", "paired.csv", "untrained.csv", "attention.png", "profile.json", "timings.json"):
        assert (out / name).exists(), name
    assert not (out / attention.PARTIAL).exists()
    assert str(tmp_path) not in (out / "profile.json").read_text()  # machine paths made relative
    assert study_of(out) == "attention"
    page = (out / "README.md").read_text()
    assert page == writeup(out) and "estimated" in page and "The method minus ERM" in page
    index = write_index(tmp_path / "results").read_text()
    assert "[attention/cpu](attention/cpu/README.md) | attention | phantom | 4 | 0, 1 |" in index


def test_chapter_05_reads_the_committed_study():
    if not (COMMITTED / "summary.csv").exists():
        pytest.skip("results/attention/cpu is absent: python -m robustmed_lite attention --profile cpu writes it")
    study = committed_attention(COMMITTED)
    assert list(study["table"].columns[-2:]) == ["untrained", "uniform map"]
    assert study["table"].index.name == "map" and len(study["table"]) == study["summary"]["map"].nunique()
    facts = attention_facts(study["summary"], study["paired"])
    assert facts["att_n_seeds"] >= 2
    assert facts["att_trades_ci_low"] <= facts["att_trades_low"] <= facts["att_trades_high"]
    assert "maps" in facts["att_cap_verdict"] or "contain zero" in facts["att_cap_verdict"]
