"""method/feedback_attack.py: the feedback (early-stopping) PGD of the method's sample level. Both readings stop
where specified (FAT's first wrong iterate after tau steps; the last still-correct iterate), the batch stays aligned
with its views and labels, frozen samples leave the forward passes, and without a rule it is plain PGD."""

import pytest
import torch

from robustmed_lite.data.phantom import make_phantom_dataset
from robustmed_lite.evaluation.attacks import PGD
from robustmed_lite.method.feedback_attack import FeedbackPGD
from robustmed_lite.models import create_model
from robustmed_lite.trainer import fit_erm


@pytest.fixture(scope="module")
def trained(phantom_cnn):
    """small_cnn trained (ERM) on the 48 px phantom, with 256 held-out slices (conftest's ``phantom_cnn``)."""
    return phantom_cnn


def test_feedback_rules_stop_where_specified():
    """FAT (tau 0): the first misclassified iterate; last_correct: the last iterate still correct."""
    torch.manual_seed(0)
    model = create_model("small_cnn")
    train = make_phantom_dataset(512, 32, seed=0)
    fit_erm(model, train.images, train.labels, epochs=6, progress=False)
    model.eval()
    data = make_phantom_dataset(64, 32, seed=3)
    x, y = data.images, data.labels
    iterates = [
        PGD(8 / 255, alpha=2 / 255, steps=k, loss="kl", random_start="normal", seed=5)(model, x, y) for k in range(1, 9)
    ]
    with torch.no_grad():  # iterate 0 is the start, x + 0.001 N(0,1): wrong there iff wrong on x (checked below)
        logits = torch.stack([model(x)] + [model(it) for it in iterates])
    wrong = logits.argmax(2) != y
    assert wrong[0].any() and (~wrong[0] & wrong[1:].any(0)).any(), "the model exercises both cases"
    # Left out, as having no defined answer here: a slice whose logits tie to rounding at some iterate
    # (FeedbackPGD predicts on the samples still running, a smaller batch whose sums round differently), and one
    # so near the boundary at x that the random start x + 0.001 N(0,1), which row 0 stands in for, may cross it.
    margins = (logits[..., 1] - logits[..., 0]).abs()
    tied = (margins < 1e-4).any(0) | (margins[0] < 0.05)
    assert tied.sum() <= 3, f"{int(tied.sum())} of {len(y)} slices tie: the case no longer tests the rules"
    for rule in ("fat", "last_correct"):
        attack = FeedbackPGD(8 / 255, alpha=2 / 255, steps=8, loss="kl", rule=rule, seed=5)
        x_adv = attack(model, x, y)
        for i in (~tied).nonzero().flatten().tolist():
            k = int(attack.last_steps[i])
            first_wrong = int(wrong[:, i].float().argmax()) if wrong[:, i].any() else None
            if rule == "fat":
                assert k == (first_wrong if first_wrong is not None else 8)
            else:
                assert k == (max(first_wrong - 1, 0) if first_wrong is not None else 8)
            if k > 0:
                assert torch.allclose(x_adv[i], iterates[k - 1][i], atol=1e-6)
            elif rule == "last_correct":  # x itself if x is wrong, else the random start x + 0.001 N(0,1)
                assert torch.equal(x_adv[i], x[i]) if wrong[0, i] else (x_adv[i] - x[i]).abs().max() < 0.01


def test_feedback_keeps_batch_order_aligned_with_views_and_labels(trained):
    model, x, y = trained
    x, y = x[:64], y[:64]
    x_aug = x.flip(-1)  # an augmented view the caller keeps beside x
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    for rule in ("fat", "last_correct"):
        attack = FeedbackPGD("4/255", steps=8, loss="ce", rule=rule, random_start=False)
        x_adv = attack(model, x, y)
        steps = attack.last_steps.clone()
        assert len(steps.unique()) > 1, "samples stopped at different steps"
        # Shuffling the batch shuffles the result the same way: nothing is reordered inside.
        assert torch.equal(attack(model, x[perm], y[perm]), x_adv[perm])
        assert torch.equal(attack.last_steps, steps[perm])
        # Row i of x_adv is a perturbation of x[i], so x_aug[i] and y[i] still belong to it.
        assert (x_adv - x).abs().amax((1, 2, 3)).max() <= 4 / 255 + 1e-6
        assert (x_adv.flip(-1) - x_aug).abs().amax((1, 2, 3)).max() <= 4 / 255 + 1e-6


def test_feedback_last_correct_stays_correct(trained):
    model, x, y = trained
    attack = FeedbackPGD("8/255", steps=10, rule="last_correct", seed=0)
    x_adv = attack(model, x, y)
    with torch.no_grad():
        clean_ok = model(x).argmax(1) == y
        adv_ok = model(x_adv).argmax(1) == y
    assert torch.equal(adv_ok, clean_ok), "correct samples stay correct; wrong ones stay wrong"
    assert torch.equal(x_adv[~clean_ok], x[~clean_ok]) and (attack.last_steps[~clean_ok] == 0).all()
    assert (attack.last_steps < 10).any() and (attack.last_steps > 0).any()


@pytest.mark.parametrize("tau", [0, 2])
def test_feedback_fat_freezes_misclassified_iterates(trained, tau):
    model, x, y = trained
    attack = FeedbackPGD("8/255", steps=10, rule="fat", tau=tau, loss="ce", seed=0)
    x_adv = attack(model, x, y)
    frozen = attack.last_steps < 10
    assert frozen.any()
    with torch.no_grad():
        assert (model(x_adv[frozen]).argmax(1) != y[frozen]).all(), "a frozen sample is misclassified"
    assert (attack.last_steps[frozen] >= tau).all(), "tau misclassified iterates come before freezing"


def test_feedback_rules_reduce_to_pgd(trained):
    model, x, y = trained
    x, y = x[:64], y[:64]
    pgd = PGD(0.03, alpha=2 / 255, steps=6, loss="kl", random_start="normal", seed=3)(model, x, y)
    plain = FeedbackPGD(0.03, steps=6, rule=None, seed=3)(model, x, y)
    never_frozen = FeedbackPGD(0.03, steps=6, rule="fat", tau=6, seed=3)(model, x, y)
    assert torch.equal(plain, pgd) and torch.equal(never_frozen, pgd)


def test_feedback_frozen_samples_leave_the_forward_passes(trained):
    model, x, y = trained
    seen = []
    handle = model.register_forward_hook(lambda m, inp, out: seen.append(len(inp[0])))
    try:
        FeedbackPGD("8/255", steps=10, rule="fat", loss="ce", seed=0)(model, x, y)
    finally:
        handle.remove()
    assert seen[0] == len(x) and sum(seen) < 10 * len(x)
