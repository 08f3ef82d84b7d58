"""Adversarial attacks on image classifiers whose inputs are in [0, 1].

Every attack is configured once and then called as ``attack(model, x, y) -> x_adv``: ``x_adv`` is detached and
has the dtype, device and batch order of ``x``, lies in ``[0, 1]`` and within ``eps`` of ``x``. ``eps`` is on
the pixel scale, a float or a string such as ``"8/255"``; ``describe()`` always quotes it as k/255 (CAP's 0.03
is 7.65/255, a little below the usual 8/255).

Conventions shared by all attacks:

* The model runs in eval mode during the attack (BatchNorm statistics and dropout frozen) and every module's
  train/eval flag is restored afterwards, also when the model raises.
* Gradients are taken with respect to the input only (``torch.autograd.grad``): no parameter ``.grad`` is
  touched and autograd skips the weight-gradient kernels.
* Losses are computed in float32 on ``logits.float()`` and summed over the batch, so a caller's autocast
  (bf16 / fp16) context works: sums keep input gradients of fp16 backward passes away from underflow, and the
  step rules (sign, unit-norm direction) do not depend on the gradient's scale.
* Random starts are drawn from a ``torch.Generator`` seeded with ``seed`` (on the input's device): two calls
  give identical results. With ``seed=None`` the global RNG is used (``torch.manual_seed`` controls it).

``FeedbackPGD`` stops early per sample and exists for *training* only. Never report robustness with it: an
early-stopped attack is weak by design. Evaluate with PGD (restarts), APGD-CE and CW-L-inf instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..common import eval_mode, format_eps, parse_eps

NORMS = ("linf", "l2")
RANDOM_STARTS = (True, False, "uniform", "normal")
TRADES_START_STD = 1e-3  # TRADES / FAT / CAP start the KL attack from x + 0.001 * N(0, 1)


# ------------------------------------------------------------------------------------------- eps and helpers


def check_finite(x: torch.Tensor, what: str = "x", first_index: int = 0) -> None:
    """Raises a ValueError giving the count and first positions of NaN and inf values in ``x``.

    NaN defeats every min/max comparison, so range checks alone let it through: call this wherever images
    enter an attack, a prediction or an evaluation.

    Args:
        x: A tensor (N, ...) of images.
        what: How the message names ``x``.
        first_index: Index of ``x[0]`` in the caller's whole set (for batches), added to the reported positions.
    """
    finite = torch.isfinite(x)
    if bool(finite.all()):
        return
    bad = (~finite).nonzero()
    bad[:, 0] += first_index
    n_nan = int(torch.isnan(x).sum())
    images = bad[:, 0].unique()
    where = ", ".join(str(tuple(i.tolist())) for i in bad[:3])
    raise ValueError(
        f"{what} holds {len(bad)} non-finite values ({n_nan} NaN, {len(bad) - n_nan} inf) in "
        f"{len(images)} image(s) (first images {images[:5].tolist()}; first positions {where}). Fix: "
        "repair or drop those images where they are made (a float image file with NaN/inf pixels, a "
        "division by zero in preprocessing); a NaN image has no prediction"
    )


def apgd_checkpoints(steps: int) -> list[int]:
    """APGD's step-size checkpoints w_j = ceil(p_j * steps), p_0 = 0, p_1 = 0.22,
    p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), while p_j <= 1 (Croce and Hein 2020)."""
    p = [0.0, 0.22]
    while p[-1] + max(p[-1] - p[-2] - 0.03, 0.06) <= 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return sorted({math.ceil(round(q * steps, 6)) for q in p})


def _take(t: torch.Tensor | None, rows: torch.Tensor | None):
    return t if rows is None or t is None else t[rows]


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshapes (N,) to broadcast over (N, ...)."""
    return v.view(-1, *([1] * (like.dim() - 1)))


# Objectives: per-sample values, or their batch sum in one reduction (fewer kernels per step on a GPU).
def _cross_entropy(logits, y, target, per_sample=True):
    return F.cross_entropy(logits, y, reduction="none" if per_sample else "sum")


