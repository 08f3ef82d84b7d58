"""studies/fidelity.py: the rows of the fidelity study differ from their method only where named, share one
clean run, are summarised paired by seed, and old runs are summarised under the plan's names."""

from __future__ import annotations

import pandas as pd
import pytest

from robustmed_lite.config import load_config
from robustmed_lite.studies.fidelity import FORMER


# ------------------------------------------------------------------- the measurement behind the defaults
def test_the_fidelity_rows_differ_from_their_method_only_where_named():
    from robustmed_lite.studies.fidelity import variants

    rows = variants(epochs=10)
    for name, row in rows.items():
        settings = {k: v for k, v in row.items() if k != "method"}
        base = load_config("cpu-demo", {"method": row["method"]}).to_dict()
        mine = load_config("cpu-demo", dict(row)).to_dict()
        changed = {k for k in base if base[k] != mine[k]}
        # each optimizer's own default lr, and the weight decay only the AdamW proxy has (None for SGD's)
        derived = {"proxy_lr", "proxy_weight_decay"} if "proxy_optimizer" in settings else set()
        assert changed - derived == set(settings), name  # each named setting changes something, nothing else
    assert {k: rows["robustmed_v0"][k] for k in FORMER} == FORMER
    # awp+warmup doubles awp's clean epochs: 2 -> 4 (noise from epoch 5); AWP's 9 of 200 -> 18 (from epoch 19)
    assert variants(epochs=10, awp_warmup=3)["awp+warmup"]["weight_noise_warmup"] == 5
    assert variants(epochs=200)["awp+warmup"]["weight_noise_warmup"] == 19


def test_fidelity_rows_share_the_plain_clean_run(tmp_path):
    """The rows differ only in robust-stage settings, so every one starts from the same seed's plain ERM run."""
    from robustmed_lite.studies.fidelity import variants
    from robustmed_lite.studies.plan import PROFILES, build_plan

    plan = build_plan(
        PROFILES["cpu"], "phantom", ["trades", "awp", "cap", "robustmed"], [0], tmp_path, variants=variants(10)
    )
    assert [s.name for s in plan if s.init_from is None] == ["erm"]
    assert all(
        s.reference == "erm" and s.init_from == tmp_path / "erm-seed0" / "best_clean.pt"
        for s in plan
        if s.init_from is not None
    )
    # A data setting still gets its own clean run (the cross-site study's rows).
    sites = build_plan(
        PROFILES["cpu"],
        "phantom",
        ["trades"],
        [0],
        tmp_path,
        variants={"trades+crop": {"method": "trades", "lung_crop": True}},
    )
    assert sorted(s.name for s in sites if s.init_from is None) == ["erm", "erm+crop"]


def test_summarise_fidelity_pairs_rows_by_seed():
    from robustmed_lite.studies.fidelity import comparisons, effects_markdown, summarise_fidelity

    rows = []
    for seed in (0, 1, 2):
        for _, row, reference in comparisons():
            for name, shift in ((row, 0.02 * (seed + 1)), (reference, 0.0)):
                rows.append(
                    {
                        "name": name,
                        "seed": seed,
                        "clean_accuracy": 0.8 + shift,
                        "pgd10_train_eps": 0.5 - shift,
                        "pgd10_8_255": 0.3,
                        "ensemble_train_eps": 0.45,
                    }
                )
    runs = pd.DataFrame(rows).drop_duplicates(["name", "seed"])
    effects = summarise_fidelity(runs)
    cap = effects[(effects["row"] == "cap") & (effects["metric"] == "clean_accuracy")].iloc[0]
    assert cap["reference"] == "cap_v0" and cap["n_pairs"] == 3
    assert cap["gain_mean"] == pytest.approx(0.04) and cap["gain_ci_low"] < 0.04 < cap["gain_ci_high"]
    robust = effects[(effects["row"] == "cap") & (effects["metric"] == "pgd10_train_eps")].iloc[0]
    assert robust["gain_mean"] == pytest.approx(-0.04)
    assert "+0.040" in effects_markdown(effects, "test") and "(n=3)" in effects_markdown(effects, "test")
    assert summarise_fidelity(runs[runs["name"] != "trades"]).query("reference == 'trades'").empty


def test_the_phantom_study_trains_only_the_rows_of_its_questions(reproduce_calls, tmp_path):
    from robustmed_lite.studies import fidelity

    calls = reproduce_calls
    fidelity.run_fidelity("cpu", data="phantom", out=tmp_path / "phantom", runs=tmp_path / "runs")
    assert calls["methods"] == "cap,robustmed" and set(calls["variants"]) == set(fidelity.PHANTOM_ROWS)
    assert (tmp_path / "phantom" / "table.md").read_text().count("no finished pairs") == 1
    fidelity.run_fidelity("cpu", data=str(tmp_path), out=tmp_path / "real", runs=tmp_path / "runs")
    assert calls["methods"] == "trades,awp,cap,robustmed" and set(calls["variants"]) == set(fidelity.variants(10))


def test_rows_trains_only_the_named_comparisons_and_their_references_into_a_folder_of_their_own(
    reproduce_calls, tmp_path
):
    from robustmed_lite.studies import fidelity

    calls = reproduce_calls
    fidelity.run_fidelity("cpu", data=str(tmp_path), out=tmp_path / "awp", only=["awp", "awp+warmup"])
    assert calls["methods"] == "trades,awp" and set(calls["variants"]) == {"awp+warmup"}
    with pytest.raises(ValueError, match=r"--rows without --out would replace the whole study's folder"):
        fidelity.run_fidelity("cpu", data=str(tmp_path), only=["awp+warmup"])
    with pytest.raises(ValueError, match=r"--rows awp\+cooldown: the fidelity study compares the rows cap, "):
        fidelity.run_fidelity("cpu", data=str(tmp_path), out=tmp_path / "x", only=["awp+cooldown"])


def test_a_renamed_run_folder_is_summarised_under_the_plans_name(tmp_path):
    """Old runs reused under a new row name (the former defaults as ``cap_v0``) keep the record written when the
    folder was called ``cap``: the summary names the row as the plan does, and mCE finds its reference."""
    from robustmed_lite.studies.plan import RunSpec
    from robustmed_lite.studies.run_evaluation import EvalSettings, write_json
    from robustmed_lite.studies.summary import collect_rows

    settings = EvalSettings((4 / 255,), 0, 1, 1, 1, (), None)
    corruptions = pd.DataFrame({"corruption": ["gaussian_noise"] * 2, "severity": [0, 1], "accuracy": [0.9, 0.6]})
    specs = []
    for name, stored, seed in (("erm", "erm", 0), ("cap_v0", "cap", 0)):
        run_dir = tmp_path / f"{name}-seed{seed}"
        run_dir.mkdir()
        write_json(
            settings.eval_file(run_dir),
            {
                "settings": settings.to_dict(),
                "row": {"name": stored, "method": stored.split("_")[0], "seed": seed, "clean_accuracy": 0.8},
            },
        )
        corruptions.to_csv(settings.corruption_file(run_dir), index=False)
        specs.append(RunSpec(name, seed, "cpu-demo", {"method": stored}, run_dir, None))
    rows = collect_rows(specs, settings)
    assert rows["name"].tolist() == ["erm", "cap_v0"]
    assert rows.set_index("name").loc["cap_v0", "mce_all"] == pytest.approx(1.0)  # the same errors as its ERM
