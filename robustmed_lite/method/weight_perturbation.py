"""Weight perturbation: AWP (Wu et al., NeurIPS 2020) and the method's proxy attention noise.

Each batch a proxy copy of the model (weights and BatchNorm buffers) takes one optimizer step that *increases*
a loss; the per-layer direction it moved, rescaled to the layer's own norm, is the weight noise::

    d_l = ||w_l|| / ||dw_l|| * dw_l,   dw = proxy - model,   w_l <- w_l + gamma * d_l

The model computes its training loss at the perturbed weights; after its optimizer step the perturbation is
taken out again. Two flavours (registered in ``components.WEIGHT_NOISE``; add more with
``register_weight_noise``):

* ``awp``: proxy loss -(CE(x) + beta * KL(p(x) || p(x_adv))), noise on every weight matrix (TRADES-AWP).
* ``proxy_attention`` (CAP and the method): proxy loss -CE(x) + beta * KL(p(x) || p(x_aug)), adversarial for the
  clean loss and consistent between the image and its lung-prior view, noise only on attention weights.

The proxy's optimizer (``TrainConfig.proxy_optimizer``):

* ``adamw`` (CAP's code, the default of ``cap`` and ``robustmed``): one AdamW for the whole run, at the model's
  *initial* learning rate (CAP passes ``args.lr`` and never schedules the proxy) with weight decay 1e-4, whose
  moments are kept across batches. The proxy's weights are reloaded from the model every batch, but its
  optimizer state is not: the noise direction is the Adam-normalised running step, m_hat / (sqrt(v_hat) + eps)
  (plus the decay term), so it carries the history of earlier batches' proxy gradients. Its state is part of the
  trainer's ``last.pt``, so that a resumed run is bitwise the uninterrupted one.
* ``sgd`` (AWP's code, the default of ``awp``): plain SGD without momentum or weight decay whose state is
  cleared after every step: each batch's noise depends only on the current weights and batch.

For both, the learning rate cancels in the rescaling (the step is lr times a direction that does not depend on
lr), up to float rounding and the decay term. CAP's AdamW runs over all of the proxy's parameters; Adam's update
is elementwise and the noise reads only the perturbed weights, so here only they take a gradient and a step:
the same noise (``tests/test_weight_perturbation.py`` checks it), without the backward pass below the first perturbed
layer.

Restoring is exact: the perturbed tensors' original values are kept, and after the model's optimizer step each
becomes ``original + (stepped - perturbed)``, i.e. the optimizer's update applied to the unperturbed weights.
With a zero learning rate that is bitwise the original. ``with noise.applied(direction, gamma):`` perturbs and
restores around a block (for looking at a model under its noise).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..components import WEIGHT_NOISE, register_weight_noise
from ..models import attention_weights
from .objectives import kl_per_sample

PROXY_OPTIMIZERS = ("adamw", "sgd")
_EPS = 1e-20


def weight_noise_kinds() -> tuple[str, ...]:
    """The registered weight noises (``none``, ``awp``, ``proxy_attention`` and any registered)."""
    return WEIGHT_NOISE.names()


def perturbed_names(model: nn.Module, kind: str) -> list[str]:
    """Names of the parameters a kind of weight noise touches."""
    if kind == "awp":
        return [n for n, p in model.named_parameters() if p.dim() > 1 and n.endswith("weight")]
    if kind == "proxy_attention":
        names = list(attention_weights(model))
        if not names:
            raise ValueError(
                "proxy_attention weight noise needs a model with attention weights (visformer_tiny, "
                "deit_tiny, vit_tiny, tiny_visformer); use weight_noise='awp' for CNNs"
            )
        return names
    raise ValueError(f"unknown weight noise {kind!r}: use awp or proxy_attention")


def _rescale(direction: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The direction scaled to the weight's norm: ||w|| / ||d|| * d."""
    return weight.norm() / (direction.norm() + _EPS) * direction


