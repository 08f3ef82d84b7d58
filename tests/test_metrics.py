"""evaluation/metrics.py: the robust + clinical evaluation table: data forms, metrics against scikit-learn, the worst
case per sample, one attack run per batch, eps = 0, and AutoAttack's convention for samples that are wrong to begin
with."""

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import f1_score, recall_score, roc_auc_score
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from robustmed_lite.data.phantom import make_phantom_dataset
from robustmed_lite.evaluation.attacks import FGSM, PGD, Attack
from robustmed_lite.evaluation.metrics import (
    TABLE_COLUMNS,
    accuracy,
    accuracy_vs_eps,
    clinical_metrics,
    evaluate,
    undefined_metrics_note,
)
from robustmed_lite.models import create_model

N = 40


class Threshold(nn.Module):
    """Predicts COVID (1) iff pixel (0, 0) > 0.5; its probability is a sigmoid of that pixel."""

    def forward(self, x):
        score = 10 * (x[:, 0, 0, 0] - 0.5)
        return torch.stack([torch.zeros_like(score), score], 1)


class Flip(Attack):
    """A scripted 'attack' that flips the decision pixel of the samples whose id (pixel (0, 1)) is listed."""

    name = "flip"

    def __init__(self, ids):
        super().__init__(1.0)
        self.ids = torch.tensor(ids)
        self.calls = 0

    def _attack(self, problem, gen):
        self.calls += 1
        x = problem.x.clone()
        hit = torch.isin((x[:, 0, 0, 1] * 100).round().long(), self.ids)
        x[hit, 0, 0, 0] = 1 - x[hit, 0, 0, 0]
        return x


