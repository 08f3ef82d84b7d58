"""The weight-noise-scale sweep: its rows, the choice on validation, and one tiny study on the phantom."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from _small import SIZES

from robustmed_lite.studies import sweep
from robustmed_lite.studies.writeup import study_of, writeup


def test_each_method_keeps_its_name_at_its_published_value_and_gets_variants_at_the_others():
    rows, variants = sweep.sweep_rows(("robustmed", "awp"), epochs=10)
    assert rows == ["erm", "robustmed", "awp"]
    assert variants == {
        "robustmed+gamma0.001": {"method": "robustmed", "gamma": 1e-3},
        "robustmed+gamma0.005": {"method": "robustmed", "gamma": 5e-3},
        "awp+gamma0.0001": {"method": "awp", "gamma": 1e-4},
        "awp+gamma0.001": {"method": "awp", "gamma": 1e-3},
    }


def _runs(values: dict[float, list[float]], method: str = "robustmed") -> pd.DataFrame:
    rows = [
        {"method": method, "gamma": g, "seed": s, "val_robust": v, "val_clean": 0.9}
        for g, per_seed in values.items()
        for s, v in enumerate(per_seed)
    ]
    return pd.DataFrame(rows)


def test_the_choice_is_the_highest_mean_validation_pgd_accuracy_with_its_t_interval():
    choice = sweep.choose(_runs({1e-4: [0.50, 0.52, 0.54], 1e-3: [0.60, 0.62, 0.64]}), {"robustmed": 1e-4})
    chosen = choice[choice["chosen"]].iloc[0]
    assert chosen["gamma"] == 1e-3 and not chosen["published"]
    assert chosen["val_robust_mean"] == pytest.approx(0.62)
    half = 4.302652729911275 * 0.02 / math.sqrt(3)  # t_{0.975, 2} * s / sqrt(n)
    assert chosen["val_robust_ci_high"] - chosen["val_robust_mean"] == pytest.approx(half)
    assert choice["chosen"].sum() == 1


def test_a_tie_goes_to_the_published_value():
    choice = sweep.choose(_runs({1e-4: [0.5, 0.6], 1e-3: [0.6, 0.5], 5e-3: [0.4, 0.4]}), {"robustmed": 1e-3})
    assert choice.loc[choice["chosen"], "gamma"].tolist() == [1e-3]


def test_a_method_without_weight_noise_is_refused():
    with pytest.raises(ValueError, match="methods with weight noise"):
        sweep.run_sweep("cpu", data="phantom", methods="trades", out="unused", runs="unused")


@pytest.mark.timeout(900)
def test_a_tiny_sweep_on_the_phantom_reads_only_validation_and_writes_its_page(tmp_path):
    small = dict(SIZES, epochs=1, attack_steps=2, eval_attack_steps=2, eps="8/255", step_size="2/255")
    choice = sweep.run_sweep(
        "cpu",
        data="phantom",
        methods="robustmed",
        seeds="0",
        out=tmp_path / "out",
        runs=tmp_path / "runs",
        jobs=1,
        overrides=small,
        progress=False,
    )
    assert sorted(choice["gamma"]) == sorted(sweep.GAMMAS)
    assert choice["chosen"].sum() == 1
    runs = pd.read_csv(tmp_path / "out" / "runs.csv")
    assert set(runs["name"]) == {"robustmed", "robustmed+gamma0.001", "robustmed+gamma0.005"}
    assert "test" not in " ".join(runs.columns)  # validation metrics only
    assert study_of(tmp_path / "out") == "sweep"
    page = (tmp_path / "out" / "README.md").read_text()
    assert page == writeup(tmp_path / "out")
    assert "one seed gives no interval" in page