def relative_diff(model: nn.Module, proxy: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Per-layer direction from model to proxy, rescaled to each layer's weight norm."""
    proxy_params = dict(proxy.named_parameters())
    diff = {}
    for name, w in model.named_parameters():
        if name in names:
            diff[name] = _rescale(proxy_params[name].detach() - w.detach(), w.detach())
    return diff


def random_direction(
    sizes: Mapping[str, torch.Tensor], seed: int | None = 0, generator: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """A random weight direction with given per-layer sizes: r_l ~ N(0, I), rescaled to ||sizes[l]||.

    The draws are made on the CPU in float32, layer by layer in the order of ``sizes`` (so the same on any
    device), then moved to each reference tensor's device and dtype.

    Args:
        sizes: Layer name -> a tensor of the layer's shape whose norm is the wanted size: the weights themselves
            (``d_l`` with ``||d_l|| = ||w_l||``, as ``weight_sensitivity``), or a noise direction (a random
            direction as large as it, per layer).
        seed: Seed of a fresh generator (ignored when ``generator`` is given).
        generator: Draw from this generator instead (successive calls continue its stream).

    Returns:
        Layer name -> direction, shaped like ``sizes[name]``.
    """
    gen = generator if generator is not None else torch.Generator().manual_seed(0 if seed is None else seed)
    out = {}
    for name, ref in sizes.items():
        r = torch.randn(ref.shape, generator=gen, dtype=torch.float32)
        out[name] = (ref.detach().float().norm().cpu() / (r.norm() + _EPS) * r).to(ref.device, ref.dtype)
    return out


class WeightPerturbation:
    """One-step proxy adversary on the weights.

    Args:
        model: The model being trained.
        kind: 'awp' or 'proxy_attention'.
        gamma: Noise scale relative to each layer's norm.
        beta: Weight of the KL term in the proxy loss.
        proxy_lr: Learning rate of the proxy's step (it cancels in the rescaling; see the module docstring).
        optimizer: 'sgd' (stateless, AWP's) or 'adamw' (moments kept across batches, CAP's).
        weight_decay: The AdamW proxy's weight decay (CAP: 1e-4); the SGD proxy has none.

    Attributes:
        gradient_sync: None, or a function that the proxy's gradients (a list of parameters) go through before
            its step. A distributed trainer sets ``distributed.average_gradients``: the proxy then steps on the
            global batch, and its noise and AdamW moments are the same on every rank.
    """

    def __init__(
        self,
        model: nn.Module,
        kind: str,
        gamma: float,
        beta: float,
        proxy_lr: float = 0.01,
        optimizer: str = "sgd",
        weight_decay: float = 1e-4,
    ):
        if optimizer not in PROXY_OPTIMIZERS:
            raise ValueError(f"proxy optimizer must be one of {PROXY_OPTIMIZERS}, got {optimizer!r}")
        self.model, self.kind, self.gamma, self.beta = model, kind, gamma, beta
        self.optimizer_name = optimizer
        self.names = perturbed_names(model, kind)
        self.proxy = copy.deepcopy(model)
        # Only the perturbed weights' step matters, so only they take gradients: the proxy's backward pass then
        # skips every other weight gradient, and (for attention noise) every layer below the first attention block.
        self.stepped = []
        for name, p in self.proxy.named_parameters():
            p.requires_grad_(name in self.names)
            if name in self.names:
                self.stepped.append(p)
        if optimizer == "adamw":
            self.proxy_optim = torch.optim.AdamW(self.stepped, lr=proxy_lr, weight_decay=weight_decay)
        else:
            self.proxy_optim = torch.optim.SGD(self.stepped, lr=proxy_lr, momentum=0.0, weight_decay=0.0)
        self.gradient_sync = None
        self._saved: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_config(cls, model: nn.Module, cfg, kind: str | None = None) -> WeightPerturbation:
        """The weight noise a resolved ``TrainConfig`` trains with (``kind`` default: ``cfg.weight_noise``)."""
        return cls(
            model,
            kind or cfg.weight_noise,
            cfg.gamma,
            cfg.beta,
            cfg.proxy_lr,
            cfg.proxy_optimizer,
            cfg.proxy_weight_decay,
        )

    @property
    def stateful(self) -> bool:
        """Whether the proxy's optimizer keeps state from batch to batch (AdamW)."""
        return self.optimizer_name == "adamw"

    def proxy_loss(self, x: torch.Tensor, x_other: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss the proxy *minimises* (the negative of what it attacks)."""
        logits = self.proxy(x)
        kl = kl_per_sample(logits.float(), self.proxy(x_other).float()).mean()
        ce = F.cross_entropy(logits.float(), y)
        if self.kind == "awp":
            return -(ce + self.beta * kl)
        return -ce + self.beta * kl

    def compute(self, x: torch.Tensor, x_other: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Reloads the proxy, takes its step, and returns the relative noise directions d_l.

        Args:
            x: Clean batch.
            x_other: x_adv for 'awp', x_aug for 'proxy_attention'.
            y: Labels.
        """
        self.proxy.load_state_dict(self.model.state_dict())  # weights and BatchNorm buffers, not the optimizer
        self.proxy.train()
        loss = self.proxy_loss(x, x_other, y)
        self.proxy_optim.zero_grad(set_to_none=True)
        loss.backward()
        if self.gradient_sync is not None:
            self.gradient_sync(self.stepped)
        self.proxy_optim.step()
        if not self.stateful:
            self.proxy_optim.state.clear()
        return relative_diff(self.model, self.proxy, self.names)

    def compute_batch(self, batch) -> dict[str, torch.Tensor]:
        """``compute`` on a ``components.Batch``: x_adv for 'awp', x_aug for 'proxy_attention'."""
        return self.compute(batch.x, batch.x_adv if self.kind == "awp" else batch.x_aug, batch.y)

    @torch.no_grad()
    def perturb(self, diff: dict[str, torch.Tensor], gamma: float | None = None) -> None:
        """w <- w + gamma * d (default gamma: ``self.gamma``), remembering the original and perturbed values."""
        if self._saved:
            raise RuntimeError("perturb() called twice without restore()")
        gamma = self.gamma if gamma is None else gamma
        for name, w in self.model.named_parameters():
            if name in diff:
                original = w.detach().clone()
                w.add_(diff[name].to(w.dtype), alpha=gamma)
                self._saved[name] = (original, w.detach().clone())

    @torch.no_grad()
    def restore(self) -> None:
        """Takes the perturbation out, keeping whatever update the optimizer made since ``perturb``."""
        for name, w in self.model.named_parameters():
            if name in self._saved:
                original, perturbed = self._saved[name]
                w.copy_(original + (w - perturbed))
        self._saved.clear()

    @contextmanager
    def applied(self, direction: Mapping[str, torch.Tensor], gamma: float | None = None) -> Iterator[nn.Module]:
        """``with noise.applied(d, gamma):`` the model at w + gamma * d inside the block, restored on leaving
        (also on errors; bitwise when no optimizer step is taken inside). Default gamma: ``self.gamma``."""
        self.perturb(dict(direction), gamma)
        try:
            yield self.model
        finally:
            self.restore()

    def state_dict(self) -> dict:
        """The proxy optimizer's state (AdamW's moments; empty for SGD), for the trainer's ``last.pt``."""
        return {"optimizer": self.optimizer_name, "proxy_optim": self.proxy_optim.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("optimizer") != self.optimizer_name:
            raise ValueError(
                f"the saved proxy optimizer is {state.get('optimizer')!r}, this one {self.optimizer_name!r}"
            )
        self.proxy_optim.load_state_dict(state["proxy_optim"])


register_weight_noise("none", None, description="no weight noise")


@register_weight_noise("awp", description="AWP: one proxy step up the TRADES loss on x_adv, every weight matrix")
def _awp(model: nn.Module, cfg) -> WeightPerturbation:
    return WeightPerturbation.from_config(model, cfg, "awp")


@register_weight_noise(
    "proxy_attention",
    description="CAP: one proxy step on -CE(x) + beta KL(p(x) || p(x_aug)), attention qkv/proj weights only",
)
def _proxy_attention(model: nn.Module, cfg) -> WeightPerturbation:
    return WeightPerturbation.from_config(model, cfg, "proxy_attention")


def weight_sensitivity(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    gammas,
    *,
    draws: int = 3,
    names: list[str] | None = None,
    seed: int = 0,
    attack=None,
    attack_n: int | None = None,
    batch_size: int = 256,
):
    """Accuracy under random weight noise of growing size: how flat the model sits in weight space.

    For each draw, one random direction per layer is drawn (Gaussian, on the CPU from ``seed + draw``, so the
    same on any device) and rescaled to the layer's own norm, the same relative scaling as the noise of
    ``WeightPerturbation``::

        r_l ~ N(0, I),   d_l = ||w_l|| / ||r_l|| * r_l,   w_l <- w_l + gamma * d_l

    so that ||w_l' - w_l|| / ||w_l|| = gamma in every layer. A draw keeps its direction for every gamma: each
    curve is a 1-D slice through weight space. After each evaluation the original weights are copied back, so the
    model is bitwise unchanged afterwards (also if an error interrupts). The model is evaluated in eval mode
    (BatchNorm running statistics fixed) and its modes are restored.

    Args:
        model: The classifier (inputs in [0, 1]).
        images: (N,1,S,S) test images.
        labels: (N,) labels.
        gammas: Relative noise sizes, e.g. ``[0, 0.01, 0.02, 0.05, 0.1, 0.2]``. gamma = 0 is evaluated once and
            repeated for every draw.
        draws: Random directions per gamma.
        names: Parameters to perturb; None: every weight matrix (``perturbed_names(model, "awp")``); e.g.
            ``perturbed_names(model, "proxy_attention")`` for the attention weights only.
        seed: Seed of the directions (draw k uses ``seed + k``).
        attack: Optional attack ``(model, x, y) -> x_adv`` (e.g. ``PGD(...)`` with a seed), run against the
            *perturbed* model on the first ``attack_n`` images. As in ``evaluate``, a sample counts as robust
            only if it is also classified correctly clean.
        attack_n: Images attacked (default: all).
        batch_size: Batch size of predictions and attacks.

    Returns:
        A long DataFrame with columns ``gamma``, ``draw``, ``condition`` (``"clean"``, and the attack's short
        name, e.g. ``"PGD-10"``), ``accuracy`` and ``n``.
    """
    import pandas as pd

    from ..common import eval_mode
    from ..evaluation.metrics import adversarial_examples, predict_logits

    names = perturbed_names(model, "awp") if names is None else list(names)
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"the model has no parameters {missing}")
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    labels = labels.cpu().long()
    n_attack = len(labels) if attack_n is None else min(attack_n, len(labels))
    condition = getattr(attack, "short_name", "attack")

    def measure() -> list[tuple[str, float, int]]:
        correct = predict_logits(model, images, batch_size).argmax(1) == labels
        out = [("clean", correct.float().mean().item(), len(labels))]
        if attack is not None:
            adv = adversarial_examples(model, attack, images[:n_attack], labels[:n_attack], batch_size)
            robust = (predict_logits(model, adv, batch_size).argmax(1) == labels[:n_attack]) & correct[:n_attack]
            out.append((condition, robust.float().mean().item(), n_attack))
        return out

    rows = []
    original = {n: params[n].detach().clone() for n in names}
    with eval_mode(model):
        try:
            at_zero = None
            for gamma in gammas:
                for draw in range(draws):
                    if gamma == 0:
                        at_zero = at_zero or measure()
                        result = at_zero
                    else:
                        direction = random_direction(original, seed=seed + draw)
                        with torch.no_grad():
                            for n in names:
                                params[n].add_(direction[n], alpha=float(gamma))
                        result = measure()  # on an error the outer finally restores the weights
                        with torch.no_grad():
                            for n in names:
                                params[n].copy_(original[n])
                    rows += [
                        {"gamma": float(gamma), "draw": draw, "condition": c, "accuracy": acc, "n": n_}
                        for c, acc, n_ in result
                    ]
        finally:
            with torch.no_grad():
                for n in names:
                    params[n].copy_(original[n])
    return pd.DataFrame(rows)
