"""evaluation/attacks.py: invariants (eps-ball, [0,1], mode, determinism, eps=0), consistency on a trained model,
and a cross-check against torchattacks. The feedback PGD's rules are in test_feedback_attack.py."""

import pytest
import torch
from torch import nn

from robustmed_lite.common import format_eps
from robustmed_lite.evaluation.attacks import (
    APGD,
    FGSM,
    MIM,
    PGD,
    RFGSM,
    CWLinf,
    RandomNoise,
    TargetedPGD,
    apgd_checkpoints,
)
from robustmed_lite.method.feedback_attack import FeedbackPGD
from robustmed_lite.models import create_model

EPS = 8 / 255
ATTACKS = {
    "fgsm": lambda eps: FGSM(eps),
    "rfgsm": lambda eps: RFGSM(eps, seed=1),
    "pgd": lambda eps: PGD(eps, steps=5, seed=1),
    "pgd_kl": lambda eps: PGD(eps, steps=5, loss="kl", seed=1),
    "pgd_l2": lambda eps: PGD(eps * 20, steps=5, norm="l2", seed=1),
    "pgd_restarts": lambda eps: PGD(eps, steps=3, restarts=2, seed=1),
    "mim": lambda eps: MIM(eps, steps=5),
    "cw": lambda eps: CWLinf(eps, steps=5, seed=1),
    "apgd": lambda eps: APGD(eps, steps=8, seed=1),
    "feedback_fat": lambda eps: FeedbackPGD(eps, steps=5, rule="fat", tau=1, seed=1),
    "feedback_last_correct": lambda eps: FeedbackPGD(eps, steps=5, rule="last_correct", seed=1),
    "feedback_none": lambda eps: FeedbackPGD(eps, steps=5, rule=None, loss="ce", seed=1),
    "targeted_pgd": lambda eps: TargetedPGD(eps, target_class=1, steps=5, seed=1),
    "random_noise": lambda eps: RandomNoise(eps, seed=1),
}


def _in_ball(attack, x, x_adv):
    delta = (x_adv - x).flatten(1)
    if attack.norm == "linf":
        return bool(delta.abs().max() <= attack.eps + 1e-6)
    return bool(delta.norm(dim=1).max() <= attack.eps * (1 + 1e-5) + 1e-6)


@pytest.fixture(scope="module")
def batch():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(8, 1, 32, 32, generator=gen)
    x[0] = 0.0  # corners of [0, 1], where projection and clipping meet
    x[1] = 1.0
    return x, torch.tensor([0, 1, 0, 1, 1, 0, 1, 0])


@pytest.fixture
def model():
    """An untrained CNN in train mode, with one submodule deliberately in eval mode."""
    torch.manual_seed(0)
    net = create_model("small_cnn").train()
    net.backbone.features[1].eval()
    return net


@pytest.fixture(scope="module")
def trained(phantom_cnn):
    """small_cnn trained (ERM) on the 48 px phantom, with 256 held-out slices (conftest's ``phantom_cnn``)."""
    return phantom_cnn


def _accuracy(model, x, y, attack=None, chunk=128):
    """Accuracy, under ``attack`` if given; in chunks of 128 (twice as fast per image as 256 on this CPU)."""
    correct = 0
    for i in range(0, len(x), chunk):
        xi, yi = x[i : i + chunk], y[i : i + chunk]
        if attack is not None:
            xi = attack(model, xi, yi)
        with torch.no_grad():
            correct += (model(xi).argmax(1) == yi).sum().item()
    return correct / len(x)


@pytest.fixture(scope="module")
def pgd10_accuracy(trained):
    """PGD-10 at 1/255 (step 0.25/255), seed 0: shared by the consistency checks."""
    model, x, y = trained
    return _accuracy(model, x, y, PGD("1/255", alpha="0.25/255", steps=10, seed=0))


# ---------------------------------------------------------------------------------------------- eps handling


def test_eps_is_quoted_as_k_over_255():
    assert format_eps(8 / 255) == "8/255"
    assert "eps 8/255" in PGD("8/255").describe()
    cap = FeedbackPGD(0.03).describe()
    assert "7.65/255 (= 0.03)" in cap and "training only" in cap
    assert "PGD-10" in repr(PGD()) and "APGD-CE-100" in APGD().describe()


def test_linf_eps_above_one_is_a_clear_error():
    with pytest.raises(ValueError, match="did you mean|e.g. '8/255'"):
        PGD(8)


def test_kl_without_random_start_is_a_clear_error():
    with pytest.raises(ValueError, match="random start"):
        PGD(loss="kl", random_start=False)


# ------------------------------------------------------------------------------------------------ invariants


