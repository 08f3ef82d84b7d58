"""evaluation/ood.py: corruption tables, mCE and relative mCE by hand, and the drop from the source site."""

import pandas as pd
import pytest
import torch
from torch import nn

from robustmed_lite.data.phantom import make_phantom_dataset
from robustmed_lite.evaluation.ood import corruption_summary, corruption_table, shift_table


class _Threshold(nn.Module):
    """Predicts COVID when the mean intensity exceeds a threshold: a fixed, hand-made model."""

    def __init__(self, t):
        super().__init__()
        self.t = nn.Parameter(torch.tensor(float(t)), requires_grad=False)

    def forward(self, x):
        m = x.mean((1, 2, 3))
        return torch.stack([self.t - m, m - self.t], 1) * 100


def test_corruption_tables_and_mce():
    data = make_phantom_dataset(64, 32, "A", seed=0)
    t = data.images.mean((1, 2, 3)).median().item()
    models = {"ref": _Threshold(t), "other": _Threshold(t + 0.02)}
    table = corruption_table(
        models, data.images, data.labels, corruptions=("brightness", "jpeg"), severities=(1, 5), progress=False
    )
    assert len(table) == 2 * (1 + 2 * 2) and set(table["n"]) == {64}
    assert table["accuracy"].between(0, 1).all()
    summary = corruption_summary(table, reference="ref").set_index("model")
    assert summary.loc["ref", "mCE"] == pytest.approx(1.0)
    ref = table[table["model"] == "ref"]
    assert summary.loc["ref", "mCA"] == pytest.approx(ref[ref["severity"] > 0]["accuracy"].mean())
    assert summary.loc["ref", "relative_robustness"] == pytest.approx(
        summary.loc["ref", "mCA"] / summary.loc["ref", "clean"]
    )
    again = corruption_table(
        models, data.images, data.labels, corruptions=("brightness", "jpeg"), severities=(1, 5), progress=False
    )
    pd.testing.assert_frame_equal(table, again)


def _table(rows):
    return pd.DataFrame(
        [{"model": m, "corruption": c, "family": "x", "severity": s, "accuracy": a, "n": 100} for m, c, s, a in rows]
    )


def test_mce_and_relative_mce_by_hand():
    # Errors (1 - accuracy). ref: clean 0.1; a: 0.2, 0.4 (sum 0.6); b: 0.3, 0.5 (sum 0.8).
    # other: clean 0.05; a: 0.3, 0.3 (sum 0.6); b: 0.6, 0.6 (sum 1.2).
    table = _table(
        [
            ("ref", "clean", 0, 0.9),
            ("ref", "a", 1, 0.8),
            ("ref", "a", 5, 0.6),
            ("ref", "b", 1, 0.7),
            ("ref", "b", 5, 0.5),
            ("other", "clean", 0, 0.95),
            ("other", "a", 1, 0.7),
            ("other", "a", 5, 0.7),
            ("other", "b", 1, 0.4),
            ("other", "b", 5, 0.4),
        ]
    )
    summary = corruption_summary(table, reference="ref").set_index("model")
    # mCE = mean(0.6 / 0.6, 1.2 / 0.8) = 1.25; relative: excess ref a 0.6 - 0.2 = 0.4, b 0.8 - 0.2 = 0.6;
    # other a 0.6 - 0.1 = 0.5, b 1.2 - 0.1 = 1.1; mean(0.5 / 0.4, 1.1 / 0.6) = 1.5417.
    assert summary.loc["other", "mCE"] == pytest.approx(1.25)
    assert summary.loc["other", "relative_mCE"] == pytest.approx((0.5 / 0.4 + 1.1 / 0.6) / 2)
    assert summary.loc["ref", "relative_mCE"] == pytest.approx(1.0)
    assert summary.loc["other", "mCA"] == pytest.approx(0.55)
    assert summary.loc["other", "mCE_corruptions"] == 2


def test_mce_says_which_corruptions_it_cannot_use():
    # The reference makes no error under corruption b: b has no ratio, is left out, and the user is told.
    table = _table(
        [
            ("ref", "clean", 0, 1.0),
            ("ref", "a", 1, 0.8),
            ("ref", "b", 1, 1.0),
            ("other", "clean", 0, 1.0),
            ("other", "a", 1, 0.6),
            ("other", "b", 1, 0.1),
        ]
    )
    with pytest.warns(UserWarning) as record:
        summary = corruption_summary(table, reference="ref").set_index("model")
    messages = sorted(str(w.message) for w in record)
    assert len(messages) == 2 and all("on ['b']" in m for m in messages), messages
    assert messages[0].startswith("mCE") and messages[1].startswith("relative mCE")
    assert summary.loc["other", "mCE"] == pytest.approx(2.0)
    assert summary.loc["other", "mCE_corruptions"] == 1


def test_severities_are_checked():
    data = make_phantom_dataset(8, 32, "A", seed=0)
    for bad in ((0, 1), (6,), (2, 2), ()):
        with pytest.raises(ValueError, match="1..5"):
            corruption_table({"m": _Threshold(0.5)}, data.images, data.labels, ("jpeg",), bad, progress=False)


def test_shift_table_reports_the_drop_from_the_source():
    a, b = make_phantom_dataset(64, 32, "A", seed=0), make_phantom_dataset(64, 32, "B", seed=0)
    t = a.images.mean((1, 2, 3)).median().item()
    table = shift_table({"m": _Threshold(t)}, {"A": (a.images, a.labels), "B": (b.images, b.labels)})
    assert list(table["domain"]) == ["A", "B"]
    assert table["drop_from_source"].iloc[0] == 0
    assert table["drop_from_source"].iloc[1] == pytest.approx(table["accuracy"].iloc[0] - table["accuracy"].iloc[1])
    assert {"auc", "sensitivity", "specificity", "f1"} <= set(table.columns)