def _kl(logits, y, target, per_sample=True):
    # TRADES' inner objective KL(p(x) || p(x')); target = p(x), computed once in eval mode.
    if per_sample:
        return F.kl_div(F.log_softmax(logits, 1), target, reduction="none").sum(1)
    return F.kl_div(F.log_softmax(logits, 1), target, reduction="sum")


def _margin(logits, y, target, per_sample=True):
    # Carlini-Wagner margin: best other logit minus the true logit (> 0 means misclassified).
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    return other - true if per_sample else (other - true).sum()


def _targeted_cross_entropy(logits, y, target, per_sample=True):
    # here y holds the target class: ascending this descends the cross-entropy towards it
    return -_cross_entropy(logits, y, target, per_sample)


LOSSES: dict[str, Callable] = {
    "ce": _cross_entropy,
    "kl": _kl,
    "margin": _margin,
    "targeted_ce": _targeted_cross_entropy,
}


class _Problem:
    """One attack problem: the feasible set (eps-ball around x within [0,1]) and the objective to maximise.

    ``rows`` arguments select a subset of the batch (None: all of it), for attacks that freeze samples.
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str, loss: str):
        self.model, self.x, self.y, self.eps, self.norm = model, x, y, eps, norm
        self.objective = LOSSES[loss]
        self.target = None
        if loss == "kl":
            with torch.no_grad():
                self.target = F.softmax(model(x).float(), 1)
        if norm == "linf":  # the box [x - eps, x + eps] within [0, 1], computed once: projection is one clamp
            self.lo = (x - eps).clamp_(min=0)
            self.hi = (x + eps).clamp_(max=1)

    def loss(self, logits: torch.Tensor, rows=None, per_sample: bool = True) -> torch.Tensor:
        """The objective (float32), per sample or summed over the batch."""
        return self.objective(logits, _take(self.y, rows), _take(self.target, rows), per_sample)

    def loss_grad(self, x_adv: torch.Tensor, rows=None, grad: bool = True, per_sample: bool = True):
        """Loss (per sample, or None if not ``per_sample``), logits and (if ``grad``) the input gradient at
        ``x_adv``; one forward (+ backward) pass."""
        if not grad:
            with torch.no_grad():
                logits = self.model(x_adv).float()
            return self.loss(logits, rows), logits, None
        leaf = x_adv.detach().requires_grad_()
        logits = self.model(leaf).float()
        loss = self.loss(logits, rows, per_sample)
        (g,) = torch.autograd.grad(loss.sum() if per_sample else loss, leaf)
        return (loss.detach() if per_sample else None), logits.detach(), g

    def project_(self, x_adv: torch.Tensor, rows=None) -> torch.Tensor:
        """Projects ``x_adv`` (the given rows) onto the feasible set, in place."""
        if self.norm == "linf":
            return x_adv.clamp_(_take(self.lo, rows), _take(self.hi, rows))
        x = _take(self.x, rows)
        delta = x_adv.sub_(x)
        norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
        delta.mul_(_per_sample((self.eps / norms).clamp_(max=1), delta))
        return delta.add_(x).clamp_(0, 1)

    def start(self, kind: bool | str, gen: torch.Generator | None) -> torch.Tensor:
        """A new starting point: x itself, uniform in the eps-ball, or TRADES' x + 0.001 N(0, 1)."""
        x = self.x
        if kind is False:
            return x.clone()
        if kind == "normal":
            noise = TRADES_START_STD * torch.randn(x.shape, generator=gen, device=x.device)
        elif self.norm == "linf":
            noise = self.eps * (2 * torch.rand(x.shape, generator=gen, device=x.device) - 1)
        else:  # a random direction with a radius uniform in [0, eps]
            noise = torch.randn(x.shape, generator=gen, device=x.device)
            radius = self.eps * torch.rand(len(x), generator=gen, device=x.device)
            noise *= _per_sample(radius / noise.flatten(1).norm(dim=1).clamp_min(1e-12), noise)
        return self.project_(x + noise.to(x.dtype))

    def misclassified(self, logits: torch.Tensor, rows=None) -> torch.Tensor:
        return logits.argmax(1) != _take(self.y, rows)


