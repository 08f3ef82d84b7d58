"""common.py: the small helpers everything imports (eps parsing, eval mode, class names), and that common
imports nothing from the package."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from robustmed_lite import common
from robustmed_lite.common import eval_mode, parse_eps
from robustmed_lite.data import loaders as data_module
from robustmed_lite.evaluation import attacks
from robustmed_lite.evaluation import metrics as evaluate_module
from robustmed_lite.models import create_model


# ---------------------------------------------------------------------------------------------- 6. helpers
def test_the_small_helpers_live_in_common_and_the_old_paths_still_work():
    assert attacks.eval_mode is common.eval_mode and attacks.parse_eps is common.parse_eps
    assert attacks.format_eps is common.format_eps and evaluate_module.model_device is common.model_device
    assert data_module.CLASS_NAMES is common.CLASS_NAMES == ("non-COVID", "COVID")
    tree = ast.parse(Path(common.__file__).read_text())
    relative = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level > 0]
    assert not relative, "common imports nothing from the package: everything imports it downward"
    assert common.parse_eps("8/255") == pytest.approx(8 / 255) and common.format_eps(0.03) == "7.65/255"


@pytest.mark.parametrize(
    "text,value", [("8/255", 8 / 255), (" 4 / 255 ", 4 / 255), ("0.03", 0.03), (0.5, 0.5), ("1e-2", 0.01), (0, 0.0)]
)
def test_parse_eps(text, value):
    assert parse_eps(text) == pytest.approx(value)


@pytest.mark.parametrize("bad", ["8/", "eight", "-1/255", -0.1, float("nan"), "8/0", "1/0.0"])
def test_parse_eps_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="eps"):
        parse_eps(bad)


def test_eval_mode_context_restores_mixed_modes():
    model = create_model("small_cnn").train()
    model.backbone.head.eval()
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert model.training and not model.backbone.head.training


def test_eps_fraction_with_zero_denominator_in_python():
    with pytest.raises(ValueError, match="divides by zero"):
        parse_eps("8/0")
