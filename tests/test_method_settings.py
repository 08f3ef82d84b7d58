"""Issue 31: each method's own weight-noise settings, CAP's epoch counting, no silently ignored option, comparators
chosen on validation, and the study's minimum detectable effect."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import yaml

from robustmed_lite.checkpoints import config_differences
from robustmed_lite.config import (
    CONFIG_DIR,
    METHOD_SETTINGS,
    PRESET_CHANGES,
    PRESETS,
    PUBLISHED_SETTINGS,
    SETTINGS_TABLE_FIELDS,
    load_config,
    scale_epochs,
    settings_markdown,
    settings_table,
)
from robustmed_lite.evaluation.stats import detection_power, minimum_detectable_effect, t_interval
from robustmed_lite.studies.fidelity import variants
from robustmed_lite.studies.run_evaluation import selected_validation
from robustmed_lite.studies.summary import summarise
from robustmed_lite.trainer import attack_steps_at, weight_noise_on


def _paper(method: str, **overrides):
    return load_config("paper", {"method": method, **overrides}, defaults={"data": "phantom"})


# ------------------------------------------------------------------------------- CAP's epoch counting (item 2)
def _caps_attack_steps(first_epochs: int) -> list[int]:
    """CAP's AttackPolicy as its loop drives it: one call per epoch e = 1, 2, ...; the step count grows by one in
    every even epoch below 20, capped at num_steps = 10."""
    steps, out = 1, []
    for e in range(1, first_epochs + 1):
        if 0 < e < 20 and e % 2 == 0:
            steps += 1
        out.append(min(steps, 10))
    return out


def test_attack_ramp_is_caps_for_the_first_20_epochs():
    cfg = _paper("trades")
    assert (cfg.attack_steps, cfg.attack_warmup_epochs) == (10, 18)
    ours = [attack_steps_at(cfg, epoch) for epoch in range(20)]  # the trainer counts its loop from 0
    assert ours == _caps_attack_steps(20)
    assert ours == [min(10, 1 + e // 2) for e in range(1, 21)]  # the closed form


def test_weight_noise_starts_in_caps_epoch_20():
    cfg = _paper("cap")
    assert cfg.weight_noise_warmup == 20
    on = [weight_noise_on(cfg, epoch) for epoch in range(20)]
    # CAP: `epoch >= cap_warmup` with epochs from 1: off in 1..19, on from 20 (the loop's epoch index 19)
    assert on == [e >= 20 for e in range(1, 21)] and on.index(True) == 19
    assert not any(weight_noise_on(_paper("erm"), epoch) for epoch in range(30)), "no noise without weight noise"


# ------------------------------------------------------------------------ each method's own settings (item 1)
def test_scale_epochs_is_one_rule_rounding_half_up_and_at_least_one():
    assert [scale_epochs(20, e, 200) for e in (6, 12, 30, 200)] == [1, 1, 3, 20]
    assert [scale_epochs(10, e, 200) for e in (6, 10, 30, 200)] == [1, 1, 2, 10]  # 0.5 and 1.5 round up


@pytest.mark.parametrize("preset", PRESETS)
def test_each_method_trains_with_its_own_published_scale_and_proxy(preset):
    configs = {m: load_config(preset, {"method": m}, defaults={"data": "phantom"}) for m in ("awp", "cap", "robustmed")}
    for method, cfg in configs.items():
        published = PUBLISHED_SETTINGS[METHOD_SETTINGS[method]]
        assert cfg.gamma == published["gamma"].value, method
        assert cfg.proxy_optimizer == published["proxy_optimizer"].value, method
    assert configs["awp"].gamma == 50 * configs["cap"].gamma  # AWP's 5e-3 against CAP's 1e-4
    assert configs["cap"].proxy_weight_decay == 1e-4 and configs["awp"].proxy_weight_decay is None
    assert configs["cap"].proxy_lr == configs["cap"].lr, "CAP's AdamW proxy steps at the model's lr"


def test_warm_ups_are_scaled_per_method_unless_the_preset_sets_one():
    assert (_paper("cap").weight_noise_warmup, _paper("awp").weight_noise_warmup) == (20, 10)
    colab = {m: load_config("colab", {"method": m}).weight_noise_warmup for m in ("cap", "robustmed", "awp")}
    assert colab == {"cap": 3, "robustmed": 3, "awp": 2}  # 20 and 10 of 200 epochs, scaled to 30
    demo = {m: load_config("cpu-demo", {"method": m}).weight_noise_warmup for m in ("cap", "awp")}
    assert demo == {"cap": 3, "awp": 3}, "cpu-demo sets its own warm-up (PRESET_CHANGES says why)"


def test_a_value_the_user_sets_wins_over_the_methods():
    cfg = load_config("cpu-demo", {"method": "cap", "gamma": 0.01, "weight_noise_warmup": 1})
    assert (cfg.gamma, cfg.weight_noise_warmup) == (0.01, 1)


def test_an_adamw_proxy_for_awp_takes_caps_weight_decay():
    cfg = load_config("cpu-demo", {"method": "awp", "proxy_optimizer": "adamw"})
    assert (cfg.proxy_weight_decay, cfg.proxy_lr) == (1e-4, cfg.lr)


def test_methods_without_weight_noise_carry_no_weight_noise_settings():
    cfg = load_config("cpu-demo", {"method": "trades"})
    assert (cfg.gamma, cfg.proxy_lr, cfg.proxy_weight_decay) == (None, None, None)


def test_settings_table_covers_every_method_with_weight_noise_and_every_preset():
    table = settings_table()
    assert list(table.columns) == ["method", "setting", "published", "source", *PRESETS, "preset changes"]
    noisy = table[table["setting"] != "attack_warmup_epochs"]
    assert set(noisy["method"]) == {"awp", "cap", "robustmed"}
    assert all(set(noisy[noisy["method"] == m]["setting"]) == set(SETTINGS_TABLE_FIELDS) for m in METHOD_SETTINGS)
    assert all(":" in source for source in table["source"]), "each source gives file:line"
    cap_gamma = table[(table["method"] == "cap") & (table["setting"] == "gamma")].iloc[0]
    assert [cap_gamma[p] for p in PRESETS] == [1e-4] * len(PRESETS)
    assert "scale_epochs" in table[table["setting"] == "weight_noise_warmup"]["preset changes"].iloc[0]
    assert settings_markdown().startswith("| method | setting |")


def test_every_per_method_setting_a_preset_sets_has_its_reason():
    per_method = set(SETTINGS_TABLE_FIELDS) | {"attack_warmup_epochs"}
    for preset in PRESETS:
        values = yaml.safe_load((CONFIG_DIR / f"{preset}.yaml").read_text())
        assert "gamma" not in values, f"{preset}: gamma is each method's own"
        for key in per_method & set(values):
            published = 18 if key == "attack_warmup_epochs" else None
            scaled = published is not None and values[key] == scale_epochs(published, values["epochs"], 200)
            assert scaled or (preset, key) in PRESET_CHANGES, (preset, key)


def test_the_fidelity_awp_warmup_row_waits_longer_than_awp():
    for epochs, awp_warmup in ((10, 3), (10, 1), (30, 2), (200, 10)):
        assert variants(epochs, awp_warmup)["awp+warmup"]["weight_noise_warmup"] > awp_warmup


# -------------------------------------------------------------------------------- no ignored option (item 3)
@pytest.mark.parametrize(
    ("method", "option", "value", "reader"),
    [
        ("trades", "smooth", 0.1, "square_kl"),
        ("trades", "target_grad", True, "square_kl"),
        ("robustmed", "tau", 2, "fat"),
        ("erm", "gamma", 0.01, "weight noise"),
        ("trades", "weight_noise_warmup", 3, "weight noise"),
        ("erm", "proxy_lr", 0.01, "weight noise"),
        ("awp", "proxy_weight_decay", 0.01, "AdamW proxy"),
        ("cap", "weight_feedback_share", 0.5, "weight_feedback"),
        ("trades", "prior_eps", 0.01, "lung-prior"),
        ("pgd_at", "prior_view", "package", "lung-prior"),
    ],
)
def test_an_option_set_on_the_command_line_that_nothing_reads_is_an_error(method, option, value, reader):
    with pytest.raises(ValueError, match=rf"{option}=.*{reader}.*Fix"):
        load_config("cpu-demo", {"method": method, option: value})


def test_proxy_attention_without_the_prior_is_an_error_or_a_said_ablation():
    with pytest.warns(UserWarning, match="reduces to -CE .*the no-prior ablation"):
        assert load_config("cpu-demo", {"method": "cap", "prior": False}).weight_noise == "proxy_attention"
    with pytest.raises(ValueError, match="reduces to -CE"):
        load_config("cpu-demo", {"method": "awp", "weight_noise": "proxy_attention"})


def test_preset_values_and_shared_defaults_stay_silent():
    # cpu-demo sets weight_noise_warmup and beta for every method; erm reads neither
    assert load_config("cpu-demo", {"method": "erm"}).weight_noise_warmup == 3
    cfg = load_config("cpu-demo", {"method": "erm"}, defaults={"gamma": 0.01, "tau": 3, "smooth": 0.1})
    assert cfg.gamma == 0.01 and cfg.tau == 3


def test_a_users_yaml_is_explicit_and_a_runs_record_is_not(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text("method: erm\ngamma: 0.01\n")
    with pytest.raises(ValueError, match="gamma=0.01 is set"):
        load_config(mine)
    record = tmp_path / "config.yaml"
    record.write_text(yaml.safe_dump(load_config("cpu-demo", {"method": "robustmed"}).to_dict()))
    assert "eps_text" in record.read_text() and "tau: 0" in record.read_text()
    assert load_config(record).method == "robustmed", "a run's config.yaml records values, it does not choose them"


def test_a_saved_run_matches_whatever_it_held_in_settings_its_method_never_reads():
    cfg = load_config("cpu-demo", {"method": "trades"})
    saved = dict(cfg.to_dict(), gamma=0.005, proxy_lr=0.01, prior_eps=0.5)  # recorded by an older version
    assert config_differences(saved, cfg) == []
    assert config_differences(dict(saved, beta=1.0), cfg) == ["beta"]


# ------------------------------------------------------------------ comparators and power (items 4 and 5)
def _runs(val_clean: dict, test_clean: dict, seeds=(0, 1, 2)) -> pd.DataFrame:
    rows = []
    for name in test_clean:
        for seed in seeds:
            row = {"name": name, "method": name, "seed": seed, "clean_accuracy": test_clean[name] + 0.01 * seed}
            if val_clean is not None:
                row["val_clean"] = val_clean[name]
            rows.append(row)
    return pd.DataFrame(rows)


def test_the_comparator_is_chosen_on_validation_and_cap_is_a_prior_defence():
    # On test, trades looks best of the prior methods; on validation, cap does: validation decides.
    runs = _runs(
        val_clean={"robustmed": 0.9, "erm": 0.7, "trades": 0.75, "cap": 0.85},
        test_clean={"robustmed": 0.80, "erm": 0.70, "trades": 0.82, "cap": 0.78},
    )
    summary = summarise(runs)
    verdicts = summary["verdicts"].set_index("comparator")
    for comparator in ("best prior method", "best prior defence"):
        assert verdicts.loc[comparator, "comparator_method"] == "cap"
        assert verdicts.loc[comparator, "chosen_on"] == "validation (val_clean)"
    assert verdicts.loc["best prior defence", "gain_mean"] == pytest.approx(0.80 - 0.78)


def test_results_without_validation_metrics_fall_back_to_the_test_split_and_say_so():
    runs = _runs(None, {"robustmed": 0.80, "erm": 0.70, "trades": 0.82, "cap": 0.78})
    verdict = summarise(runs)["verdicts"].set_index("comparator").loc["best prior method"]
    assert (verdict["comparator_method"], verdict["chosen_on"]) == ("trades", "test")


def test_selected_validation_reads_the_selected_epochs_log_row():
    history = [{"epoch": 1, "val_clean": 0.6, "val_robust": 0.3}, {"epoch": 2, "val_clean": 0.7, "val_robust": 0.2}]
    assert selected_validation(history, 2) == {"val_clean": 0.7, "val_robust": 0.2}
    assert all(math.isnan(v) for v in selected_validation(history, 5).values())


def test_minimum_detectable_effect_has_80_percent_power_and_the_normal_limit():
    mde = minimum_detectable_effect(3, 0.02)
    assert detection_power(mde, 3, 0.02) == pytest.approx(0.8, abs=1e-6)
    assert detection_power(0.0, 3, 0.02) == pytest.approx(0.05, abs=1e-6), "no effect: the test's level"
    assert minimum_detectable_effect(3, 0.04) == pytest.approx(2 * mde), "linear in the spread"
    assert minimum_detectable_effect(5, 0.02) < mde, "more seeds detect smaller effects"
    # many pairs: (z_0.975 + z_0.8) * std / sqrt(n) = 2.8016 * std / sqrt(n)
    assert minimum_detectable_effect(10_000, 1.0) * 100 == pytest.approx(2.8016, abs=2e-3)
    assert math.isnan(minimum_detectable_effect(1, 0.02)) and minimum_detectable_effect(3, 0.0) == 0.0


def test_the_verdict_table_gives_each_claims_minimum_detectable_effect():
    runs = _runs(
        val_clean={"robustmed": 0.9, "erm": 0.7, "trades": 0.8},
        test_clean={"robustmed": 0.80, "erm": 0.70, "trades": 0.79},
    )
    runs.loc[(runs["name"] == "robustmed") & (runs["seed"] == 1), "clean_accuracy"] += 0.03  # some spread
    verdict = summarise(runs)["verdicts"].set_index("comparator").loc["best prior defence"]
    ours = runs[runs["name"] == "robustmed"].set_index("seed")["clean_accuracy"]
    theirs = runs[runs["name"] == "trades"].set_index("seed")["clean_accuracy"]
    diffs = t_interval(list(ours - theirs))
    assert verdict["mde"] == pytest.approx(minimum_detectable_effect(3, diffs.std))
    assert verdict["ci_half_width"] == pytest.approx(diffs.half_width)
    assert verdict["mde"] > verdict["ci_half_width"] > 0


def test_the_books_settings_page_is_the_tables_output():
    """book/settings.md is what ``tools/settings_table.py --out`` writes from the code: it cannot drift."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("settings_table", root / "tools" / "settings_table.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    from robustmed_lite.config import settings_markdown

    assert (root / "book" / "settings.md").read_text() == tool.PAGE_HEAD + settings_markdown()