def _sign_step(alpha: float):
    def step(x_adv, grad, rows):
        x_adv.add_(grad.sign_(), alpha=alpha)

    return step


def _l2_step(alpha: float):
    def step(x_adv, grad, rows):
        norms = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
        x_adv.add_(grad.div_(_per_sample(norms, grad)), alpha=alpha)

    return step


def _ascend(
    problem: _Problem, x_adv: torch.Tensor, steps: int, step: Callable, monitor: Callable | None = None
) -> torch.Tensor:
    """The iterative core of PGD, MIM, CW and FeedbackPGD: ``steps`` times, gradient, step rule, projection.

    Args:
        problem: The feasible set and objective.
        x_adv: Starting point, updated in place (never the caller's x).
        steps: Gradient steps.
        step: ``step(x_rows, grad_rows, rows)`` updates ``x_rows`` in place.
        monitor: Optional ``monitor(t, logits, x_rows, rows) -> keep`` seeing iterate t of the active rows
            before it is stepped; ``keep`` (bool over those rows, or None for all) says which rows go on. Frozen
            rows drop out of later forward passes, so early stopping saves compute.

    Returns:
        ``x_adv``.
    """
    rows = None  # the active samples (None: all, and x_adv is stepped in place without gathering)
    for t in range(steps):
        x_rows = x_adv if rows is None else x_adv[rows]
        _, logits, grad = problem.loss_grad(x_rows, rows, per_sample=False)
        keep = None if monitor is None else monitor(t, logits, x_rows, rows)
        if keep is not None:
            rows = torch.arange(len(x_adv), device=x_adv.device) if rows is None else rows
            x_rows, grad, rows = x_rows[keep], grad[keep], rows[keep]
            if len(rows) == 0:
                break
        with torch.no_grad():
            step(x_rows, grad, rows)
            problem.project_(x_rows, rows)
            if rows is not None:
                x_adv[rows] = x_rows
    return x_adv


# -------------------------------------------------------------------------------------------------- attacks


