"""Exercise checks for the workshop: ``check("nb02-fgsm", fgsm)`` prints right, or what is wrong.

A check never raises: an unfinished starter (``...``), a wrong answer and an answer that crashes all end in one
line that says what to look at, because a traceback in a room of thirty laptops stops the room. Each check builds
its own small, seeded test case (a model with known weights, a batch with a known answer), so it runs in a second
on a CPU, the same in the book build, in Colab and in the tests (``tests/test_book_workshop.py`` runs every solution
and every starter through it). The solutions themselves live in the notebooks, folded under each exercise.
"""

from __future__ import annotations

import ast
import copy
import inspect
import numbers
import tempfile
import textwrap
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

RIGHT, NOT_YET = "right", "not yet"


class NotYet(Exception):
    """Raised inside a checker: the message says what is wrong with the answer and where to look."""


@dataclass
class Exercise:
    """A check: ``checker(answer)`` returns the line shown when it is right, or raises NotYet."""

    label: str
    title: str
    checker: Callable


EXERCISES: dict[str, Exercise] = {}


def exercise(label: str, title: str):
    """Registers a checker under the label the notebook's ``{exercise}`` directive carries."""

    def register(checker: Callable) -> Callable:
        if label in EXERCISES:
            raise ValueError(f"exercise {label!r} is registered twice")
        EXERCISES[label] = Exercise(label, title, checker)
        return checker

    return register


def _unfinished(answer) -> bool:
    """The starter as given: ``...`` itself, or a function whose source still holds a ``...``."""
    if answer is Ellipsis or answer is None:
        return True
    if not inspect.isfunction(answer):
        return False
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(answer)))
    except (OSError, TypeError, SyntaxError):  # no source to read (exec'd code): judge by the result
        return False
    return any(isinstance(node, ast.Constant) and node.value is Ellipsis for node in ast.walk(tree))


def check(label: str, answer) -> None:
    """Checks an answer and prints one line, ``right: ...`` or ``not yet: ...``; returns nothing. Never raises.

    It returns None so that a notebook cell ending in ``check(...)`` shows the line alone, not a ``False`` under
    it that reads as a failure.

    Args:
        label: The exercise's label, as in the notebook (``nb02-fgsm``).
        answer: What the exercise asks for: a function, a name, a number.
    """
    if label not in EXERCISES:
        print(f"{NOT_YET}: there is no exercise {label!r}; the exercises are {', '.join(sorted(EXERCISES))}")
        return
    ex = EXERCISES[label]
    if _unfinished(answer):
        print(f"{NOT_YET}: {ex.title} - replace the `...` in the cell above with your code, run it, then this cell")
        return
    try:
        message = ex.checker(answer)
    except NotYet as err:
        print(f"{NOT_YET}: {err}")
        return
    except Exception as err:  # the attendee's code crashed: show where in their code, in one line
        frames = [f for f in traceback.extract_tb(err.__traceback__) if f.filename != __file__]
        where = f" (line {frames[-1].lineno}: {frames[-1].line})" if frames else ""
        print(f"{NOT_YET}: your code raised {type(err).__name__}: {err}{where}")
        return
    print(f"{RIGHT}: {message}")


