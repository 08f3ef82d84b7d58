"""checkpoints.py: a saved config is compared with the current one field by field (fields added later
match the settings the run was trained with), and bad checkpoint files say what they are."""

from __future__ import annotations

import pytest
from _bad_files import bad_checkpoint

from robustmed_lite.checkpoints import CheckpointError, config_differences, model_from_checkpoint
from robustmed_lite.config import ADDED_FIELDS, load_config
from robustmed_lite.studies.fidelity import FORMER


def _saved_before_the_new_fields(cfg) -> dict:
    """A run's saved config as the code wrote it before the fields of ``ADDED_FIELDS`` existed."""
    return {k: v for k, v in cfg.to_dict().items() if k not in ADDED_FIELDS}


@pytest.mark.parametrize(
    "method,overrides,expected",
    [
        ("trades", {}, []),  # the new fields have no effect on TRADES: its old runs are reused
        ("awp", {}, []),  # AWP's proxy was and is the stateless SGD step
        ("cap", FORMER, []),  # the former defaults, stated: the old run is exactly this
        ("cap", {}, ["prior_view", "proxy_lr", "proxy_optimizer", "proxy_weight_decay", "target_grad"]),
        (
            "robustmed",
            {**FORMER, "weight_feedback": True},
            ["weight_feedback", "weight_feedback_halvings", "weight_feedback_share"],
        ),
    ],
)
def test_a_run_saved_before_a_field_existed_matches_only_the_settings_it_was_trained_with(method, overrides, expected):
    old = load_config(
        "cpu-demo", {"method": method, **FORMER} if method in ("cap", "robustmed") else {"method": method}
    )
    saved = _saved_before_the_new_fields(old)
    assert config_differences(saved, load_config("cpu-demo", {"method": method, **overrides})) == expected


def test_a_missing_key_that_is_not_a_known_added_field_is_a_difference():
    cfg = load_config("cpu-demo", {"method": "trades"})
    saved = cfg.to_dict()
    del saved["beta"]
    assert config_differences(saved, cfg) == ["beta"]


@pytest.mark.parametrize(
    "kind, why",
    [
        ("empty", r"\(empty\): the file has 0 bytes"),
        ("text", r"\(not a torch file\): \w+"),
        ("random", r"\(not a torch file\): \w+"),
        ("folder", r"\(a folder\)"),
        ("no-keys", r"\(missing keys model, config\)"),
        ("tensor", r"\(not a dict of model and config\)"),
    ],
)
def test_bad_checkpoints_say_what_they_are(tmp_path, kind, why):
    path = bad_checkpoint(tmp_path, kind)
    with pytest.raises(CheckpointError, match=rf"model\.pt is not a robustmed_lite checkpoint {why}.*Fix"):
        model_from_checkpoint(path)