class Attack:
    """Base class: checks inputs, runs the attack in eval mode with gradients on, returns a detached x_adv.

    Subclasses implement ``_attack(problem, gen)`` and pass their ``steps``, ``norm`` and ``loss`` here.

    Args:
        eps: Radius on the pixel scale, a float or a string such as ``"8/255"``.
        norm: ``"linf"`` or ``"l2"``.
        loss: A key of ``LOSSES``: ``"ce"``, ``"kl"`` (TRADES) or ``"margin"`` (CW).
        steps: Gradient steps (model forward+backward passes) per restart.
        restarts: Independent runs; per sample a misclassified result beats a correct one, then the higher
            loss wins.
        seed: Seed of the random start; None uses the global RNG.
    """

    name = "attack"

    def __init__(
        self,
        eps: float | str,
        *,
        norm: str = "linf",
        loss: str = "ce",
        steps: int = 1,
        restarts: int = 1,
        seed: int | None = None,
    ):
        self.eps = parse_eps(eps)
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if norm == "linf" and self.eps > 1:
            raise ValueError(
                f"eps={self.eps:g} is larger than the whole [0,1] pixel range: eps is on the pixel "
                f"scale, e.g. '8/255' rather than 8"
            )
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {sorted(LOSSES)}, got {loss!r}")
        if int(steps) != steps or steps < 1 or int(restarts) != restarts or restarts < 1:
            raise ValueError(f"steps and restarts must be integers >= 1, got steps={steps}, restarts={restarts}")
        self.norm, self.loss, self.steps, self.restarts, self.seed = norm, loss, int(steps), int(restarts), seed

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Adversarial examples for ``(x, y)``: same shape, dtype, device and order as ``x``.

        Raises:
            ValueError: ``x`` outside [0, 1], non-finite (NaN, inf) or not a float batch, or ``y`` not one label
                per image.
        """
        y = _check_inputs(x, y)
        gen = None if self.seed is None else torch.Generator(device=x.device).manual_seed(self.seed)
        with eval_mode(model), torch.enable_grad():
            problem = _Problem(model, x.detach(), y, self.eps, self.norm, self.loss)
            x_adv = self._attack(problem, gen)
            for _ in range(self.restarts - 1):
                x_adv = _better_of(problem, x_adv, self._attack(problem, gen))
        return x_adv.detach()

    def _attack(self, problem: _Problem, gen: torch.Generator | None) -> torch.Tensor:
        raise NotImplementedError

    @property
    def eps_str(self) -> str:
        """eps as k/255 for L-inf, plain for L2."""
        return format_eps(self.eps) if self.norm == "linf" else f"{self.eps:g}"

    def _eps_text(self) -> str:
        text = f"eps {self.eps_str}"
        if self.norm == "linf" and "." in text:  # not a whole k/255: also give the value as written
            text += f" (= {self.eps:g})"
        return text

    def _settings(self) -> dict:
        """What ``describe`` lists after the radius (each subclass adds its own)."""
        return {}

    @property
    def short_name(self) -> str:
        """The name tables use, e.g. ``PGD-10``."""
        return self.describe().split(" (")[0]

    def describe(self) -> str:
        """One readable line, e.g. ``PGD-10 (L-inf, ce), eps 8/255, step 2/255, random start``."""
        norm = "L-inf" if self.norm == "linf" else "L2"
        parts = [f"{self.name} ({norm}, {self.loss})", self._eps_text()]
        parts += [f"{k} {v}" for k, v in self._settings().items()]
        if self.restarts > 1:
            parts.append(f"{self.restarts} restarts")
        return ", ".join(parts)

    def __repr__(self) -> str:
        return f"{type(self).__name__}: {self.describe()}"


def _check_inputs(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise ValueError(
            f"x must be a float tensor (N, ...) of images in [0, 1], got "
            f"{getattr(x, 'dtype', type(x))} with shape {tuple(getattr(x, 'shape', ()))}"
        )
    if x.numel():
        lo, hi = torch.aminmax(x.detach())
        if not (lo >= 0 and hi <= 1):  # written so that NaN (false in every comparison) lands here too
            check_finite(x.detach(), "x")
            raise ValueError(
                f"x must lie in [0, 1] (normalisation belongs inside the model), got values in "
                f"[{lo.item():.3g}, {hi.item():.3g}]"
            )
    y = torch.as_tensor(y, device=x.device)
    if y.shape != (len(x),) or y.is_floating_point():
        raise ValueError(
            f"y must hold one integer class label per image, shape ({len(x)},), got "
            f"{y.dtype} with shape {tuple(y.shape)}"
        )
    return y.long()


def _better_of(problem: _Problem, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per sample, the misclassified one of two candidates, else the one with the higher loss (one forward each)."""
    with torch.no_grad():
        la, logits_a, _ = problem.loss_grad(a, grad=False)
        lb, logits_b, _ = problem.loss_grad(b, grad=False)
        wrong_a, wrong_b = problem.misclassified(logits_a), problem.misclassified(logits_b)
        take_b = (wrong_b & ~wrong_a) | ((wrong_b == wrong_a) & (lb > la))
        return torch.where(_per_sample(take_b, a), b, a)


