"""Weight-perturbation sensitivity: weights come back bitwise, gamma = 0 is the model's accuracy, draws are seeded,
and large relative noise destroys a trained model."""

import pandas as pd
import pytest
import torch

from robustmed_lite.data.phantom import make_phantom_dataset
from robustmed_lite.evaluation.attacks import PGD
from robustmed_lite.evaluation.metrics import accuracy
from robustmed_lite.method.weight_perturbation import perturbed_names, weight_sensitivity
from robustmed_lite.models import create_model
from robustmed_lite.trainer import fit_erm

GAMMAS = [0, 0.05, 0.3, 1.0, 3.0]


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    train = make_phantom_dataset(512, 32, site="A", seed=0)
    test = make_phantom_dataset(128, 32, site="A", seed=2)
    model = create_model("small_cnn", img_size=32)
    fit_erm(model, train.images, train.labels, epochs=10, batch_size=64, lr=3e-3, seed=0, progress=False)
    return model.eval(), test.images, test.labels


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_weights_restored_bitwise_and_modes_kept(trained):
    model, x, y = trained
    before = _snapshot(model)
    model.train()
    weight_sensitivity(model, x, y, [0, 0.1, 1.0], draws=2, attack=PGD("2/255", steps=2, seed=0), attack_n=32)
    assert model.training and all(m.training for m in model.modules()), "the model's modes are restored"
    model.eval()
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_zero_gamma_is_the_models_accuracy(trained):
    model, x, y = trained
    table = weight_sensitivity(model, x, y, [0], draws=3)
    assert list(table.columns) == ["gamma", "draw", "condition", "accuracy", "n"]
    assert len(table) == 3 and (table.n == len(y)).all()
    assert (table.accuracy == accuracy(model, x, y)).all()


def test_deterministic_under_seed(trained):
    model, x, y = trained
    a = weight_sensitivity(model, x, y, [0.3, 1.0], draws=2, seed=5)
    b = weight_sensitivity(model, x, y, [0.3, 1.0], draws=2, seed=5)
    pd.testing.assert_frame_equal(a, b)


def test_large_noise_degrades_a_trained_model(trained):
    model, x, y = trained
    clean = accuracy(model, x, y)
    assert clean > 0.75, f"the fixture model did not learn: {clean:.3f}"
    table = weight_sensitivity(model, x, y, GAMMAS, draws=3, seed=0)
    mean = table.groupby("gamma").accuracy.mean()
    assert mean[0.05] > clean - 0.1, "a 5% relative perturbation barely hurts"
    assert mean[3.0] < clean - 0.2, "noise three times the weights' own norm destroys the model"
    assert (mean.diff().dropna() <= 0.05).all(), f"accuracy should fall (almost) monotonically: {mean.to_dict()}"


def test_attack_rows_and_names(trained):
    model, x, y = trained
    attention_free = perturbed_names(model, "awp")[-1:]  # the head only
    table = weight_sensitivity(
        model, x, y, [0, 0.2], draws=1, names=attention_free, attack=PGD("2/255", steps=3, seed=0), attack_n=48
    )
    wide = table.pivot_table(index="gamma", columns="condition", values="accuracy")
    assert set(wide.columns) == {"clean", "PGD-3"}
    assert (table[table.condition == "PGD-3"].n == 48).all()
    assert (wide["PGD-3"] <= 1.0).all() and (wide["PGD-3"] >= 0).all()
    with pytest.raises(ValueError, match="no parameters"):
        weight_sensitivity(model, x, y, [0.1], names=["not.a.weight"])