@pytest.fixture(scope="module")
def toy():
    """N samples with an id pixel; labels alternate; samples 0-4 are misclassified clean."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(N, 1, 4, 4, generator=gen)
    y = torch.arange(N) % 2
    x[:, 0, 0, 1] = torch.arange(N) / 100
    margin = 0.05 + 0.4 * torch.rand(N, generator=gen)
    x[:, 0, 0, 0] = torch.where(y == 1, 0.5 + margin, 0.5 - margin)
    x[:5, 0, 0, 0] = 1 - x[:5, 0, 0, 0]
    return x, y


@pytest.fixture(scope="module")
def phantom():
    return make_phantom_dataset(96, 32, site="A", seed=3)


def _sk_metrics(y, p1):
    pred = (p1 > 0.5).astype(int)
    return {
        "accuracy": (pred == y).mean(),
        "auc": roc_auc_score(y, p1),
        "sensitivity": recall_score(y, pred),
        "specificity": recall_score(y, pred, pos_label=0),
        "f1": f1_score(y, pred),
    }


def test_table_layout(toy):
    x, y = toy
    table = evaluate(
        Threshold(), (x, y), {"A": Flip([6, 7]), "PGD": PGD("2/255", steps=2, seed=0)}, batch_size=16, progress=False
    )
    assert list(table.columns) == list(TABLE_COLUMNS)
    assert list(table.condition) == ["clean", "A", "PGD", "worst case"]
    assert (table.n == N).all()
    assert table.set_index("condition").loc["PGD", ["eps", "steps"]].tolist() == ["2/255", 2]
    assert table.eps_value.iloc[2] == pytest.approx(2 / 255)
    assert "binary" in table.attrs["average"]


def test_clinical_metrics_match_scikit_learn(toy):
    x, y = toy
    p1 = torch.sigmoid(10 * (x[:, 0, 0, 0] - 0.5)).numpy()
    row = evaluate(Threshold(), (x, y), progress=False).iloc[0]
    for key, value in _sk_metrics(y.numpy(), p1).items():
        assert row[key] == pytest.approx(value, abs=1e-6), key


def test_macro_metrics_for_three_classes():
    rng = np.random.default_rng(0)
    y = np.arange(60) % 3
    probs = rng.dirichlet(np.ones(3), 60)
    probs[np.arange(60), y] += rng.random(60)  # better than chance
    probs /= probs.sum(1, keepdims=True)
    pred = probs.argmax(1)
    got = clinical_metrics(y, probs)
    spec = np.mean([recall_score(y == c, pred == c, pos_label=False) for c in range(3)])
    assert got["sensitivity"] == pytest.approx(recall_score(y, pred, average="macro"))
    assert got["specificity"] == pytest.approx(spec)
    assert got["f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert got["auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))


def test_worst_case_combines_samples_across_attacks(toy):
    x, y = toy
    table = evaluate(
        Threshold(), (x, y), {"A": Flip([1, 6, 7, 8]), "B": Flip([8, 9, 10])}, batch_size=16, progress=False
    ).set_index("condition")
    # Clean: 0-4 wrong. A fools 6, 7, 8 (1 is already wrong); B fools 8, 9, 10; together 6-10.
    assert table.loc["clean", "accuracy"] == pytest.approx((N - 5) / N)
    assert table.loc["A", "accuracy"] == pytest.approx((N - 8) / N)
    assert table.loc["B", "accuracy"] == pytest.approx((N - 8) / N)
    assert table.loc["worst case", "accuracy"] == pytest.approx((N - 10) / N)
    assert table.loc["worst case", "steps"] == 2


def test_a_wrong_sample_gets_no_credit_from_an_attack(toy):
    x, y = toy
    repair = Flip(list(range(N)))  # flips every sample: would 'repair' the 5 wrong ones
    table = evaluate(Threshold(), (x, y), {"flip all": repair}, progress=False).set_index("condition")
    assert table.loc["flip all", "accuracy"] == 0.0
    p1_clean = torch.sigmoid(10 * (x[:, 0, 0, 0] - 0.5))
    p1_adv = torch.where(torch.arange(N) < 5, p1_clean, 1 - p1_clean).numpy()
    assert table.loc["flip all", "auc"] == pytest.approx(roc_auc_score(y.numpy(), p1_adv))


def test_each_attack_runs_once_per_batch(toy):
    x, y = toy
    a, b = Flip([6]), Flip([7])
    evaluate(Threshold(), (x, y), {"a": a, "b": b}, batch_size=16, progress=False)
    assert a.calls == b.calls == 3


def test_data_forms_agree(phantom):
    torch.manual_seed(0)
    model = create_model("small_cnn")
    images, labels = phantom.images, phantom.labels
    masks = phantom.lung_masks.float()
    forms = {
        "pair": (images, labels),
        "phantom set": phantom,
        "loader (x, y)": DataLoader(TensorDataset(images, labels), batch_size=32),
        "loader (x, mask, y)": DataLoader(TensorDataset(images, masks, labels), batch_size=32),
    }
    tables = {
        name: evaluate(model, data, {"FGSM": FGSM("2/255")}, batch_size=32, progress=False)
        for name, data in forms.items()
    }
    reference = tables.pop("pair")
    for name, table in tables.items():
        pd.testing.assert_frame_equal(table.drop(columns="seconds"), reference.drop(columns="seconds"), obj=name)
    assert reference.accuracy.iloc[0] == pytest.approx(accuracy(model, images, labels))


def test_eps_zero_equals_clean_and_robust_never_exceeds_clean(phantom):
    torch.manual_seed(0)
    model = create_model("small_cnn").train()
    attacks = {"PGD eps 0": PGD(0.0, steps=3, seed=0), "FGSM": FGSM("4/255"), "PGD": PGD("4/255", steps=3, seed=0)}
    table = evaluate(model, phantom, attacks, progress=False).set_index("condition")
    metrics = ["accuracy", "auc", "sensitivity", "specificity", "f1"]
    assert table.loc["PGD eps 0", metrics].tolist() == table.loc["clean", metrics].tolist()
    assert (table.accuracy <= table.loc["clean", "accuracy"]).all()
    assert model.training, "the model's mode is restored"


def test_progress_bar_can_be_silenced(toy, capsys):
    evaluate(Threshold(), toy, {"a": Flip([6])}, progress=False)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_accuracy_vs_eps(toy):
    x, y = toy
    curve = accuracy_vs_eps(
        Threshold(),
        (x, y),
        {"FGSM": FGSM, "PGD": lambda e: PGD(e, steps=2, seed=0)},
        [0, "2/255", "60/255"],
        progress=False,
    )
    assert list(curve.condition) == ["FGSM", "PGD", "worst case"] * 3
    assert list(curve.eps) == ["0/255"] * 3 + ["2/255"] * 3 + ["60/255"] * 3
    at_zero = curve[curve.eps == "0/255"].accuracy
    assert (at_zero == (N - 5) / N).all()
    assert (curve.groupby("condition").accuracy.diff().dropna() <= 0).all(), "accuracy falls as eps grows"


def test_table_counts_the_classes_and_says_why_a_metric_is_undefined(toy):
    x, y = toy
    table = evaluate(Threshold(), (x, y), {"a": Flip([6])}, progress=False)
    assert (table.n_covid == N // 2).all() and (table.n_noncovid == N // 2).all() and (table.note == "").all()
    covid = y == 1
    with pytest.warns(UserWarning, match=r"only COVID images \(20\): AUC and specificity are undefined"):
        table = evaluate(Threshold(), (x[covid], y[covid]), {"a": Flip([6])}, progress=False)
    assert table.auc.isna().all() and table.specificity.isna().all() and (table.n_noncovid == 0).all()
    assert table.note.str.contains("accuracy is the sensitivity").all()
    assert "sensitivity are undefined" in undefined_metrics_note(np.zeros(5))
    assert undefined_metrics_note(np.array([0, 2, 0]), k=3) == "classes [1] absent (3 images): AUC is undefined (NaN)"


def test_non_finite_images_and_logits_are_refused(toy):
    x, y = toy
    bad = x.clone()
    bad[7, 0, 2, 3] = float("nan")
    for call in (
        lambda: evaluate(Threshold(), (bad, y), batch_size=4, progress=False),
        lambda: accuracy(Threshold(), bad, y, batch_size=4),
    ):
        with pytest.raises(ValueError, match=r"1 non-finite values \(1 NaN, 0 inf\).*first images \[7\]"):
            call()

    class NaNModel(nn.Module):
        def forward(self, x):
            return torch.full((len(x), 2), float("nan"))

    with pytest.raises(ValueError, match=r"non-finite logits for 40 image\(s\)"):
        evaluate(NaNModel(), toy, progress=False)


def test_bad_calls_are_clear_errors(toy):
    with pytest.raises(ValueError, match="reserved"):
        evaluate(Threshold(), toy, {"clean": FGSM()}, progress=False)
    with pytest.raises(ValueError, match="no samples"):
        evaluate(Threshold(), (toy[0][:0], toy[1][:0]), progress=False)
    with pytest.raises(ValueError, match="images but"):
        evaluate(Threshold(), (toy[0], toy[1][:3]), progress=False)


def test_threshold_sweep_counts_sensitivity_and_specificity_at_each_threshold():
    from robustmed_lite.evaluation.metrics import clinical_metrics, threshold_sweep

    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    p_covid = np.array([0.9, 0.7, 0.45, 0.2, 0.6, 0.3, 0.1, 0.5])
    table = threshold_sweep(labels, p_covid, thresholds=[0.0, 0.4, 0.5, 1.0]).set_index("threshold")
    assert table.loc[0.0, "sensitivity"] == 1.0 and table.loc[0.0, "specificity"] == 0.0
    assert table.loc[0.4, "sensitivity"] == 0.75 and table.loc[0.4, "specificity"] == 0.5
    # p = 0.5 exactly is not COVID at 0.5, as argmax breaks the tie towards class 0
    assert table.loc[0.5, "sensitivity"] == 0.5 and table.loc[0.5, "specificity"] == 0.75
    assert table.loc[1.0, "sensitivity"] == 0.0 and table.loc[1.0, "specificity"] == 1.0
    probs = np.stack([1 - p_covid, p_covid], 1)
    metrics = clinical_metrics(labels, probs)
    assert (table.loc[0.5, "sensitivity"], table.loc[0.5, "specificity"]) == (
        metrics["sensitivity"],
        metrics["specificity"],
    )
    assert len(threshold_sweep(labels, p_covid)) == 101


@pytest.mark.parametrize(
    "labels, probs, message",
    [
        ([1, 1, 1], [0.2, 0.5, 0.9], "0 non-COVID"),
        ([0, 1], [0.2, 0.5, 0.9], "2 labels but 3 probabilities"),
    ],
)
def test_threshold_sweep_refuses_what_it_cannot_score(labels, probs, message):
    from robustmed_lite.evaluation.metrics import threshold_sweep

    with pytest.raises(ValueError, match=message):
        threshold_sweep(labels, probs)