class PGD(Attack):
    """Projected gradient descent (Madry et al. 2018): L-inf or L2, CE, KL (TRADES) or margin objective.

    Args:
        eps: Radius (pixel scale, float or ``"8/255"``).
        alpha: Step size; default eps/4 (2/255 at eps 8/255).
        steps: Gradient steps.
        norm: ``"linf"`` (sign steps) or ``"l2"`` (unit-norm gradient steps).
        loss: ``"ce"``, ``"kl"`` (KL(p(x) || p(x')), which needs a random start: its gradient is zero at x) or
            ``"margin"``.
        random_start: True or ``"uniform"`` (uniform in the eps-ball), ``"normal"`` (x + 0.001 N(0, 1), as
            TRADES), or False (start at x).
        restarts: Independent random starts; per sample a misclassified result wins, then the higher loss.
        seed: Seed of the random start (None: global RNG).
    """

    name = "PGD"

    def __init__(
        self,
        eps: float | str = 8 / 255,
        alpha: float | str | None = None,
        steps: int = 10,
        norm: str = "linf",
        loss: str = "ce",
        random_start: bool | str = True,
        restarts: int = 1,
        seed: int | None = None,
    ):
        super().__init__(eps, norm=norm, loss=loss, steps=steps, restarts=restarts, seed=seed)
        self.alpha = self.eps / 4 if alpha is None else parse_eps(alpha)
        if random_start not in RANDOM_STARTS:
            raise ValueError(f"random_start must be one of {RANDOM_STARTS}, got {random_start!r}")
        if loss == "kl" and random_start is False:
            raise ValueError("loss='kl' needs a random start: KL(p(x) || p(x')) has zero gradient at x' = x")
        self.random_start = random_start

    def _step(self) -> Callable:
        return _sign_step(self.alpha) if self.norm == "linf" else _l2_step(self.alpha)

    def _attack(self, problem, gen):
        return _ascend(problem, problem.start(self.random_start, gen), self.steps, self._step())

    def _settings(self) -> dict:
        alpha = format_eps(self.alpha) if self.norm == "linf" else f"{self.alpha:g}"
        start = {True: "uniform", False: "none"}.get(self.random_start, self.random_start)
        return {"step": alpha, "random start": start}

    def describe(self) -> str:
        return super().describe().replace(f"{self.name} (", f"{self.name}-{self.steps} (", 1)


class FGSM(PGD):
    """Fast gradient sign method (Goodfellow et al. 2015): one signed step of size eps from x."""

    name = "FGSM"

    def __init__(self, eps: float | str = 8 / 255, loss: str = "ce"):
        super().__init__(eps, alpha=eps, steps=1, loss=loss, random_start=False)

    def _settings(self) -> dict:
        return {}

    def describe(self) -> str:
        return Attack.describe(self)


class RFGSM(Attack):
    """R+FGSM (Tramer et al. 2018): a random signed step of size alpha, then a gradient sign step of eps - alpha.

    Args:
        eps: Radius (L-inf, pixel scale).
        alpha: Size of the random step; default eps/2.
        seed: Seed of the random step.
    """

    name = "R-FGSM"

    def __init__(self, eps: float | str = 8 / 255, alpha: float | str | None = None, seed: int | None = None):
        super().__init__(eps, seed=seed)
        self.alpha = self.eps / 2 if alpha is None else parse_eps(alpha)
        if self.alpha > self.eps:
            raise ValueError(f"alpha ({self.alpha:g}) must not exceed eps ({self.eps:g})")

    def _attack(self, problem, gen):
        x = problem.x
        noise = torch.randn(x.shape, generator=gen, device=x.device).sign_()
        start = problem.project_(x + self.alpha * noise.to(x.dtype))
        return _ascend(problem, start, 1, _sign_step(self.eps - self.alpha))

    def _settings(self) -> dict:
        return {"random step": format_eps(self.alpha)}


class RandomNoise(Attack):
    """A control, not an attack: each pixel moves by +eps or -eps at random (a corner of the L-inf ball: the
    largest random change of that norm), then back into [0, 1]. Beside an attack of the same eps it shows what
    the attack's *direction* adds to its size.

    Args:
        eps: Radius (L-inf, pixel scale).
        seed: Seed of the signs.
    """

    name = "random noise"

    def __init__(self, eps: float | str = 8 / 255, seed: int | None = 0):
        super().__init__(eps, seed=seed)

    def _attack(self, problem, gen):
        x = problem.x
        signs = (2 * torch.randint(0, 2, x.shape, generator=gen, device=x.device) - 1).to(x.dtype)
        return problem.project_(x + self.eps * signs)


