"""config.py: presets, YAML files, overrides, type coercion, eps as k/255, unknown keys, the methods'
settings, and the paper's additions to CAP as switches that default off."""

from __future__ import annotations

import pytest

from robustmed_lite.config import PAPER_ADDITIONS, PRESETS, load_config, paper_additions_table


def _preset_overrides(preset: str, tmp_path) -> dict:
    # The paper preset refuses to run without data: any existing folder passes the check (nothing is loaded).
    return {"data": str(tmp_path)} if preset == "paper" else {}


@pytest.mark.parametrize("preset", PRESETS)
def test_cap_and_robustmed_use_caps_view_and_the_package_view_stays_an_option(preset, tmp_path):
    extra = _preset_overrides(preset, tmp_path)
    for method in ("cap", "robustmed"):
        assert load_config(preset, {"method": method, **extra}).prior_view == "cap"
        assert load_config(preset, {"method": method, "prior_view": "package", **extra}).prior_view == "package"
    with pytest.raises(ValueError, match="prior_view"):
        load_config("cpu-demo", {"method": "cap", "prior_view": "fancy"})


# ------------------------------------------------------------------------------- 3. the soft-target gradient
@pytest.mark.parametrize("preset", PRESETS)
def test_cap_backpropagates_through_the_soft_target_in_every_preset(preset, tmp_path):
    extra = _preset_overrides(preset, tmp_path)
    for method in ("cap", "robustmed"):
        assert load_config(preset, {"method": method, **extra}).target_grad is True
        assert load_config(preset, {"method": method, "target_grad": "false", **extra}).target_grad is False
    assert load_config(preset, {"method": "trades", **extra}).target_grad is False


# ------------------------------------------------------------------------ 4. the two readings of the abstract
def test_the_readings_are_switches_that_default_off_and_are_documented():
    for method in ("cap", "robustmed"):
        cfg = load_config("cpu-demo", {"method": method})
        assert cfg.weight_feedback is False and cfg.prior_samples == 0.0
    assert {"weight_feedback", "prior_samples"} <= set(PAPER_ADDITIONS)
    assert all("interpretation" in PAPER_ADDITIONS[k][1] for k in ("weight_feedback", "prior_samples"))
    with pytest.raises(ValueError, match="weight_feedback"):
        load_config("cpu-demo", {"method": "trades", "weight_feedback": True})
    with pytest.raises(ValueError, match="prior_samples"):
        load_config("cpu-demo", {"method": "trades", "prior_samples": 0.5})
    with pytest.raises(ValueError, match="prior_samples"):
        load_config("cpu-demo", {"method": "cap", "prior_samples": 1.5})


@pytest.mark.parametrize("preset", PRESETS)
def test_robustmed_differs_from_cap_only_by_the_papers_additions(preset, tmp_path):
    extra = _preset_overrides(preset, tmp_path)
    cap = load_config(preset, {"method": "cap", **extra}).to_dict()
    robustmed = load_config(preset, {"method": "robustmed", **extra}).to_dict()
    differ = {k for k in cap if cap[k] != robustmed[k]}
    assert differ - {"method"} <= set(PAPER_ADDITIONS), differ
    assert "feedback" in differ  # the one addition that is on by default
    table = paper_additions_table()
    assert list(table.columns[:3]) == ["awp", "cap", "robustmed"]
    shown = table[table["cap"] != table["robustmed"]].index
    assert set(shown) <= set(PAPER_ADDITIONS) and all(table.loc[k, "paper's addition to CAP"] for k in PAPER_ADDITIONS)


def test_yaml_preset_values_follow_the_same_rules(tmp_path):
    preset = tmp_path / "mine.yaml"
    preset.write_text("epochs: true\n")
    with pytest.raises(ValueError, match=r"mine\.yaml: epochs takes an integer, got True"):
        load_config(preset)


def test_component_none_means_none_not_the_methods_default():
    cfg = load_config("cpu-demo", {"method": "robustmed", "feedback": "none", "weight_noise": "None"})
    assert cfg.feedback == "none" and cfg.weight_noise == "none"


def test_bad_component_settings_are_refused():
    with pytest.raises(ValueError, match="acq_aug is a probability"):
        load_config("cpu-demo", {"acq_aug": 1.5})
    with pytest.raises(ValueError, match="intensity='zscore' is not one of"):
        load_config("cpu-demo", {"intensity": "zscore"})
    with pytest.raises(FileNotFoundError, match="ood_data '/nowhere:test' does not exist"):
        load_config("cpu-demo", {"ood_data": "/nowhere:test"})