@pytest.mark.parametrize("name", ATTACKS)
def test_output_in_ball_in_range_and_mode_restored(name, model, batch):
    x, y = batch
    modes = [m.training for m in model.modules()]
    attack = ATTACKS[name](EPS)
    x_adv = attack(model, x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and x_adv.device == x.device
    assert not x_adv.requires_grad
    assert _in_ball(attack, x, x_adv)
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert not torch.equal(x_adv, x), "the attack moved the input"
    assert [m.training for m in model.modules()] == modes, "each module's train/eval flag is restored"
    assert all(p.grad is None for p in model.parameters()), "no parameter gradients are accumulated"


@pytest.mark.parametrize("name", ATTACKS)
def test_deterministic_under_a_seed(name, model, batch):
    x, y = batch
    attack = ATTACKS[name](EPS)
    first = attack(model, x, y)
    torch.manual_seed(123)  # the global RNG must not matter when a seed is set
    assert torch.equal(first, attack(model, x, y))


@pytest.mark.parametrize("name", ATTACKS)
def test_eps_zero_returns_x_unchanged(name, model, batch):
    x, y = batch
    assert torch.equal(ATTACKS[name](0.0)(model, x, y), x)


@pytest.mark.parametrize("name", ["pgd", "pgd_kl", "apgd", "feedback_fat"])
def test_runs_under_a_callers_autocast(name, model, batch):
    x, y = batch
    attack = ATTACKS[name](EPS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_adv = attack(model, x, y)
    assert x_adv.dtype == torch.float32 and _in_ball(attack, x, x_adv)
    assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_works_inside_no_grad_and_leaves_x_alone(model, batch):
    x, y = batch
    x_copy = x.clone()
    with torch.no_grad():
        x_adv = PGD(EPS, steps=3, random_start=False)(model, x, y)
    assert not torch.equal(x_adv, x) and torch.equal(x, x_copy)


def test_mode_restored_when_the_model_raises(batch):
    class Faulty(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = create_model("small_cnn")

        def forward(self, x):
            raise RuntimeError("boom")

    model = Faulty().train()
    with pytest.raises(RuntimeError, match="boom"):
        PGD(EPS)(model, *batch)
    assert all(m.training for m in model.modules())


def test_eval_mode_is_active_during_the_attack(batch):
    seen = []

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(32 * 32, 2)

        def forward(self, x):
            seen.append(self.training)
            return self.lin(x.flatten(1))

    model = Spy().train()
    PGD(EPS, steps=2)(model, *batch)
    assert seen and not any(seen) and model.training


@pytest.mark.parametrize(
    "x,y,match",
    [
        (torch.rand(2, 1, 8, 8) * 2 - 0.5, torch.tensor([0, 1]), r"\[0, 1\]"),
        (torch.rand(2, 1, 8, 8), torch.tensor([0, 1, 1]), "one integer class label"),
        (torch.rand(2, 1, 8, 8), torch.tensor([0.0, 1.0]), "one integer class label"),
        (torch.randint(0, 2, (2, 1, 8, 8)), torch.tensor([0, 1]), "float tensor"),
        # NaN is false in every comparison, so a range check alone let it through (and came back as NaN images).
        (torch.full((2, 1, 8, 8), float("nan")), torch.tensor([0, 1]), r"128 non-finite values \(128 NaN, 0 inf\)"),
        (
            torch.rand(2, 1, 8, 8).index_put_((torch.tensor([1]),), torch.tensor(float("inf"))),
            torch.tensor([0, 1]),
            r"64 non-finite values \(0 NaN, 64 inf\) in 1 image\(s\) \(first images \[1\]",
        ),
    ],
)
def test_bad_inputs_are_clear_errors(x, y, match):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    with pytest.raises(ValueError, match=match):
        PGD(EPS)(model, x, y)


# ----------------------------------------------------------------------------------------------------- APGD


def test_apgd_checkpoints_follow_the_paper():
    # p = 0, .22, .41, .57, .70, .80, .87, .93, .99 (then 1.05 > 1)
    assert apgd_checkpoints(100) == [0, 22, 41, 57, 70, 80, 87, 93, 99]
    assert apgd_checkpoints(10) == [0, 3, 5, 6, 7, 8, 9, 10]


def test_apgd_and_pgd_find_the_corner_of_a_linear_model():
    """For a linear model the CE maximiser over the L-inf box is x + eps * sign(w1 - w0) (for y = 0), clipped."""
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    x = torch.rand(4, 1, 4, 4) * 0.8 + 0.1
    y = torch.zeros(4, dtype=torch.long)
    direction = (lin[1].weight[1] - lin[1].weight[0]).sign().view(1, 1, 4, 4)
    best = (x + EPS * direction).clamp(0, 1)
    for attack in (APGD(EPS, steps=10, seed=0), PGD(EPS, steps=10, seed=0)):
        assert torch.allclose(attack(lin, x, y), best, atol=1e-6), attack.describe()


def test_targeted_pgd_aims_every_other_image_at_the_target_and_leaves_the_target_class_alone():
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    x = torch.rand(6, 1, 4, 4) * 0.8 + 0.1
    y = torch.tensor([0, 0, 0, 1, 1, 1])
    x_adv = TargetedPGD(EPS, target_class=1, steps=10, seed=0)(lin, x, y)
    toward_1 = (lin[1].weight[1] - lin[1].weight[0]).sign().view(1, 1, 4, 4)
    assert torch.allclose(x_adv[:3], (x[:3] + EPS * toward_1).clamp(0, 1), atol=1e-6)
    assert torch.equal(x_adv[3:], x[3:])
    with torch.no_grad():
        assert (lin(x_adv[:3]).softmax(1)[:, 1] > lin(x[:3]).softmax(1)[:, 1]).all()
    assert "target class 1" in TargetedPGD(EPS).describe()


def test_random_noise_moves_every_pixel_by_eps_in_a_random_direction():
    x = torch.full((4, 1, 16, 16), 0.5)
    noise = RandomNoise("4/255", seed=0)(nn.Identity(), x, torch.zeros(4, dtype=torch.long))
    assert torch.allclose((noise - x).abs(), torch.full_like(x, 4 / 255))
    assert 0.4 < ((noise - x) > 0).float().mean() < 0.6
    edge = RandomNoise("4/255", seed=0)(nn.Identity(), torch.ones(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))
    assert edge.max() <= 1 and edge.min() >= 1 - 4 / 255 - 1e-6


# ------------------------------------------------------------------------------ consistency on a trained model


def test_the_trained_model_is_good_enough(trained):
    model, x, y = trained
    assert _accuracy(model, x, y) > 0.8


def test_robust_accuracy_never_exceeds_clean(trained):
    model, x, y = trained
    clean = _accuracy(model, x, y)
    for attack in (
        FGSM("2/255"),
        RFGSM("2/255", seed=0),
        PGD("2/255", steps=5, seed=0),
        CWLinf("2/255", steps=5, seed=0),
        APGD("2/255", steps=10, seed=0),
        MIM("2/255", steps=5),
    ):
        assert _accuracy(model, x, y, attack) <= clean, attack.describe()


def test_stronger_attacks_are_not_weaker(trained, pgd10_accuracy):
    """PGD-50 <= PGD-10 and APGD-CE-20 <= PGD-10, up to 2 points, at a radius where neither is trivial."""
    model, x, y = trained
    pgd50 = _accuracy(model, x, y, PGD("1/255", alpha="0.25/255", steps=50, seed=0))
    apgd = _accuracy(model, x, y, APGD("1/255", steps=20, seed=0))
    assert 0.05 < pgd10_accuracy < _accuracy(model, x, y) - 0.1, "the radius gives a non-trivial robust accuracy"
    assert pgd50 <= pgd10_accuracy + 0.02 and apgd <= pgd10_accuracy + 0.02, (pgd10_accuracy, pgd50, apgd)


def test_agrees_with_torchattacks_pgd(trained, pgd10_accuracy):
    """Same model, 256 samples, eps 1/255, step 0.25/255, 10 steps, random start on both."""
    torchattacks = pytest.importorskip("torchattacks")
    model, x, y = trained
    torch.manual_seed(0)
    reference = torchattacks.PGD(model, eps=1 / 255, alpha=0.25 / 255, steps=10, random_start=True)
    theirs = _accuracy(model, x, y, lambda m, xi, yi: reference(xi, yi))
    assert len(y) == 256 and 0.05 < theirs < 0.95
    assert abs(pgd10_accuracy - theirs) <= 0.02, (pgd10_accuracy, theirs)


# -------------------------------------------------------------------------------------- early-stopped PGD


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_attacks_stay_in_the_ball(dtype):
    from robustmed_lite.evaluation.attacks import APGD, PGD
    from robustmed_lite.method.feedback_attack import FeedbackPGD
    from robustmed_lite.models import create_model

    torch.manual_seed(0)
    model = create_model("tiny_visformer", img_size=64).cuda().eval()
    x = torch.rand(16, 1, 64, 64, device="cuda")
    y = torch.randint(0, 2, (16,), device="cuda")
    for attack in (
        PGD(8 / 255, steps=5, seed=0),
        APGD(8 / 255, steps=10, seed=0),
        FeedbackPGD(8 / 255, steps=5, seed=0),
    ):
        with torch.autocast("cuda", dtype=dtype):
            x_adv = attack(model, x, y)
        assert x_adv.dtype == x.dtype and x_adv.is_cuda
        assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
