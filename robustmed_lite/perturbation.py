"""Weight perturbation: AWP (Wu et al., NeurIPS 2020) and the method's proxy attention noise.

Each batch a proxy copy of the model (weights and BatchNorm buffers) takes one optimizer step that *increases*
a loss; the per-layer direction it moved, rescaled to the layer's own norm, is the weight noise::

    d_l = ||w_l|| / ||dw_l|| * dw_l,   dw = proxy - model,   w_l <- w_l + gamma * d_l

The model computes its training loss at the perturbed weights; after its optimizer step the perturbation is
taken out again. Two flavours:

* ``awp``: proxy loss -(CE(x) + beta * KL(p(x) || p(x_adv))), noise on every weight matrix (TRADES-AWP).
* ``proxy_attention`` (CAP and the method): proxy loss -CE(x) + beta * KL(p(x) || p(x_aug)), adversarial for the
  clean loss and consistent between the image and its lung-prior view, noise only on attention weights.

Proxy optimizer state, chosen explicitly: the proxy is reloaded from the model before every step, and its
optimizer is plain SGD without momentum or weight decay, so it carries no state from one batch to the next: each
batch's noise depends only on the current weights and batch. (A stateful proxy optimizer would make the noise
depend on the history of earlier, unrelated proxy steps.) Its state is cleared anyway after every step.

Only the perturbed weights take a gradient and a step in the proxy: the others' steps would be thrown away.

Restoring is exact: the perturbed tensors' original values are kept, and after the model's optimizer step each
becomes ``original + (stepped - perturbed)``, i.e. the optimizer's update applied to the unperturbed weights.
With a zero learning rate that is bitwise the original.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .models import attention_weights
from .objectives import kl_per_sample

KINDS = ("none", "awp", "proxy_attention")
_EPS = 1e-20


def perturbed_names(model: nn.Module, kind: str) -> list[str]:
    """Names of the parameters a kind of weight noise touches."""
    if kind == "awp":
        return [n for n, p in model.named_parameters() if p.dim() > 1 and n.endswith("weight")]
    if kind == "proxy_attention":
        names = list(attention_weights(model))
        if not names:
            raise ValueError("proxy_attention weight noise needs a model with attention weights (visformer_tiny, "
                             "deit_tiny, vit_tiny, tiny_visformer); use weight_noise='awp' for CNNs")
        return names
    raise ValueError(f"unknown weight noise {kind!r}: use one of {KINDS}")


def relative_diff(model: nn.Module, proxy: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Per-layer direction from model to proxy, rescaled to each layer's weight norm."""
    proxy_params = dict(proxy.named_parameters())
    diff = {}
    for name, w in model.named_parameters():
        if name in names:
            dw = proxy_params[name].detach() - w.detach()
            diff[name] = w.detach().norm() / (dw.norm() + _EPS) * dw
    return diff


class WeightPerturbation:
    """One-step proxy adversary on the weights.

    Args:
        model: The model being trained.
        kind: 'awp' or 'proxy_attention'.
        gamma: Noise scale relative to each layer's norm.
        beta: Weight of the KL term in the proxy loss.
        proxy_lr: Learning rate of the proxy's single SGD step.
    """

    def __init__(self, model: nn.Module, kind: str, gamma: float, beta: float, proxy_lr: float = 0.01):
        self.model, self.kind, self.gamma, self.beta = model, kind, gamma, beta
        self.names = perturbed_names(model, kind)
        self.proxy = copy.deepcopy(model)
        # Only the perturbed weights' step matters, so only they take gradients: the proxy's backward pass then
        # skips every other weight gradient, and (for attention noise) every layer below the first attention block.
        stepped = []
        for name, p in self.proxy.named_parameters():
            p.requires_grad_(name in self.names)
            if name in self.names:
                stepped.append(p)
        self.proxy_optim = torch.optim.SGD(stepped, lr=proxy_lr, momentum=0.0, weight_decay=0.0)
        self._saved: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

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
        self.proxy.load_state_dict(self.model.state_dict())  # weights and BatchNorm buffers
        self.proxy.train()
        loss = self.proxy_loss(x, x_other, y)
        self.proxy_optim.zero_grad(set_to_none=True)
        loss.backward()
        self.proxy_optim.step()
        self.proxy_optim.state.clear()
        return relative_diff(self.model, self.proxy, self.names)

    @torch.no_grad()
    def perturb(self, diff: dict[str, torch.Tensor]) -> None:
        """w <- w + gamma * d, remembering the original and the perturbed values."""
        if self._saved:
            raise RuntimeError("perturb() called twice without restore()")
        for name, w in self.model.named_parameters():
            if name in diff:
                original = w.detach().clone()
                w.add_(diff[name].to(w.dtype), alpha=self.gamma)
                self._saved[name] = (original, w.detach().clone())

    @torch.no_grad()
    def restore(self) -> None:
        """Takes the perturbation out, keeping whatever update the optimizer made since ``perturb``."""
        for name, w in self.model.named_parameters():
            if name in self._saved:
                original, perturbed = self._saved[name]
                w.copy_(original + (w - perturbed))
        self._saved.clear()
