"""The workshop checks: a right answer passes, and every wrong one gets a line that says what to fix, never a
traceback."""

import pytest
import torch
import torch.nn.functional as F

from robustmed_lite.attacks import PGD
from robustmed_lite.common import eval_mode
from robustmed_lite.components import LOSSES, register_loss
from robustmed_lite.objectives import trades_loss
from robustmed_lite.workshop import EXERCISES, NOT_YET, RIGHT, check


def fgsm_solution(model, x, y, eps):
    with eval_mode(model):
        x = x.clone().requires_grad_(True)
        grad, = torch.autograd.grad(F.cross_entropy(model(x), y), x)
    return (x + eps * grad.sign()).clamp(0, 1).detach()


def fgsm_starter(model, x, y, eps):
    """One signed gradient step."""
    ...


def fgsm_train_mode(model, x, y, eps):
    x = x.clone().requires_grad_(True)
    grad, = torch.autograd.grad(F.cross_entropy(model(x), y), x)
    return (x + eps * grad.sign()).clamp(0, 1).detach()


def fgsm_descends(model, x, y, eps):
    with eval_mode(model):
        x = x.clone().requires_grad_(True)
        grad, = torch.autograd.grad(F.cross_entropy(model(x), y), x)
    return (x - eps * grad.sign()).clamp(0, 1).detach()


def fgsm_unclamped(model, x, y, eps):
    with eval_mode(model):
        x = x.clone().requires_grad_(True)
        grad, = torch.autograd.grad(F.cross_entropy(model(x), y), x)
    return (x + eps * grad.sign()).detach()


def fgsm_crashes(model, x, y, eps):
    return x + eps * torch.sign(undefined_gradient)  # noqa: F821 - the mistake under test


@pytest.mark.parametrize("answer, verdict, hint", [
    (fgsm_solution, RIGHT, "one signed step"),
    (fgsm_starter, NOT_YET, "replace the `...`"),
    (..., NOT_YET, "replace the `...`"),
    (fgsm_train_mode, NOT_YET, "eval mode"),
    (fgsm_descends, NOT_YET, "goes down the loss"),
    (fgsm_unclamped, NOT_YET, "clamp it"),
    (fgsm_crashes, NOT_YET, "NameError: name 'undefined_gradient' is not defined (line"),
], ids=["solution", "starter", "ellipsis", "train-mode", "descends", "unclamped", "crashes"])
def test_fgsm_check(answer, verdict, hint, capsys):
    assert check("nb02-fgsm", answer) is (verdict == RIGHT)
    out = capsys.readouterr().out
    assert out.startswith(f"{verdict}: ") and hint in out and out.count("\n") == 1


def test_masking_check(capsys):
    assert not check("nb02-masking", PGD("8/255", alpha=2 / 255, steps=10))  # cross-entropy sees no gradient
    assert "accuracy under your attack is 1.00" in capsys.readouterr().out
    assert check("nb02-masking", PGD("8/255", alpha=2 / 255, steps=10, loss="margin"))
    assert capsys.readouterr().out.startswith(f"{RIGHT}: accuracy 1.00 -> 0.00")
    assert not check("nb02-masking", lambda model, x, y: (x + 0.5).clamp(0, 1))
    assert "within eps = 8/255" in capsys.readouterr().out


def test_defence_check(capsys):
    assert not check("nb03-defence", "not_registered")
    assert "@register_loss('not_registered', needs_attack=True)" in capsys.readouterr().out

    @register_loss("_workshop_trades", needs_attack=True)
    def solution(model, batch, cfg):
        return trades_loss(model(batch.x).float(), model(batch.x_adv).float(), batch.y, cfg.beta)

    @register_loss("_workshop_detached", needs_attack=True)
    def detached(model, batch, cfg):
        with torch.no_grad():
            return F.cross_entropy(model(batch.x).float(), batch.y)

    try:
        assert check("nb03-defence", "_workshop_trades")
        assert "the Trainer took a step with '_workshop_trades'" in capsys.readouterr().out
        assert not check("nb03-defence", "_workshop_detached")
        assert "carries no gradient" in capsys.readouterr().out
    finally:
        LOSSES.unregister("_workshop_trades")
        LOSSES.unregister("_workshop_detached")


def test_an_unknown_label_lists_the_exercises(capsys):
    assert not check("nb99-nothing", fgsm_solution)
    out = capsys.readouterr().out
    assert all(label in out for label in EXERCISES)
