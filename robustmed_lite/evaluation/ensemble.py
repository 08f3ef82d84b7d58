"""The strongest evaluation the package runs: an AutoAttack-style ensemble that works for two classes.

AutoAttack's standard suite (Croce and Hein, ICML 2020) is APGD-CE, APGD-T (targeted, DLR loss), FAB-T and
Square. Two of those break on a binary task such as COVID vs non-COVID:

* the DLR loss divides by ``z_pi1 - z_pi3``, the gap between the largest and the *third* largest logit, which
  does not exist with two classes;
* a targeted attack has one possible target, the other class, so it is the untargeted attack again.

So the binary ensemble keeps the four *kinds* of attack and swaps the parts that need a third class:

=================  ==================================================================================
APGD-CE            the package's ``APGD`` on cross-entropy (gradient, adaptive step)
APGD-margin        the package's ``APGD`` on the Carlini-Wagner margin ``max_{j!=y} z_j - z_y``, DLR's
                   numerator: a second, scale-free-in-sign loss for models whose CE saturates
FAB                torchattacks' untargeted FAB (minimal-norm, geometry-based: finds points near the
                   decision boundary that gradient ascent on a loss can miss)
Square             torchattacks' Square attack (random search, no gradients: it catches gradient masking)
=================  ==================================================================================

FAB and Square come from torchattacks (a maintained port of AutoAttack's components, ``pip install --no-deps
torchattacks``) instead of new code here. As in AutoAttack, the attacks run one after another and each sees only
the samples that every earlier attack failed on; every attack runs its full budget on the samples it gets (no
early stopping inside an attack). A sample counts as robust only if no member fools it, so the ensemble is at
least as strong as each member on the same inputs (``reproduce`` checks that on one model and records it).
"""

from __future__ import annotations

import torch
from torch import nn

from ..common import eval_mode, format_eps, parse_eps
from .attacks import APGD, Attack, _check_inputs

TORCHATTACKS_HELP = (
    "the FAB and Square members of the attack ensemble come from torchattacks: pip install "
    "--no-deps 'torchattacks>=3.5' (--no-deps: it pins an old requests)"
)


class TorchattacksAttack(Attack):
    """A torchattacks attack behind the package's interface: ``attack(model, x, y) -> x_adv``.

    The model runs in eval mode and every module's mode is restored; torchattacks' habit of re-seeding the
    global RNG is contained (``torch.random.fork_rng``), so evaluating never changes later random draws. The
    result is checked to lie in [0, 1] and within eps of ``x``.

    Args:
        kind: ``"FAB"`` or ``"Square"`` (any L-inf torchattacks class taking ``eps`` and ``seed`` works).
        eps: Radius (pixel scale).
        steps: Iterations (FAB) or queries (Square), reported as ``steps``.
        seed: Seed passed to torchattacks.
        **kwargs: Further arguments of the torchattacks class.
    """

    def __init__(self, kind: str, eps: float | str, steps: int, seed: int = 0, **kwargs):
        super().__init__(eps, steps=steps, seed=seed)
        self.kind, self.kwargs = kind, kwargs
        self.name = kind

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        try:
            import torchattacks
        except ImportError as err:
            raise ImportError(TORCHATTACKS_HELP) from err
        y = _check_inputs(x, y)
        budget = {"FAB": "steps", "Square": "n_queries"}.get(self.kind, "steps")
        devices = [x.device] if x.device.type == "cuda" else []
        with eval_mode(model), torch.random.fork_rng(devices=devices), torch.enable_grad():
            attack = getattr(torchattacks, self.kind)(
                model, eps=self.eps, seed=self.seed, **{budget: self.steps}, **self.kwargs
            )
            x_adv = attack(x.detach(), y).detach().to(x.dtype)
        if x_adv.shape != x.shape or (x_adv - x).abs().amax() > self.eps + 1e-5 or x_adv.min() < 0 or x_adv.max() > 1:
            raise RuntimeError(f"torchattacks {self.kind} returned points outside the eps-ball or [0, 1]")
        return x_adv

    def _settings(self) -> dict:
        return {"steps" if self.kind != "Square" else "queries": self.steps}

    def describe(self) -> str:
        return super().describe().replace(f"{self.name} (", f"{self.name}-{self.steps} (", 1)


class Ensemble(Attack):
    """Worst case over several attacks, AutoAttack's way: members run in order on the samples still classified
    correctly; per sample the point with the lowest true-class margin is returned (a fooling one if any member
    fooled it).

    Args:
        members: Attacks ``(model, x, y) -> x_adv`` with ``eps``, ``norm`` and ``steps``, all at one radius.
        name: Name in tables.
    """

    def __init__(self, members: list[Attack], name: str = "ensemble"):
        if not members:
            raise ValueError("an ensemble needs at least one attack")
        eps = {round(m.eps, 9) for m in members}
        if len(eps) != 1 or {m.norm for m in members} != {"linf"}:
            raise ValueError(f"ensemble members must share one L-inf radius, got {sorted(eps)}")
        super().__init__(members[0].eps, steps=sum(m.steps for m in members))
        self.members, self.name = list(members), name

    @staticmethod
    def _margin(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """True-class logit minus the best other logit (< 0: misclassified)."""
        with torch.no_grad():
            logits = model(x).float()
        true = logits.gather(1, y[:, None]).squeeze(1)
        return true - logits.scatter(1, y[:, None], float("-inf")).amax(1)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        y = _check_inputs(x, y)
        with eval_mode(model):
            x_adv = x.detach().clone()
            best = self._margin(model, x_adv, y)
            for member in self.members:
                todo = (best >= 0).nonzero().squeeze(1)  # not fooled by any earlier member
                if len(todo) == 0:
                    break
                candidate = member(model, x[todo], y[todo])
                margin = self._margin(model, candidate, y[todo])
                better = margin < best[todo]
                x_adv[todo[better]] = candidate[better]
                best[todo[better]] = margin[better]
        return x_adv

    def describe(self) -> str:
        return (
            f"{self.name} [{' + '.join(m.short_name for m in self.members)}] (L-inf), eps {format_eps(self.eps)}, "
            "members in order on the still-robust samples"
        )

    @property
    def short_name(self) -> str:
        return self.name


def binary_ensemble(
    eps: float | str, apgd_steps: int = 100, fab_steps: int = 100, square_queries: int = 5000, seed: int = 0
) -> Ensemble:
    """APGD-CE, APGD-margin, FAB and Square at one radius (AutoAttack's budgets by default).

    Args:
        eps: L-inf radius (pixel scale, e.g. ``"8/255"``).
        apgd_steps: Iterations of each APGD.
        fab_steps: FAB iterations.
        square_queries: Square's query budget per sample.
        seed: Seed of every member.
    """
    eps = parse_eps(eps)
    return Ensemble(
        [
            APGD(eps, steps=apgd_steps, loss="ce", seed=seed),
            APGD(eps, steps=apgd_steps, loss="margin", seed=seed),
            TorchattacksAttack("FAB", eps, fab_steps, seed=seed, n_classes=2),
            TorchattacksAttack("Square", eps, square_queries, seed=seed),
        ]
    )