class TargetedPGD(PGD):
    """PGD that pushes every image towards one class (descends the cross-entropy of ``target_class``) instead of
    away from its own. Images already labelled ``target_class`` are returned unchanged: success is measured on
    the others (the share now predicted as the target).

    Args:
        eps: Radius (L-inf, pixel scale).
        target_class: The class the attack aims for (1 = COVID).
        alpha: Step size; default eps/4.
        steps: Iterations.
        seed: Seed of the random start.
    """

    name = "targeted PGD"

    def __init__(
        self,
        eps: float | str = 8 / 255,
        target_class: int = 1,
        alpha: float | str | None = None,
        steps: int = 10,
        seed: int | None = None,
    ):
        super().__init__(eps, alpha=alpha, steps=steps, loss="targeted_ce", seed=seed)
        self.target_class = int(target_class)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        y = _check_inputs(x, y)
        x_adv = x.detach().clone()
        others = y != self.target_class
        if others.any():
            x_adv[others] = super().__call__(model, x[others], torch.full_like(y[others], self.target_class))
        return x_adv

    def _settings(self) -> dict:
        return {"target class": self.target_class, **super()._settings()}


class MIM(Attack):
    """Momentum iterative FGSM (Dong et al. 2018): sign steps along an accumulated L1-normalised gradient.

    Args:
        eps: Radius (L-inf, pixel scale).
        alpha: Step size; default eps / steps.
        steps: Gradient steps.
        decay: Momentum factor mu.
    """

    name = "MIM"

    def __init__(
        self, eps: float | str = 8 / 255, alpha: float | str | None = None, steps: int = 10, decay: float = 1.0
    ):
        super().__init__(eps, steps=steps)
        self.alpha = self.eps / self.steps if alpha is None else parse_eps(alpha)
        self.decay = decay

    def _attack(self, problem, gen):
        momentum = torch.zeros_like(problem.x)

        def step(x_adv, grad, rows):
            grad.div_(_per_sample(grad.flatten(1).abs().sum(1).clamp_min(1e-12), grad))
            momentum.mul_(self.decay).add_(grad)
            x_adv.add_(momentum.sign(), alpha=self.alpha)

        return _ascend(problem, problem.x.clone(), self.steps, step)

    def _settings(self) -> dict:
        return {"steps": self.steps, "step": format_eps(self.alpha), "decay": self.decay}


class CWLinf(PGD):
    """CW-L-inf: L-inf PGD on the Carlini-Wagner margin loss (max other logit - true logit).

    Args:
        eps: Radius (pixel scale).
        alpha: Step size; default eps/4.
        steps: Gradient steps.
        random_start: As in ``PGD``.
        restarts: Independent random starts.
        seed: Seed of the random start.
    """

    name = "CW"

    def __init__(
        self,
        eps: float | str = 8 / 255,
        alpha: float | str | None = None,
        steps: int = 20,
        random_start: bool | str = True,
        restarts: int = 1,
        seed: int | None = None,
    ):
        super().__init__(eps, alpha, steps, "linf", "margin", random_start, restarts, seed)


