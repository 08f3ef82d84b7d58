"""config.py: presets, YAML files, overrides, type coercion, eps as k/255, unknown keys, the methods'
settings, and the paper's additions to CAP as switches that default off."""

from __future__ import annotations

import re

import pytest
import yaml

from robustmed_lite.common import parse_eps
from robustmed_lite.config import CONFIG_DIR, PAPER_ADDITIONS, PRESETS, load_config, paper_additions_table


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


# ------------------------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("preset", ["cpu-demo", "colab"])
def test_a_preset_is_its_yaml_file(preset):
    """Every key of a preset's YAML file arrives in the config, with the field's type (eps and step_size parsed
    from k/255)."""
    values = yaml.safe_load((CONFIG_DIR / f"{preset}.yaml").read_text())
    cfg = load_config(preset)
    for key, value in values.items():
        if key in ("eps", "step_size"):
            assert getattr(cfg, key) == pytest.approx(parse_eps(value)), key
        else:
            assert getattr(cfg, key) == value, key
            assert type(getattr(cfg, key)) is type(value) or isinstance(value, int), key
    assert cfg.img_size == values["img_size"] and isinstance(cfg.lr, float)


def test_the_cpu_demo_preset_by_value():
    """A few settings of the CPU preset, written out: what the laptops of a workshop train with."""
    cfg = load_config("cpu-demo")
    assert (cfg.model, cfg.img_size, cfg.epochs, cfg.batch_size) == ("tiny_visformer", 64, 6, 64)
    assert cfg.lr == 0.002 and cfg.eps == pytest.approx(4 / 255) and cfg.step_size == pytest.approx(1 / 255)
    assert cfg.to_dict()["eps_text"] == "4/255"


def test_overrides_win_and_command_line_strings_are_coerced_by_the_fields_type():
    """Overrides replace the preset's values; strings become int, float, bool or eps as the field declares."""
    cfg = load_config(
        "cpu-demo",
        {"epochs": "3", "lr": "1e-3", "hflip": "no", "eps": "8/255", "beta": 2, "n_train": 100.0, "prior": "1"},
    )
    assert cfg.epochs == 3 and type(cfg.epochs) is int
    assert cfg.lr == 0.001 and type(cfg.lr) is float
    assert cfg.hflip is False and cfg.prior is True
    assert cfg.beta == 2.0 and type(cfg.beta) is float
    assert cfg.n_train == 100 and type(cfg.n_train) is int
    assert cfg.eps == pytest.approx(8 / 255) and cfg.to_dict()["eps_text"] == "8/255"
    assert load_config("cpu-demo").epochs == 6, "the preset itself is unchanged"


@pytest.mark.parametrize(
    "text,value", [("8/255", 8 / 255), (" 2 / 255 ", 2 / 255), ("0.03", 0.03), (0.03, 0.03), ("1e-2", 0.01)]
)
def test_eps_is_a_number_or_a_fraction(text, value):
    """eps may be given as k/255 (a fraction with spaces around its slash) or as a number."""
    assert load_config("cpu-demo", {"eps": text}).eps == pytest.approx(value, rel=1e-12)


def test_a_yaml_file_is_read_by_the_same_rules_and_overrides_apply_on_top(tmp_path):
    """A YAML path is a preset: its strings are coerced like the command line's, and overrides still win."""
    path = tmp_path / "mine.yaml"
    path.write_text("method: trades\nepochs: '4'\neps: 2/255\nhflip: yes\nlr: 5e-4\n")
    cfg = load_config(path)
    assert cfg.method == "trades" and cfg.epochs == 4 and cfg.hflip is True and cfg.lr == 5e-4
    assert cfg.eps == pytest.approx(2 / 255)
    assert load_config(str(path), {"epochs": 7}).epochs == 7


def test_a_saved_config_loads_back_to_the_same_config(tmp_path):
    """A run's config.yaml (to_dict, with the derived eps_text beside eps) loads back to the same settings."""
    cfg = load_config("cpu-demo", {"method": "robustmed", "eps": "8/255", "epochs": 3})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert load_config(path).to_dict() == cfg.to_dict()


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"epoch": 3}, "unknown config key 'epoch'; known keys: "),
        ({"epochs": "1.5"}, "epochs takes an integer, got '1.5'"),
        ({"epochs": True}, "epochs takes an integer, got True"),
        ({"hflip": "maybe"}, "hflip takes true or false, got 'maybe'"),
        ({"lr": "fast"}, "lr takes a number, got 'fast'"),
        ({"lr": "inf"}, "lr takes a finite number"),
        ({"eps": "8/0"}, "eps: "),
        ({"eps": "eight"}, "eps: "),
        ({"method": "magic"}, "unknown method 'magic'"),
        ({"model": True}, "model takes text, got True"),
    ],
)
def test_bad_overrides_are_refused_with_a_message_naming_the_key(overrides, message):
    """Each bad value names its key, what it takes and what it got."""
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config("cpu-demo", overrides)


def test_unknown_keys_in_a_yaml_file_are_refused_and_the_known_ones_listed(tmp_path):
    """A typo in a YAML file is not silently ignored: the message names the key, the file and the known keys."""
    path = tmp_path / "typo.yaml"
    path.write_text("epochs: 2\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"unknown config keys \['learning_rate'\] in .*typo\.yaml") as err:
        load_config(path)
    assert "known keys:" in str(err.value) and " lr," in str(err.value)


def test_bad_preset_files_are_clear_errors(tmp_path):
    """A missing preset lists the presets; a file that is not YAML or not a mapping says so."""
    with pytest.raises(FileNotFoundError, match=re.escape(f"use one of {PRESETS}")):
        load_config("cpu-dmeo")
    broken = tmp_path / "broken.yaml"
    broken.write_text("epochs: [2\n")
    with pytest.raises(ValueError, match="is not valid YAML"):
        load_config(broken)
    listed = tmp_path / "list.yaml"
    listed.write_text("- epochs\n- 2\n")
    with pytest.raises(ValueError, match="holds a list, not a mapping"):
        load_config(listed)
