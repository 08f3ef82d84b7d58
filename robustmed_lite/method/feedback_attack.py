"""The method's sample perturbation: L-inf PGD with prediction feedback (an early-stopping rule), and the
training attacks every method draws from (``none``, ``pgd``, ``trades``).

``FeedbackPGD`` stops early per sample and exists for *training* only. Never report robustness with it: an
early-stopped attack is weak by design. Evaluate with ``evaluation.attacks`` (PGD with restarts, APGD, the
ensemble) instead.
"""

from __future__ import annotations

import torch

from ..components import FEEDBACK, register_attack, register_feedback
from ..evaluation.attacks import PGD, _ascend


class FeedbackRule:
    """The early-stopping rule of ``FeedbackPGD``, one object per attack call (``Rule(x, steps, tau)``).

    Register a new rule with ``components.register_feedback(name)`` on a subclass; ``--feedback name`` then
    trains with it. ``FeedbackPGD`` shows the rule each iterate before it is stepped:

    * ``observe(t, wrong, x_rows, rows) -> stop``: iterate ``t`` (0 = the random start) of the samples still
      running (``rows``: their indices in the batch; ``x_rows``: their iterates; ``wrong``: misclassified
      there). Returns a bool tensor over ``rows``: True freezes a sample at this iterate (it leaves later
      forward passes). With ``check_final`` the final iterate of the samples never frozen is observed too,
      as ``t = steps`` (one extra forward pass).
    * ``result(x_last) -> (x_adv, steps_taken)``: ``x_last`` holds each sample's last iterate (the frozen one
      for frozen samples); returns what the attack returns and the gradient steps in it per sample.

    Attributes:
        check_final: Observe the final iterate as well.
    """

    check_final = False

    def __init__(self, x: torch.Tensor, steps: int, tau: int = 0):
        self.x, self.steps, self.tau = x, steps, tau
        self.steps_taken = torch.full((len(x),), steps, device=x.device)

    def observe(self, t: int, wrong: torch.Tensor, x_rows: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def result(self, x_last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x_last, self.steps_taken


class FATRule(FeedbackRule):
    """FAT (Zhang et al., ICML 2020): each sample may be misclassified at ``tau`` iterates; at its (tau+1)-th
    misclassified iterate it is frozen and that iterate is returned. Samples never frozen return the last
    iterate."""

    def __init__(self, x: torch.Tensor, steps: int, tau: int = 0):
        super().__init__(x, steps, tau)
        self.budget = torch.full((len(x),), tau, dtype=torch.long, device=x.device)

    def observe(self, t, wrong, x_rows, rows):
        stop = wrong & (self.budget[rows] == 0)
        self.budget[rows] -= (wrong & ~stop).long()
        self.steps_taken[rows[stop]] = t
        return stop


class LastCorrectRule(FeedbackRule):
    """The last iterate still classified correctly; a sample whose start is already misclassified returns the
    clean ``x`` itself (nothing to preserve; documented choice). The final iterate is checked too."""

    check_final = True

    def __init__(self, x: torch.Tensor, steps: int, tau: int = 0):
        super().__init__(x, steps, tau)
        self.kept = x.clone()  # the last correct iterate, x until one is seen
        self.steps_taken.zero_()

    def observe(self, t, wrong, x_rows, rows):
        self.kept[rows[~wrong]] = x_rows[~wrong]
        self.steps_taken[rows[~wrong]] = t
        return wrong

    def result(self, x_last):
        return self.kept, self.steps_taken


def feedback_rules() -> tuple[str, ...]:
    """The registered feedback rules (``none`` and the built-in ``fat``, ``last_correct``, plus any registered)."""
    return FEEDBACK.names()


class FeedbackPGD(PGD):
    """Early-stopped (prediction-feedback) L-inf PGD, for TRAINING ONLY: never evaluate with it.

    The method's sample-level perturbation: perturb as strongly as possible while the prediction stays
    (nearly) correct. Samples that stop are frozen and leave later forward passes; the result keeps the
    original batch order (FAT's public code reorders the batch; this does not), so the caller's ``x``, any
    augmented view of it and ``y`` stay aligned by index.

    Rules:
        ``"fat"``: FAT (Zhang et al. 2020). Each sample may be misclassified at ``tau`` iterates; at its
            (tau+1)-th misclassified iterate it is frozen and that iterate is returned (tau = 0: the first
            misclassified iterate). Samples never frozen return the last iterate.
        ``"last_correct"``: the last iterate still classified correctly. A sample whose starting point is
            already misclassified returns the clean ``x`` itself (nothing to preserve; documented choice). One
            extra forward pass checks the final iterate.
        ``"none"`` (or None): plain PGD with the same objective.

    After a call, ``last_steps`` (int64, (N,), on x's device) holds the number of gradient steps in each
    returned point (0: the start, or x itself for ``last_correct``).

    Args:
        eps: Radius (pixel scale); CAP uses 0.03 (7.65/255).
        alpha: Step size; CAP uses 2/255.
        steps: Maximum gradient steps.
        loss: ``"kl"`` (TRADES, KL(p(x) || p(x'))) or ``"ce"``.
        rule: A registered feedback rule (``"fat"``, ``"last_correct"``) or ``"none"``/None.
        tau: FAT's number of extra misclassified iterates.
        random_start: Default ``"normal"`` (x + 0.001 N(0, 1), as TRADES, FAT and CAP); see ``PGD``.
        seed: Seed of the random start.
    """

    name = "FeedbackPGD"

    def __init__(
        self,
        eps: float | str = 0.03,
        alpha: float | str = 2 / 255,
        steps: int = 10,
        loss: str = "kl",
        rule: str | None = "last_correct",
        tau: int = 0,
        random_start: bool | str = "normal",
        seed: int | None = None,
    ):
        rule = "none" if rule is None else rule
        if rule not in FEEDBACK:
            raise ValueError(f"rule must be one of {FEEDBACK.names()} or None, got {rule!r}")
        if int(tau) != tau or tau < 0:
            raise ValueError(f"tau must be an integer >= 0, got {tau!r}")
        super().__init__(eps, alpha, steps, "linf", loss, random_start, 1, seed)
        self.rule, self.tau = rule, int(tau)
        self.last_steps: torch.Tensor | None = None

    def _attack(self, problem, gen):
        x_adv = problem.start(self.random_start, gen)
        n, device = len(x_adv), x_adv.device
        rule_class = FEEDBACK[self.rule]
        if rule_class is None:  # "none": plain PGD with the same objective
            self.last_steps = torch.full((n,), self.steps, device=device)
            return _ascend(problem, x_adv, self.steps, self._step())
        rule = rule_class(problem.x, self.steps, self.tau)
        all_rows = torch.arange(n, device=device)
        active = torch.ones(n, dtype=torch.bool, device=device)

        def monitor(t, logits, x_rows, rows):
            rows = all_rows if rows is None else rows
            stop = rule.observe(t, problem.misclassified(logits, rows), x_rows, rows)
            active[rows[stop]] = False
            return None if not stop.any() else ~stop

        x_adv = _ascend(problem, x_adv, self.steps, self._step(), monitor)
        if rule.check_final:
            rows = all_rows[active]  # the final iterate of these is still unchecked
            if len(rows):
                _, logits, _ = problem.loss_grad(x_adv[rows], rows, grad=False)
                rule.observe(self.steps, problem.misclassified(logits, rows), x_adv[rows], rows)
        x_adv, self.last_steps = rule.result(x_adv)
        return x_adv

    def _settings(self) -> dict:
        settings = super()._settings()
        settings["rule"] = self.rule + (f" (tau {self.tau})" if self.rule == "fat" else "")
        return settings

    def describe(self) -> str:
        return super().describe() + " [training only]"


# ----------------------------------------------------------------------- registered feedback rules, attacks
register_feedback("none", None, description="no early stopping: plain PGD")


register_feedback("fat", FATRule)


register_feedback("last_correct", LastCorrectRule)


def _training_pgd(cfg, steps: int, loss: str):
    start = "normal" if loss == "kl" else True  # TRADES' tiny Gaussian start; uniform in the ball for CE
    if cfg.feedback != "none":
        return FeedbackPGD(cfg.eps, cfg.step_size, steps, loss=loss, rule=cfg.feedback, tau=cfg.tau, random_start=start)
    return PGD(cfg.eps, cfg.step_size, steps, loss=loss, random_start=start)


@register_attack("none", description="no sample perturbation")
def _no_attack(cfg, steps: int):
    return None


@register_attack("pgd", description="L-inf PGD on CE (PGD-AT style), uniform random start")
def _pgd_attack(cfg, steps: int):
    return _training_pgd(cfg, steps, "ce")


@register_attack("trades", description="L-inf PGD on KL(p(x) || p(x')) (TRADES style), start x + 0.001 N(0, 1)")
def _trades_attack(cfg, steps: int):
    return _training_pgd(cfg, steps, "kl")
