"""method/objectives.py: each loss against a hand computation on a two-sample batch, and where the
gradient of the method's square loss flows."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from robustmed_lite.components import LOSSES, Batch
from robustmed_lite.config import load_config
from robustmed_lite.data.phantom import make_phantom_dataset
from robustmed_lite.method.objectives import (
    ce_loss,
    kl_per_sample,
    mart_loss,
    score_loss,
    soft_target,
    square_kl_loss,
    trades_loss,
)
from robustmed_lite.models import create_model


@pytest.mark.parametrize("target_grad", [True, False])
def test_the_gradient_reaches_the_prior_view_only_with_target_grad(target_grad):
    torch.manual_seed(0)
    model = create_model("small_cnn", img_size=32)
    data = make_phantom_dataset(8, 32, seed=1)
    x_aug = data.images.flip(-1).clone().requires_grad_(True)
    cfg = load_config("cpu-demo", {"method": "cap", "target_grad": target_grad})
    batch = Batch(data.images, data.images.clamp(0.01, 0.99), x_aug, data.labels)
    LOSSES["square_kl"](model.train(), batch, cfg).backward()
    assert (x_aug.grad is not None and x_aug.grad.abs().sum() > 0) == target_grad


# ------------------------------------------------------------------ hand computations on a two-sample batch
# Two samples, two classes. Each expected value below is written out from the formula with math.exp / math.log on
# these numbers, not by calling the function under test.
NAT = [[2.0, 0.0], [0.0, 1.0]]  # logits on x
ADV = [[1.0, 1.0], [1.0, 0.0]]  # logits on x'
AUG = [[0.0, 0.0], [-1.0, 1.0]]  # logits on x_aug
Y = [0, 1]


def _softmax(row: list[float]) -> list[float]:
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def _t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def _y() -> torch.Tensor:
    return torch.tensor(Y)


def test_softmax_of_the_batch_by_hand():
    """The probabilities the expected values are built from: e^2 / (e^2 + 1) and e / (1 + e)."""
    e = math.e
    assert _softmax(NAT[0]) == pytest.approx([e**2 / (e**2 + 1), 1 / (e**2 + 1)])
    assert _softmax(NAT[1]) == pytest.approx([1 / (1 + e), e / (1 + e)])
    assert _softmax(AUG[0]) == pytest.approx([0.5, 0.5])


def test_kl_per_sample_by_hand():
    """KL(softmax(a) || softmax(b)) = sum_k p_k log(p_k / q_k), one value per sample, zero for equal inputs."""
    expected = [_kl(_softmax(n), _softmax(a)) for n, a in zip(NAT, ADV)]
    # sample 0 by hand: p = (e^2, 1) / (e^2 + 1), q = (1/2, 1/2)
    p0 = math.e**2 / (math.e**2 + 1)
    assert expected[0] == pytest.approx(p0 * math.log(2 * p0) + (1 - p0) * math.log(2 * (1 - p0)))
    got = kl_per_sample(_t(NAT), _t(ADV))
    assert got.shape == (2,)
    assert got.tolist() == pytest.approx(expected, rel=1e-12)
    assert kl_per_sample(_t(NAT), _t(NAT)).abs().max() < 1e-12
    # the order matters: KL(q || p) is another number
    assert kl_per_sample(_t(ADV), _t(NAT)).tolist() == pytest.approx(
        [_kl(_softmax(a), _softmax(n)) for n, a in zip(NAT, ADV)], rel=1e-12
    )
    # softmax ignores a constant added to a row's logits
    assert torch.allclose(kl_per_sample(_t(NAT) + 5.0, _t(ADV) - 3.0), got)


def test_cross_entropy_by_hand():
    """CE = mean_i -log p_{y_i}(x_i)."""
    expected = -(math.log(_softmax(NAT[0])[0]) + math.log(_softmax(NAT[1])[1])) / 2
    assert expected == pytest.approx((math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-1))) / 2)
    assert ce_loss(_t(NAT), _y()).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("beta", [0.0, 1.0, 6.0])
def test_trades_loss_by_hand(beta):
    """TRADES: CE(f(x), y) + beta * mean_i KL(p(x_i) || p(x'_i))."""
    ce = -(math.log(_softmax(NAT[0])[0]) + math.log(_softmax(NAT[1])[1])) / 2
    kl = (_kl(_softmax(NAT[0]), _softmax(ADV[0])) + _kl(_softmax(NAT[1]), _softmax(ADV[1]))) / 2
    got = trades_loss(_t(NAT), _t(ADV), _y(), beta).item()
    assert got == pytest.approx(ce + beta * kl, rel=1e-12)


def test_mart_loss_by_hand():
    """MART: CE(f(x'), y) - mean log(1.0001 - max wrong p(x')) + beta * mean KL * (1.0000001 - p_y(x))."""
    beta = 2.0
    p_adv = [_softmax(r) for r in ADV]
    p_nat = [_softmax(r) for r in NAT]
    ce_adv = -(math.log(p_adv[0][0]) + math.log(p_adv[1][1])) / 2
    margin = -(math.log(1.0001 - p_adv[0][1]) + math.log(1.0001 - p_adv[1][0])) / 2  # the other class is the wrong one
    weighted = (
        _kl(p_nat[0], p_adv[0]) * (1.0000001 - p_nat[0][0]) + _kl(p_nat[1], p_adv[1]) * (1.0000001 - p_nat[1][1])
    ) / 2
    got = mart_loss(_t(NAT), _t(ADV), _y(), beta).item()
    assert got == pytest.approx(ce_adv + margin + beta * weighted, rel=1e-10)


@pytest.mark.parametrize("smooth", [0.0, 0.03, 0.25, 1.0])
def test_soft_target_by_hand(smooth):
    """y~ = eps_s * softmax(f(x_aug)) + (1 - eps_s) * onehot(y); each row sums to one."""
    onehot = [[1.0, 0.0], [0.0, 1.0]]
    expected = [
        [smooth * p + (1 - smooth) * o for p, o in zip(_softmax(a), h)] for a, h in zip(AUG, onehot)
    ]  # sample 0: (1/2, 1/2) mixed in; sample 1: (1, e^2) / (1 + e^2) mixed in
    got = soft_target(_t(AUG), _y(), smooth)
    assert got.shape == (2, 2)
    assert got.tolist()[0] == pytest.approx(expected[0], rel=1e-12)
    assert got.tolist()[1] == pytest.approx(expected[1], rel=1e-12)
    assert got[0, 0].item() == pytest.approx(1 - smooth / 2, rel=1e-12)
    assert got.sum(1).tolist() == pytest.approx([1.0, 1.0])


def _square(p: list[float], q: list[float]) -> float:
    return sum((a - b) ** 2 for a, b in zip(p, q))


@pytest.mark.parametrize("beta,smooth", [(0.0, 0.0), (3.0, 0.03), (5.0, 0.5)])
def test_square_kl_loss_by_hand(beta, smooth):
    """The method's loss: mean_i ||p(x_i) - y~_i||^2 + beta * mean_i ||p(x'_i) - p(x_i)||^2 (squared L2 norms over
    the classes, means over the batch)."""
    onehot = [[1.0, 0.0], [0.0, 1.0]]
    target = [[smooth * p + (1 - smooth) * o for p, o in zip(_softmax(a), h)] for a, h in zip(AUG, onehot)]
    p_nat, p_adv = [_softmax(r) for r in NAT], [_softmax(r) for r in ADV]
    fit = (_square(p_nat[0], target[0]) + _square(p_nat[1], target[1])) / 2
    gap = (_square(p_adv[0], p_nat[0]) + _square(p_adv[1], p_nat[1])) / 2
    # sample 0 with smooth 0: p(x) = (e^2, 1) / (e^2 + 1) against (1, 0): 2 / (e^2 + 1)^2
    if smooth == 0:
        assert _square(p_nat[0], target[0]) == pytest.approx(2 / (math.e**2 + 1) ** 2)
    got = square_kl_loss(_t(NAT), _t(ADV), _t(AUG), _y(), beta, smooth).item()
    assert got == pytest.approx(fit + beta * gap, rel=1e-12)


def test_score_loss_is_the_square_loss_against_the_one_hot_label():
    """SCORE: the method's square loss with eps_s = 0, by hand: mean ||p(x) - onehot||^2 + beta mean
    ||p(x') - p(x)||^2."""
    p_nat, p_adv = [_softmax(r) for r in NAT], [_softmax(r) for r in ADV]
    fit = (_square(p_nat[0], [1.0, 0.0]) + _square(p_nat[1], [0.0, 1.0])) / 2
    gap = (_square(p_adv[0], p_nat[0]) + _square(p_adv[1], p_nat[1])) / 2
    assert score_loss(_t(NAT), _t(ADV), _y(), 2.0).item() == pytest.approx(fit + 2.0 * gap, rel=1e-12)


@pytest.mark.parametrize("loss", ["ce", "trades", "score", "square_kl"])
def test_the_registered_losses_read_the_right_views(loss):
    """Each registered loss feeds x, x_adv and x_aug to the model where its formula says: with a model that returns
    its input as logits, the loss on the batch is the hand-computed value of its formula."""
    cfg = load_config("cpu-demo", {"method": "cap", "beta": 3.0, "smooth": 0.25})
    batch = Batch(_t(NAT).float(), _t(ADV).float(), _t(AUG).float(), _y())
    p_nat, p_adv = [_softmax(r) for r in NAT], [_softmax(r) for r in ADV]
    ce_nat = -(math.log(p_nat[0][0]) + math.log(p_nat[1][1])) / 2
    gap = (_square(p_adv[0], p_nat[0]) + _square(p_adv[1], p_nat[1])) / 2
    onehot = [[1.0, 0.0], [0.0, 1.0]]
    target = [[0.25 * p + 0.75 * o for p, o in zip(_softmax(a), h)] for a, h in zip(AUG, onehot)]
    expected = {
        "ce": -(math.log(p_adv[0][0]) + math.log(p_adv[1][1])) / 2,  # CE on x_adv where there is one
        "trades": ce_nat + 3.0 * (_kl(p_nat[0], p_adv[0]) + _kl(p_nat[1], p_adv[1])) / 2,
        "score": (_square(p_nat[0], onehot[0]) + _square(p_nat[1], onehot[1])) / 2 + 3.0 * gap,
        "square_kl": (_square(p_nat[0], target[0]) + _square(p_nat[1], target[1])) / 2 + 3.0 * gap,
    }[loss]
    got = LOSSES[loss](nn.Identity(), batch, cfg).item()
    assert got == pytest.approx(expected, rel=1e-5)