# ------------------------------------------------------------------------------------------- test cases
class _BatchNormNet(nn.Module):
    """A small seeded CNN with BatchNorm, so that an attack run in train mode gives other results than eval mode."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(128, 2),
        )
        with torch.no_grad():  # give the BatchNorm running statistics that differ from any batch's own
            self.body[1].running_mean.uniform_(-0.2, 0.2)
            self.body[1].running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        return self.body(x)


def _fgsm_case():
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(16, 1, 16, 16, generator=gen)
    x[:2] = 0.0  # black and white slices: a step past [0, 1] must be clipped
    x[2:4] = 1.0
    y = torch.randint(0, 2, (16,), generator=gen)
    return _BatchNormNet().eval(), x, y


def _gradient_sign(model, x, y):
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y), x)
    return grad.sign()


@exercise("nb02-fgsm", "FGSM: one signed gradient step of size eps that increases the loss, in eval mode, in [0, 1]")
def _check_fgsm(fgsm) -> str:
    eps = 8 / 255
    model, x, y = _fgsm_case()
    model.train()  # the attack must switch to eval mode itself, and leave the mode as it found it
    x_before = x.clone()
    x_adv = fgsm(model, x, y, eps)
    if not isinstance(x_adv, torch.Tensor) or x_adv.shape != x.shape:
        raise NotYet(
            f"fgsm should return a tensor shaped like x {tuple(x.shape)}, got "
            f"{getattr(x_adv, 'shape', type(x_adv).__name__)}"
        )
    if not torch.equal(x, x_before):
        raise NotYet("fgsm changed x in place: work on a copy (x.clone().requires_grad_(True))")
    if not model.training:
        raise NotYet("fgsm left the model in eval mode: restore the mode it had (see robustmed_lite.common.eval_mode)")
    if x_adv.requires_grad:
        raise NotYet("return x_adv.detach(): a tensor that still carries the attack's graph keeps it in memory")
    if x_adv.min() < 0 or x_adv.max() > 1:
        raise NotYet(f"x_adv leaves the pixel range [0, 1] (min {x_adv.min():.3f}, max {x_adv.max():.3f}): clamp it")
    if (x_adv - x).abs().max() > eps + 1e-6:
        raise NotYet(f"x_adv moves a pixel by {(x_adv - x).abs().max():.4f}, more than eps = {eps:.4f}")
    sign = _gradient_sign(model.eval(), x, y)
    if torch.allclose(x_adv, (x + eps * sign).clamp(0, 1), atol=1e-6):
        return "one signed step of eps up the loss, in eval mode, clamped to [0, 1]"
    if torch.allclose(x_adv, (x - eps * sign).clamp(0, 1), atol=1e-6):
        raise NotYet("the step goes down the loss: FGSM adds eps * sign(gradient), it does not subtract it")
    if torch.allclose(x_adv, (x + eps * _gradient_sign(model.train(), x, y)).clamp(0, 1), atol=1e-6):
        raise NotYet(
            "these are the train-mode gradients: BatchNorm then normalises with the batch's own "
            "statistics. Attack in eval mode (model.eval(), then restore the mode)"
        )
    raise NotYet("x_adv differs from x + eps * sign(grad of the cross-entropy at x): check the loss and the sign")


class _MaskedLinear(nn.Module):
    """Gradient masking by saturation: a correct, confident linear classifier whose logits are scaled by 1e4,
    so that the softmax is exactly one-hot in float32 and the cross-entropy's gradient vanishes."""

    def __init__(self, size: int = 16, scale: float = 1e4):
        super().__init__()
        weight = torch.zeros(size, size)
        weight[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1.0
        self.register_buffer("weight", weight / weight.sum())
        self.scale = scale

    def forward(self, x):
        score = (x[:, 0] * self.weight).sum((-2, -1)) - 0.5
        return self.scale * torch.stack([-score, score], 1)


def masking_case(n: int = 64, seed: int = 0):
    """The gradient-masking model of notebook 02's exercise and a batch it classifies correctly.

    Class 1 slices are brighter in the centre by 0.02 (about 5/255), so an L-inf attack of 8/255 can flip every
    one of them, while cross-entropy PGD sees a zero gradient and flips none.
    """
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = (0.5 + 0.04 * (y[:, None, None, None] - 0.5) + 0.005 * torch.randn(n, 1, 16, 16, generator=gen)).clamp(0, 1)
    return _MaskedLinear().eval(), x, y


@exercise(
    "nb02-masking",
    "an attack that gets past gradient masking: accuracy at 8/255 near zero where cross-entropy PGD reports near 100%",
)
def _check_masking(attack) -> str:
    eps = 8 / 255
    model, x, y = masking_case()
    x_adv = attack(model, x, y)
    if not isinstance(x_adv, torch.Tensor) or x_adv.shape != x.shape:
        raise NotYet(f"the attack should return x_adv shaped like x {tuple(x.shape)}")
    x_adv = x_adv.detach()
    if x_adv.min() < 0 or x_adv.max() > 1 or (x_adv - x).abs().max() > eps + 1e-6:
        raise NotYet(
            f"x_adv must stay within eps = 8/255 of x and inside [0, 1]; it moves a pixel by "
            f"{(x_adv - x).abs().max():.4f}, range [{x_adv.min():.3f}, {x_adv.max():.3f}]"
        )
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
        robust = (model(x_adv).argmax(1) == y).float().mean().item()
    if robust > 0.1:
        raise NotYet(
            f"accuracy under your attack is {robust:.2f} (clean {clean:.2f}): the cross-entropy's gradient "
            "is zero here. Try a loss that does not saturate (the logit margin, as CW does), or scale the "
            "logits down before the loss"
        )
    return f"accuracy {clean:.2f} -> {robust:.2f}: the model was never robust, its gradients were hidden"


def _name_the_mistake(got: torch.Tensor, mistakes) -> None:
    """Raises NotYet with the hint of the first ``(value, hint)`` whose value the answer equals."""
    for value, hint in mistakes:
        if torch.allclose(got, value):
            raise NotYet(hint)


def _require_tensor(got, shape: tuple, what: str) -> None:
    """Raises NotYet unless the answer is a tensor of ``shape``; ``what`` names what it should be."""
    if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(shape):
        raise NotYet(f"return {what}, got {getattr(got, 'shape', type(got).__name__)!r}")


def _wrong_number(got: torch.Tensor, expected: torch.Tensor, mistakes, how: str) -> NotYet:
    """NotYet naming the first known mistake the answer equals, else the expected and the given number."""
    _name_the_mistake(got, mistakes)
    return NotYet(f"expected {expected.item():.4f}, got {got.item():.4f}: {how}")


# ------------------------------------------------------------------------------------- chapter 03 (training)
@exercise("nb03-trades", "the TRADES loss: CE on the clean logits plus beta times KL(p(x) || p(x')), averaged")
def _check_trades(trades) -> str:
    from ..method.objectives import kl_per_sample, trades_loss

    gen = torch.Generator().manual_seed(3)
    nat, adv = (torch.randn(16, 2, generator=gen, dtype=torch.float64) for _ in range(2))
    y, beta = torch.randint(0, 2, (16,), generator=gen), 3.0
    got = trades(nat.clone(), adv.clone(), y.clone(), beta)
    _require_tensor(got, (), "one number, a 0-d tensor (the loss averaged over the batch)")
    expected, got = trades_loss(nat, adv, y, beta), got.double()
    if torch.allclose(got, expected):
        return f"TRADES loss {expected.item():.4f}: the clean fit plus beta times the change of the prediction"
    ce, kl = F.cross_entropy(nat, y), kl_per_sample(nat, adv)
    mistakes = [
        (
            ce + beta * kl_per_sample(adv, nat).mean(),
            "the KL is the other way round: KL(p(x) || p(x')) weighs the disagreement by the clean prediction p(x)",
        ),
        (
            F.cross_entropy(adv, y) + beta * kl.mean(),
            "the cross-entropy belongs to the clean logits, CE(f(x), y); the attacked slice enters only through the KL",
        ),
        (ce + beta * kl.sum(), "that sums the KL over the batch: average it, as the cross-entropy is"),
        (ce + kl.mean(), "beta is missing: multiply the KL by beta"),
        (
            ce + beta * F.kl_div(F.log_softmax(adv, 1), F.softmax(nat, 1), reduction="mean"),
            "F.kl_div with reduction='mean' divides by every element (N x 2), not by N: use 'batchmean'",
        ),
    ]
    raise _wrong_number(
        got,
        expected,
        mistakes,
        "CE(logits_nat, y) plus beta times the batch mean of KL(softmax(logits_nat) || softmax(logits_adv))",
    )


@exercise("nb03-project", "the projection onto the L-inf ball around x, within the pixel range [0, 1]")
def _check_project(project) -> str:
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(4, 1, 8, 8, generator=gen)
    x[0], x[1] = 0.0, 1.0  # a black and a white slice, where the ball leaves [0, 1]
    x_adv = x + 0.2 * (2 * torch.rand(x.shape, generator=gen) - 1)
    eps = 4 / 255
    ball = torch.min(torch.max(x_adv, x - eps), x + eps)
    got = project(x_adv.clone(), x.clone(), eps)
    _require_tensor(got, x.shape, f"a tensor shaped like x_adv {tuple(x.shape)}")
    if torch.allclose(got, ball.clamp(0, 1), atol=1e-7):
        return "every pixel within eps of x and inside [0, 1]: the feasible set PGD steps in"
    if torch.allclose(got, ball, atol=1e-7):
        raise NotYet("inside the ball, but not inside [0, 1]: clamp to [0, 1] as well (slice 0 is black, 1 white)")
    if torch.allclose(got, x_adv.clamp(0, 1), atol=1e-7):
        raise NotYet("clamped to [0, 1] only: also keep every pixel within eps of x")
    raise NotYet("clamp each pixel to [max(x - eps, 0), min(x + eps, 1)]")


# ---------------------------------------------------------------------------------- chapter 04 (weights)
@exercise("nb04-defence", "a defence registered with register_loss and trained by the Trainer")
def _check_defence(name) -> str:
    from ..components import LOSSES, Batch
    from ..config import load_config
    from ..trainer import Trainer

    if not isinstance(name, str):
        raise NotYet("pass the name you registered the loss under, e.g. check('nb04-defence', 'my_defence')")
    if name not in LOSSES:
        raise NotYet(
            f"no loss {name!r} is registered: decorate your function with @register_loss({name!r}, "
            "needs_attack=True) and run that cell"
        )
    if _unfinished(LOSSES[name]):
        raise NotYet(f"{name!r} is registered, but its body is still `...`: replace the `...` with the loss")
    with tempfile.TemporaryDirectory() as run_dir:  # a throw-away run: the check trains one step
        cfg = load_config(
            "cpu-demo",
            dict(
                method="trades",
                loss=name,
                img_size=32,
                n_train=64,
                n_val=32,
                n_test=32,
                batch_size=32,
                epochs=1,
                eval_n=16,
                attack_steps=2,
                eval_attack_steps=2,
                progress=False,
                out_dir=run_dir,
            ),
        )
        trainer = Trainer(cfg)
    x, x_aug, y = next(trainer.data.train.batches(32, epoch=0))[:3]
    loss = LOSSES[name](trainer.model, Batch(x, x, x_aug, y), cfg)
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise NotYet(f"the loss should return one number (a 0-d tensor), got {getattr(loss, 'shape', loss)!r}")
    if not loss.requires_grad:
        raise NotYet(
            "the loss carries no gradient: compute it from model(...) outputs, without .item() or torch.no_grad()"
        )
    before = [p.detach().clone() for p in trainer.model.parameters()]
    stats = trainer.train_step(x, x_aug, y, epoch=0, attack=trainer.sample_attack(0), batch_index=0)
    moved = sum(not torch.equal(b, p) for b, p in zip(before, trainer.model.parameters()))
    if not torch.isfinite(torch.tensor(stats["loss"])) or not moved:
        raise NotYet(f"a training step with {name!r} gave loss {stats['loss']} and moved {moved} weight tensors")
    return f"the Trainer took a step with {name!r} (loss {stats['loss']:.3f}); train it with --loss {name} as well"


def _history_case():
    """A run's per-epoch log: validation PGD accuracy ties at epochs 4 and 6 (robust overfitting after that), the
    best clean epoch is 5, and a test column, logged for the report, peaks at epoch 7."""
    import pandas as pd

    return pd.DataFrame(
        {
            "epoch": range(1, 9),
            "train_loss": [0.69, 0.61, 0.55, 0.50, 0.46, 0.43, 0.40, 0.38],
            "val_clean": [0.60, 0.70, 0.74, 0.78, 0.83, 0.80, 0.81, 0.82],
            "val_robust": [0.30, 0.38, 0.41, 0.47, 0.44, 0.47, 0.45, 0.43],
            "test_robust": [0.31, 0.37, 0.40, 0.44, 0.45, 0.46, 0.49, 0.42],
        }
    )


@exercise("nb04-select", "the checkpoint a robust run keeps: the first epoch with the best validation PGD accuracy")
def _check_select(select_epoch) -> str:
    history = _history_case()
    got = select_epoch(history.copy())
    if not isinstance(got, numbers.Real) or not float(got).is_integer():
        raise NotYet(
            f"return one epoch number, got a {type(got).__name__}: the value in the `epoch` column of the chosen row"
        )
    got = int(got)
    mistakes = {
        8: "that is the last epoch: a run keeps the epoch with the best val_robust (best_robust.pt), and robust "
        "overfitting often puts it well before the end",
        7: "epoch 7 has the best test_robust: the test split must choose nothing, or its accuracy is no longer an "
        "estimate for new patients. Choose on val_robust",
        5: "epoch 5 has the best val_clean, ERM's choice (best_clean.pt); the robust methods choose on val_robust",
        6: "epochs 4 and 6 tie on val_robust, and the trainer keeps the first: it saves a checkpoint only on a "
        "strict improvement (`>` in Trainer._save_epoch)",
        3: "3 is the row's 0-based position: return the value of its `epoch` column, which counts from 1",
    }
    if got == 4:
        return "epoch 4, as best_robust.pt holds; the test split stays unused until the report"
    raise NotYet(
        mistakes.get(
            got,
            f"epoch {got} does not have the highest val_robust: take the row with the "
            "largest val_robust (the first one on ties) and return its epoch",
        )
    )


# --------------------------------------------------------------------------- chapter 07 (the method put together)
@exercise("nb07-loss", "the method's loss: ||p(x) - y~||^2 + beta ||p(x') - p(x)||^2 with the soft target y~")
def _check_method_loss(method_loss) -> str:
    from ..method.objectives import kl_per_sample, soft_target, square_kl_loss

    gen = torch.Generator().manual_seed(7)
    nat, adv, aug = (torch.randn(16, 2, generator=gen, dtype=torch.float64) for _ in range(3))
    y, beta, smooth = torch.randint(0, 2, (16,), generator=gen), 3.0, 0.3
    got = method_loss(nat.clone(), adv.clone(), aug.clone(), y.clone(), beta, smooth)
    _require_tensor(got, (), "one number, a 0-d tensor (the loss averaged over the batch)")
    expected, got = square_kl_loss(nat, adv, aug, y, beta, smooth), got.double()
    if torch.allclose(got, expected):
        return (
            f"loss {expected.item():.4f}: the fit to the soft target plus beta times the squared change of the "
            "prediction under attack"
        )
    p_nat, p_adv, p_aug = (t.softmax(1) for t in (nat, adv, aug))
    onehot = F.one_hot(y, 2).double()
    target = soft_target(aug, y, smooth)

    def square(a, b):
        return ((a - b) ** 2).sum(1).mean()

    mistakes = [
        (
            square(p_nat, onehot) + beta * square(p_adv, p_nat),
            "the target is the plain one-hot label: mix in the "
            "prior view's prediction, y~ = smooth * softmax(logits_aug) + (1 - smooth) * onehot(y)",
        ),
        (
            square(p_nat, (1 - smooth) * p_aug + smooth * onehot) + beta * square(p_adv, p_nat),
            "the weights of the mix are swapped: smooth goes with the prior view's prediction, 1 - smooth with the "
            "label",
        ),
        (
            square(nat, target) + beta * square(adv, nat),
            "that compares logits: the square loss is on probabilities, softmax(logits) first",
        ),
        (
            square(p_nat, target) + beta * kl_per_sample(nat, adv).mean(),
            "the second term is the squared "
            "difference of the two probability vectors, not a KL (the KL drives the attack that made x')",
        ),
        (
            ((p_nat - target) ** 2).sum() + beta * ((p_adv - p_nat) ** 2).sum(),
            "that sums over the batch: average each term over the slices",
        ),
        (
            ((p_nat - target) ** 2).mean() + beta * ((p_adv - p_nat) ** 2).mean(),
            "that averages over the two classes "
            "as well: sum the squares over the classes, then average over the slices",
        ),
        (square(p_nat, target) + square(p_adv, p_nat), "beta is missing: multiply the second term by beta"),
    ]
    raise _wrong_number(
        got,
        expected,
        mistakes,
        "the batch mean of the squared distance from softmax(logits_nat) to y~, plus beta times that of "
        "softmax(logits_adv) to softmax(logits_nat)",
    )


@exercise("nb07-rescale", "a layer's weight noise: the proxy's step rescaled to the layer's own norm")
def _check_rescale(rescale) -> str:
    gen = torch.Generator().manual_seed(8)
    w = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    dw = 1e-3 * torch.randn(6, 5, generator=gen, dtype=torch.float64)
    got = rescale(dw.clone(), w.clone())
    _require_tensor(got, w.shape, f"a tensor shaped like the weight {tuple(w.shape)}")
    got = got.double()
    expected = w.norm() / dw.norm() * dw
    if torch.allclose(got, expected):
        return "||d|| = ||w||: gamma = 5e-3 then moves every layer by 0.5% of its own size, in the proxy's direction"
    mistakes = [
        (dw, "that is the proxy's step itself: rescale it so that its norm is the weight's, ||w|| / ||dw|| * dw"),
        (
            dw / dw.norm(),
            "unit norm: multiply by the weight's norm ||w||, so that every layer moves in proportion to its own size",
        ),
        (dw.norm() / w.norm() * dw, "the ratio is upside down: ||w|| / ||dw||"),
        (w.norm() * dw, "divide by ||dw|| as well: the step's own size must cancel"),
        (
            w / dw * dw,
            "that divides element by element: use the norms of the whole tensors (torch.linalg.norm or .norm())",
        ),
        (-expected, "the sign is flipped: the noise goes where the proxy stepped, proxy minus model"),
    ]
    _name_the_mistake(got, mistakes)
    raise NotYet("expected dw scaled by ||w|| / ||dw|| (Frobenius norms of the whole tensors)")


# ------------------------------------------------------------------------------ chapters 00, 01, 05-09
def _compare(got, expected, what: str, atol: float = 1e-5):
    got = torch.as_tensor(got, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    if got.shape != expected.shape:
        raise NotYet(f"{what} should have shape {tuple(expected.shape)}, got {tuple(got.shape)}")
    return torch.allclose(got, expected, atol=atol, equal_nan=True)


@exercise("nb00-window", "a CT window: Hounsfield units to grey levels in [0, 1]")
def _check_window(to_unit) -> str:
    from ..data.loaders import window_hu

    hu = torch.linspace(-2000, 1500, 351)
    for width, level, name in ((1500.0, -600.0, "lung"), (400.0, 40.0, "soft-tissue")):
        got = to_unit(hu, width, level)
        expected = window_hu(hu.numpy(), (width, level))
        if _compare(got, expected, "the result"):
            continue
        got = torch.as_tensor(got, dtype=torch.float64)
        if got.min() < 0 or got.max() > 1:
            raise NotYet(
                f"the {name} window gives values outside [0, 1] ({got.min():.2f} to {got.max():.2f}): clip "
                "what lies below and above the window"
            )
        ends = to_unit(torch.tensor([level - width / 2, level + width / 2]), width, level)
        raise NotYet(
            f"the {name} window (W {width:g}, L {level:g}) should put L - W/2 = {level - width / 2:g} HU at 0 "
            f"and L + W/2 = {level + width / 2:g} HU at 1; yours gives {float(ends[0]):.3f} and "
            f"{float(ends[1]):.3f}"
        )
    return (
        "air (-1000 HU) is 0.233 in the lung window and 0 in the soft-tissue one: the window decides what a model sees"
    )


@exercise("nb00-noise", "a site's image noise in grey levels of 255, to set beside the attack budgets")
def _check_noise(noise_255) -> str:
    from ..data.phantom import SITES

    for site in SITES.values():
        expected = site.noise_hu / site.width * 255
        got = float(noise_255(site.noise_hu, site.width))
        if abs(got - expected) < 1e-6:
            continue
        what = f"site {site.name} (noise {site.noise_hu:g} HU, window width {site.width:g} HU)"
        if abs(got - expected / 255) < 1e-9:
            raise NotYet(
                f"{what}: {got:.4f} is on the [0, 1] scale; multiply by 255 to compare it with budgets written as k/255"
            )
        if abs(got - 2 * expected) < 1e-6:
            raise NotYet(
                f"{what}: the window spreads its whole width W over the 255 grey levels, not W/2: one HU "
                "is 255 / W grey levels"
            )
        raise NotYet(
            f"{what}: expected {expected:.2f} grey levels, got {got:.2f}. The window maps W HU onto 255 "
            "grey levels, so noise_hu HU become noise_hu / W * 255"
        )
    a, b, c = (s.noise_hu / s.width * 255 for s in (SITES["A"], SITES["B"], SITES["C"]))
    return (
        f"site A {a:.1f}/255, B {b:.1f}/255, C {c:.1f}/255 per pixel: the attacks of notebook 02 (0.5-8/255) "
        "are the size of the scanner's own noise, but aimed instead of random"
    )


def _box_case():
    gen = torch.Generator().manual_seed(3)
    return torch.rand(2, 1, 12, 10, generator=gen, dtype=torch.float64)


@exercise("nb01-box", "the box filter: the mean over every (2r+1) x (2r+1) window, borders mirrored")
def _check_box(box_mean) -> str:
    from ..method.prior import box_filter

    x = _box_case()
    for r in (1, 2):
        got, expected = box_mean(x.clone(), r), box_filter(x, r)
        if _compare(got, expected, f"box_mean(x, {r})"):
            continue
        inner = (slice(None), slice(None), slice(r, -r), slice(r, -r))
        if _compare(torch.as_tensor(got)[inner], expected[inner], "the interior"):
            raise NotYet(
                f"the interior is right for r = {r}, the borders are not: mirror the image at its edges, "
                "edge pixel included (numpy's pad mode 'symmetric'), then average"
            )
        raise NotYet(
            f"box_mean(x, {r}) differs from the window mean even away from the borders: average the "
            f"{2 * r + 1} x {2 * r + 1} window around each pixel"
        )
    return "each pixel is now the mean of its window; the guided filter is four of these and some arithmetic"


@exercise("nb01-guided", "the guided filter (He et al. 2013) from box filters")
def _check_guided(guided) -> str:
    from ..method.prior import guided_filter

    gen = torch.Generator().manual_seed(4)
    I = torch.rand(2, 1, 24, 24, generator=gen, dtype=torch.float64)
    p = (I > 0.5).double()
    for r, eps in ((2, 0.01), (3, 1e-3)):
        got, expected = guided(I, p, r, eps), guided_filter(I, p, r, eps, backend="torch")
        if not _compare(got, expected, "the output", atol=1e-6):
            raise NotYet(
                f"for r = {r}, eps = {eps:g} the output differs by up to "
                f"{(torch.as_tensor(got, dtype=torch.float64) - expected).abs().max():.3g}. Check a = "
                "cov(I, p) / (var(I) + eps), b = mean(p) - a mean(I), and that q = mean(a) I + mean(b) "
                "averages a and b once more"
            )
    return "q follows the guide's edges where var(I) >> eps and is smooth where var(I) << eps"


@exercise("nb05-pointing", "the pointing game: does each map's maximum fall inside the lesion mask?")
def _check_pointing(hits) -> str:
    from ..evaluation.saliency import pointing_game

    gen = torch.Generator().manual_seed(5)
    maps = torch.rand(8, 1, 10, 10, generator=gen)
    masks = torch.zeros(8, 1, 10, 10, dtype=torch.bool)
    masks[:, :, 2:6, 3:7] = True
    maps[::2, :, 4, 4] = 2.0  # every other map peaks inside the mask, the rest outside
    maps[1::2, :, 8, 8] = 2.0
    got = hits(maps, masks)
    expected = pointing_game(maps, masks)
    if not _compare(torch.as_tensor(got).float().reshape(-1), expected, "the hits"):
        raise NotYet(
            f"hits should be 1 where the maximum of a map lies in its mask and 0 elsewhere, one per image: "
            f"expected {expected.int().tolist()}, got {torch.as_tensor(got).int().reshape(-1).tolist()}"
        )
    return f"{int(expected.sum())} of {len(expected)} maps point inside: the score counts peaks, not mass"


@exercise("nb05-ratio", "the lung-attention ratio: the share of each map's mass inside its mask")
def _check_ratio(lung_ratio) -> str:
    from ..evaluation.saliency import mass_ratio

    gen = torch.Generator().manual_seed(9)
    maps = 3 * torch.rand(6, 1, 10, 10, generator=gen) ** 2  # not normalised: the ratio must divide by the mass
    masks = torch.zeros(6, 1, 10, 10, dtype=torch.bool)
    masks[:, :, 2:8, 1:5] = True
    masks[4] = False  # a slice where no lung was found
    maps[5] = 0.0  # a map with no mass
    expected = mass_ratio(maps, masks)
    got = lung_ratio(maps.clone(), masks.clone())
    if _compare(got, expected, "the ratios (one per map)"):
        return f"ratios {', '.join(f'{r:.2f}' for r in expected.tolist())}: NaN where there is nothing to measure"
    got = torch.as_tensor(got, dtype=torch.float64)
    valid = expected.isfinite()
    inside = (maps * masks).flatten(1).sum(1).double()
    if torch.allclose(got[valid], inside[valid], atol=1e-4):
        raise NotYet(
            "that is the mass inside the mask, not its share: divide by each map's total mass (these maps "
            "are not normalised)"
        )
    mean_inside = inside / masks.flatten(1).sum(1).clamp(min=1)
    if torch.allclose(got[valid], mean_inside[valid], atol=1e-4):
        raise NotYet(
            "that is the map's mean value inside the mask: the ratio is the mass inside divided by the map's total mass"
        )
    if torch.allclose(got[valid], expected[valid].double(), atol=1e-5):
        why = {4: "image 4 has an empty mask (no lung found)", 5: "image 5 is a map with no mass"}
        wrong = "; ".join(why[i] for i in (4, 5) if not got[i].isnan())
        raise NotYet(
            f"right wherever a ratio exists, but {wrong}: there the ratio is undefined, so return NaN, "
            "and the means (nanmean) leave the slice out instead of counting it as 0"
        )
    raise NotYet(
        f"expected {[round(r, 3) for r in expected.tolist()]}, got {[round(r, 3) for r in got.tolist()]}: "
        "per map, the sum of the map inside the mask divided by the map's sum"
    )


@exercise("nb06-mce", "the mean corruption error against a reference model (Hendrycks and Dietterich 2019)")
def _check_mce(mce) -> str:
    errors = {"noise": [0.10, 0.20, 0.40], "blur": [0.05, 0.10, 0.20], "window": [0.30, 0.50, 0.60]}
    reference = {"noise": [0.20, 0.30, 0.50], "blur": [0.05, 0.05, 0.10], "window": [0.20, 0.30, 0.40]}
    expected = sum(sum(errors[c]) / sum(reference[c]) for c in errors) / len(errors)
    got = mce(errors, reference)
    if abs(float(got) - expected) < 1e-9:
        return f"mCE {expected:.3f}: above 1 means more error than the reference, corruption by corruption"
    wrong_order = sum(sum(e) for e in errors.values()) / sum(sum(e) for e in reference.values())
    if abs(float(got) - wrong_order) < 1e-9:
        raise NotYet(
            "that is the ratio of the total errors: take the ratio per corruption (summed over "
            "severities), then the mean of those ratios, so that no corruption dominates"
        )
    raise NotYet(
        f"expected {expected:.4f}, got {float(got):.4f}: for each corruption, sum the errors over the "
        "severities and divide by the reference's sum; then average over the corruptions"
    )


def _corruption_case():
    """A long table as ``ood.corruption_table`` returns it, less its family column: three models, their clean rows
    (severity 0) and six corruptions of three families at severities 1-5."""
    import pandas as pd

    gen = torch.Generator().manual_seed(10)
    rows = []
    for model, clean in (("erm", 0.92), ("trades", 0.81), ("robustmed", 0.84)):
        rows.append({"model": model, "corruption": "clean", "severity": 0, "accuracy": clean, "n": 200})
        for corruption in ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "low_dose", "ring"):
            drops = (0.06 * torch.rand(5, generator=gen, dtype=torch.float64)).cumsum(0)  # worse with severity
            rows += [
                {"model": model, "corruption": corruption, "severity": s, "accuracy": round(clean - d, 3), "n": 200}
                for s, d in enumerate(drops.tolist(), 1)
            ]
    return pd.DataFrame(rows)


@exercise("nb06-family", "the mean corruption accuracy per model and corruption family")
def _check_family(family_means) -> str:
    import pandas as pd

    from ..evaluation.corruptions import FAMILY_OF

    table = _corruption_case()
    expected = (
        table[table["severity"] > 0]
        .assign(family=table["corruption"].map(FAMILY_OF))
        .groupby(["model", "family"])["accuracy"]
        .mean()
        .unstack()
    )
    try:
        got = family_means(table.copy())
    except KeyError as err:
        if "family" not in str(err):
            raise
        raise NotYet(
            "this table has no `family` column: map each corruption to its family with FAMILY_OF, e.g. "
            "table['corruption'].map(FAMILY_OF)"
        ) from None
    if isinstance(got, pd.DataFrame) and {"model", "family", "accuracy"} <= set(got.columns):  # the long form
        got = got.set_index(["model", "family"])["accuracy"]
    if isinstance(got, pd.Series) and got.index.nlevels == 2:
        got = got.unstack()
    if isinstance(got, pd.Series) and set(got.index) <= set(FAMILY_OF.values()) | {"clean"}:
        raise NotYet("one number per family, with the models averaged together: group by model and family")
    if not isinstance(got, pd.DataFrame):
        raise NotYet(
            f"return a DataFrame with one row per model and one column per family (as by_family above), "
            f"got {type(got).__name__}"
        )
    if set(got.index) <= set(FAMILY_OF.values()):  # grouped by family, then model: the same numbers, transposed
        got = got.T
    if set(got.columns) & set(FAMILY_OF):
        raise NotYet(
            "the columns are corruptions: map each corruption to its family (FAMILY_OF), then average over "
            "all the family's corruptions and severities"
        )
    if "clean" in got.columns:
        raise NotYet(
            "there is a column for the clean rows: leave out severity 0 (the clean images), which belongs to no family"
        )
    missing = sorted(set(expected.index) - set(got.index))
    if missing:
        raise NotYet(
            f"no row for {', '.join(missing)}: one row per model of the table ({', '.join(sorted(expected.index))})"
        )
    if set(got.columns) != set(expected.columns) or set(got.index) != set(expected.index):
        raise NotYet(
            f"expected the models {sorted(expected.index)} as rows and the families "
            f"{sorted(expected.columns)} as columns; got {sorted(map(str, got.index))} and "
            f"{sorted(map(str, got.columns))}"
        )
    got = got.loc[expected.index, expected.columns].to_numpy(dtype=float, copy=True)
    if _compare(got, expected.to_numpy(copy=True), "the table"):
        worst = expected.mean().idxmin()
        return (
            f"{len(expected)} models x {len(expected.columns)} families; {worst} costs the most here, which one "
            "mean over all corruptions would hide"
        )
    raise NotYet(
        "the means differ: per model and family, average the accuracy over every corruption of the family "
        "and every severity 1-5, leaving the clean rows (severity 0) out"
    )


@exercise("nb08-interval", "a paired 95% t-interval of the per-seed differences")
def _check_interval(paired_interval) -> str:
    from ..evaluation.stats import t_interval

    a, b = [0.71, 0.68, 0.74], [0.66, 0.67, 0.69]
    expected = t_interval([x - y for x, y in zip(a, b)])
    got = paired_interval(a, b)
    if not isinstance(got, (tuple, list)) or len(got) != 3:
        raise NotYet("return three numbers: (mean, low, high) of the differences a - b")
    if all(abs(float(g) - e) < 1e-9 for g, e in zip(got, (expected.mean, expected.low, expected.high))):
        return (
            f"{expected.mean:+.3f} [{expected.low:+.3f}, {expected.high:+.3f}]: with 3 seeds, t(0.975, 2) = 4.30 "
            "makes the interval wide"
        )
    unpaired = t_interval(a).mean - t_interval(b).mean
    if abs(float(got[0]) - unpaired) < 1e-9:
        raise NotYet(
            "the mean is right, the interval is not: take the t-interval of the differences a[i] - b[i], "
            "with n - 1 degrees of freedom (scipy.stats.t.ppf(0.975, n - 1))"
        )
    raise NotYet(
        f"expected {expected.mean:.4f} [{expected.low:.4f}, {expected.high:.4f}]: the mean of the "
        "differences a[i] - b[i] plus and minus t(0.975, n - 1) * their standard deviation / sqrt(n)"
    )


def _seeds_for(sd: float, half_width: float, quantile: Callable) -> int:
    """The smallest n >= 2 with quantile(n) * sd / sqrt(n) <= half_width."""
    n = 2
    while quantile(n) * sd / n**0.5 > half_width:
        n += 1
    return n


@exercise("nb08-seeds", "how many seeds a 95% t-interval of a given half-width needs")
def _check_seeds(seeds_needed) -> str:
    from scipy import stats

    def t(n):
        return stats.t.ppf(0.975, n - 1)

    # (0.02, 0.02) tells t from 1.96, from n degrees of freedom and from the one-sided quantile (7, 4, 6 and 5
    # seeds); (0.01, 0.1) needs only the floor of two seeds
    for sd, half_width in ((0.02, 0.02), (0.03, 0.02), (0.01, 0.1)):
        expected, got = _seeds_for(sd, half_width, t), seeds_needed(sd, half_width)
        if got == expected:
            continue
        what = f"sd {sd:g}, half-width {half_width:g}: expected {expected} seeds, got {got}"
        if got < 2:
            raise NotYet(f"{what}. Start at 2: one seed has no standard deviation, so no interval")
        if got == _seeds_for(sd, half_width, lambda n: 1.96):
            raise NotYet(
                f"{what}. 1.96 is the normal quantile; with few seeds the t quantile is larger (4.30 at "
                "n = 3, 2.45 at n = 7): use scipy.stats.t.ppf(0.975, n - 1)"
            )
        if got == _seeds_for(sd, half_width, lambda n: stats.t.ppf(0.975, n)):
            raise NotYet(f"{what}. The t quantile has n - 1 degrees of freedom, not n: the mean uses up one")
        if got == _seeds_for(sd, half_width, lambda n: stats.t.ppf(0.95, n - 1)):
            raise NotYet(
                f"{what}. 0.95 is the one-sided quantile; a two-sided 95% interval leaves 2.5% on each "
                "side: t.ppf(0.975, n - 1)"
            )
        raise NotYet(f"{what}: the smallest n >= 2 with t(0.975, n - 1) * sd / sqrt(n) <= half_width")
    three = t(3) * 0.03 / 3**0.5
    return (
        f"sd 0.03 needs {_seeds_for(0.03, 0.02, t)} seeds for ±0.02; three seeds give ±{three:.3f}, wider than "
        "the 3.4-point gain the paper claims"
    )


@exercise("nb09-ece", "the expected calibration error with 15 equal-width bins")
def _check_ece(ece) -> str:
    from ..evaluation.shortcuts import expected_calibration_error

    gen = torch.Generator().manual_seed(6)
    p_covid = torch.rand(200, generator=gen, dtype=torch.float64)
    probs = torch.stack([1 - p_covid, p_covid], 1).numpy()
    labels = (torch.rand(200, generator=gen, dtype=torch.float64) < 0.3).long().numpy()
    expected = expected_calibration_error(probs, labels)
    got = float(ece(probs, labels))
    if abs(got - expected) < 1e-9:
        return f"ECE {expected:.3f}: this model says 'sure' more often than it is right"
    raise NotYet(
        f"expected {expected:.4f}, got {got:.4f}: bin the confidence (the larger probability) into 15 "
        "equal bins on [0, 1]; per bin take |accuracy - mean confidence|, weighted by the bin's share"
    )


def _adabn_case():
    """A seeded CNN with two BatchNorm layers and a Dropout between them, whose source statistics and affine
    parameters differ from anything the target batch gives, and a brighter target batch."""
    torch.manual_seed(11)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    )
    with torch.no_grad():
        for bn in (model[1], model[5]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    gen = torch.Generator().manual_seed(11)
    return model.eval(), 0.3 + 0.5 * torch.rand(32, 1, 12, 12, generator=gen)


@exercise("nb09-adabn", "AdaBN: BatchNorm statistics re-estimated on the target images, no weight changed")
def _check_adabn(adabn) -> str:
    from ..evaluation.adapt import adabn as reference_adabn

    model, x = _adabn_case()
    source = copy.deepcopy(model)
    reference = reference_adabn(source, x, batch_size=len(x))  # one pass over the whole target batch
    adapted = adabn(model, x.clone())
    if not isinstance(adapted, nn.Module):
        raise NotYet(f"return the adapted model, got {type(adapted).__name__}")
    if any(m.training for m in adapted.modules()):
        raise NotYet(
            "the model comes back in train mode: BatchNorm would then normalise every test batch with "
            "that batch's own statistics. Return model.eval()"
        )
    changed = [name for name, p in adapted.named_parameters() if not torch.equal(p, source.get_parameter(name))]
    if changed:
        raise NotYet(
            f"the weights {', '.join(changed)} changed: AdaBN only re-estimates the running statistics "
            "(no loss, no optimizer step)"
        )
    layers = [(adapted[i], reference[i], source[i]) for i in (1, 5)]
    right = [
        torch.allclose(a.running_mean, r.running_mean, atol=1e-5)
        and torch.allclose(a.running_var, r.running_var, atol=1e-5)
        for a, r, _ in layers
    ]
    if all(right):
        return "both BatchNorm layers now normalise with the target's statistics; every weight is the source's"
    unmeasured = [torch.equal(a.running_mean, s.running_mean) or not a.running_mean.any() for a, _, s in layers]
    if all(unmeasured):  # the source's statistics, or reset ones that no pass has filled
        raise NotYet(
            "the running statistics were not measured on the target: BatchNorm updates them only in "
            "train mode, so put the BatchNorm layers in train mode for the pass"
        )
    if right[0]:
        raise NotYet(
            "the first BatchNorm is right, the second is not: put only the BatchNorm layers in train "
            "mode. A Dropout in train mode drops units during the pass, and the next BatchNorm then "
            "measures features the eval-mode model never produces"
        )
    raise NotYet(
        "the running statistics are not the target batch's: reset them (bn.reset_running_stats()) and "
        "set bn.momentum = None, so that one pass replaces the source's statistics; with the default "
        "momentum 0.1 they keep 90% of the source's"
    )
