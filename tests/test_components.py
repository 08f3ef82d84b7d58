"""components.py: a registry per part of a method. The config's choices and the methods table are read
from them, and a loss, method, feedback rule or prior view registered in a test is used by the trainer and the CLI."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import yaml
from _small import SMALL, TINY_OPTIONS

from robustmed_lite.cli import main
from robustmed_lite.components import (
    ATTACKS,
    FEEDBACK,
    LOSSES,
    METHOD_REGISTRY,
    PRIOR_VIEWS,
    WEIGHT_NOISE,
    register_feedback,
    register_loss,
    register_method,
    register_prior_view,
)
from robustmed_lite.config import CHOICES, METHOD_FIELDS, METHODS, load_config, methods_table
from robustmed_lite.data.dataset import PriorDataset
from robustmed_lite.data.phantom import make_phantom_dataset
from robustmed_lite.data.splits import build_data
from robustmed_lite.method.feedback_attack import FeedbackPGD, FeedbackRule
from robustmed_lite.method.objectives import trades_loss
from robustmed_lite.models import create_model
from robustmed_lite.trainer import Trainer

TINY_CLI = [*TINY_OPTIONS, "--epochs", "1"]


def _config(tmp_path, **overrides):
    return load_config("cpu-demo", dict(out_dir=str(tmp_path / "run"), **overrides), defaults=SMALL)


@pytest.fixture(scope="module")
def small_data():
    return build_data(load_config("cpu-demo", dict(method="robustmed"), defaults=SMALL))


# --------------------------------------------------------------------------------------- 5. the registries
def test_choices_and_the_methods_table_are_read_from_the_registries():
    for key, registry in (
        ("attack", ATTACKS),
        ("feedback", FEEDBACK),
        ("weight_noise", WEIGHT_NOISE),
        ("loss", LOSSES),
        ("prior_view", PRIOR_VIEWS),
    ):
        assert CHOICES[key] == registry.names() and len(registry.names()) >= 2
    assert set(CHOICES["loss"]) >= {"ce", "trades", "mart", "score", "square_kl"}
    table = methods_table()
    assert list(table["method"]) == list(METHODS) == list(METHOD_REGISTRY)
    assert set(METHOD_FIELDS) <= set(table.columns)
    with pytest.raises(ValueError, match="already registered"):
        register_loss("trades", lambda model, batch, cfg: None)


@pytest.fixture
def my_defence():
    """A new defence registered in one place, as a notebook cell would: a loss and a method that uses it."""
    calls = []

    @register_loss("my_loss", needs_attack=True, description="TRADES with a margin on the prior view")
    def my_loss(model, batch, cfg):
        calls.append(len(batch.y))
        logits = model(batch.x).float()
        return (
            trades_loss(logits, model(batch.x_adv).float(), batch.y, cfg.beta)
            + 0.1 * F.relu(1 - model(batch.x_aug).float().gather(1, batch.y[:, None])).mean()
        )

    register_method("my_defence", attack="trades", loss="my_loss", prior=True, prior_view="package")
    yield calls
    LOSSES.unregister("my_loss")
    METHOD_REGISTRY.unregister("my_defence")


def test_a_loss_registered_in_a_test_trains_with_the_trainer_and_the_cli(my_defence, tmp_path, capsys, small_data):
    assert "my_loss" in CHOICES["loss"] and "my_defence" in METHODS
    history = Trainer(_config(tmp_path / "a", method="trades", loss="my_loss", epochs=1), data=small_data).fit()
    assert my_defence and len(history) == 1
    calls = len(my_defence)
    assert (
        main(["train", "--method", "trades", "--loss", "my_loss", "--out_dir", str(tmp_path / "cli"), *TINY_CLI]) == 0
    )
    assert len(my_defence) > calls
    assert yaml.safe_load((tmp_path / "cli" / "config.yaml").read_text())["loss"] == "my_loss"
    # The registered method too, from the command line; its fields come from its row.
    assert main(["train", "--method", "my_defence", "--out_dir", str(tmp_path / "method"), *TINY_CLI]) == 0
    saved = yaml.safe_load((tmp_path / "method" / "config.yaml").read_text())
    assert (saved["loss"], saved["prior"], saved["prior_view"], saved["weight_noise"]) == (
        "my_loss",
        True,
        "package",
        "none",
    )
    capsys.readouterr()
    assert main(["train", "--method", "trades", "--loss", "nope", "--out_dir", str(tmp_path / "bad"), *TINY_CLI]) == 2
    assert "my_loss" in capsys.readouterr().err  # the choices listed in the error come from the registry


def test_a_registered_feedback_rule_and_prior_view_are_used():
    class FirstStep(FeedbackRule):
        """Stops every sample after its first gradient step."""

        def observe(self, t, wrong, x_rows, rows):
            self.steps_taken[rows] = t
            return torch.full_like(wrong, t >= 1)

    register_feedback("first_step", FirstStep)
    register_prior_view("identity", lambda x, dark, radius, eps, s, backend: x.clone(), flip_equivariant=True)
    try:
        assert "first_step" in CHOICES["feedback"] and "identity" in CHOICES["prior_view"]
        torch.manual_seed(0)
        model = create_model("small_cnn", img_size=32).eval()
        data = make_phantom_dataset(8, 32, seed=2)
        attack = FeedbackPGD(8 / 255, steps=5, rule="first_step", seed=0)
        x_adv = attack(model, data.images, data.labels)
        # one step of 2/255 from the start x + 0.001 N(0, 1)
        assert (attack.last_steps == 1).all() and (x_adv - data.images).abs().max() <= 2 / 255 + 0.006
        cfg = load_config(
            "cpu-demo", dict(method="robustmed", feedback="first_step", prior_view="identity"), defaults=SMALL
        )
        assert isinstance(Trainer.sample_attack(type("T", (), {"cfg": cfg})(), 0), FeedbackPGD)
        ds = PriorDataset(data.images, data.labels, prior_kwargs={"view": "identity"})
        assert torch.equal(ds.x_aug, data.images)
    finally:
        FEEDBACK.unregister("first_step")
        PRIOR_VIEWS.unregister("identity")