class APGD(Attack):
    """APGD (Croce and Hein 2020): L-inf PGD with momentum and an adaptive, budget-aware step size.

    Starts with step size 2*eps and momentum 0.75. At the checkpoints of ``apgd_checkpoints(steps)`` a sample's
    step size is halved, and it restarts from its best point, when fewer than ``rho`` of the steps since the
    last checkpoint increased its loss, or when its step size and best loss are both unchanged since then.
    Per sample, the highest-loss iterate is returned, or, if that one is still classified correctly while
    another iterate was not, the last misclassified iterate. The last iterate costs
    a forward pass only, so ``steps`` gradient evaluations plus one forward in all.

    Args:
        eps: Radius (L-inf, pixel scale).
        steps: Iterations (AutoAttack uses 100).
        loss: ``"ce"`` (APGD-CE) or ``"margin"``.
        rho: Fraction of loss-increasing steps below which the step size is halved.
        momentum: Weight alpha of the new step; 1 - alpha goes to the previous one.
        random_start: Start uniformly in the eps-ball (True) or at x (False).
        restarts: Independent runs.
        seed: Seed of the random start.
    """

    name = "APGD"

    def __init__(
        self,
        eps: float | str = 8 / 255,
        steps: int = 100,
        loss: str = "ce",
        rho: float = 0.75,
        momentum: float = 0.75,
        random_start: bool = True,
        restarts: int = 1,
        seed: int | None = None,
    ):
        if loss not in ("ce", "margin"):
            raise ValueError(f"APGD supports loss='ce' or 'margin', got {loss!r}")
        super().__init__(eps, loss=loss, steps=steps, restarts=restarts, seed=seed)
        self.rho, self.momentum, self.random_start = rho, momentum, bool(random_start)

    def _attack(self, problem, gen):
        x_k = problem.start(self.random_start, gen)
        loss_k, logits, grad_k = problem.loss_grad(x_k)
        # Per-sample state is updated with torch.where, not boolean indexing: no host syncs on a GPU.
        x_best, loss_best, grad_best = x_k, loss_k, grad_k
        best_wrong = problem.misclassified(logits)
        x_wrong, found = x_k, best_wrong  # the last misclassified iterate, if any
        x_prev = x_k
        eta = torch.full((len(x_k),), 2 * self.eps, dtype=x_k.dtype, device=x_k.device)
        increases = torch.zeros_like(loss_k)
        loss_best_at_check, reduced_at_check = loss_best, torch.zeros_like(found)
        checkpoints, last_check = apgd_checkpoints(self.steps), 0
        for k in range(1, self.steps + 1):
            with torch.no_grad():
                z = problem.project_(x_k + _per_sample(eta, x_k) * grad_k.sign())
                a = 1.0 if k == 1 else self.momentum
                x_new = problem.project_(x_k + a * (z - x_k) + (1 - a) * (x_k - x_prev))
            loss_new, logits, grad_new = problem.loss_grad(x_new, grad=k < self.steps)
            with torch.no_grad():
                wrong = problem.misclassified(logits)
                x_wrong = torch.where(_per_sample(wrong, x_new), x_new, x_wrong)
                found = found | wrong
                increases += loss_new > loss_k
                better = loss_new > loss_best
                x_best = torch.where(_per_sample(better, x_new), x_new, x_best)
                loss_best = torch.where(better, loss_new, loss_best)
                best_wrong = torch.where(better, wrong, best_wrong)
                if grad_new is not None:
                    grad_best = torch.where(_per_sample(better, grad_new), grad_new, grad_best)
                x_prev, x_k, loss_k, grad_k = x_k, x_new, loss_new, grad_new
                if k in checkpoints and k < self.steps:
                    few_increases = increases < self.rho * (k - last_check)
                    stalled = ~reduced_at_check & (loss_best <= loss_best_at_check)
                    reduce = few_increases | stalled
                    eta = torch.where(reduce, eta / 2, eta)
                    # Restart from the best point without momentum (x_prev = x_best).
                    sel = _per_sample(reduce, x_k)
                    x_k = torch.where(sel, x_best, x_k)
                    x_prev = torch.where(sel, x_best, x_prev)
                    grad_k = torch.where(sel, grad_best, grad_k)
                    loss_k = torch.where(reduce, loss_best, loss_k)
                    reduced_at_check, loss_best_at_check = reduce, loss_best
                    increases.zero_()
                    last_check = k
        # The highest-loss point, unless it is still correct while another iterate was misclassified.
        return torch.where(_per_sample(found & ~best_wrong, x_best), x_wrong, x_best)

    def _settings(self) -> dict:
        return {"steps": self.steps, "rho": self.rho, "momentum": self.momentum}

    def describe(self) -> str:
        return super().describe().replace("APGD (", f"APGD-{self.loss.upper()}-{self.steps} (", 1)
