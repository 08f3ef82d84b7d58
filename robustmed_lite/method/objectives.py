"""Training objectives of the outer minimisation, all on logits, all batch means, and the registered losses.

* ``ce``: cross-entropy (ERM on clean inputs; PGD-AT on adversarial ones).
* ``trades``: CE(f(x), y) + beta * KL(p(x) || p(x')) (Zhang et al., ICML 2019).
* ``mart``: boosted CE on x' + beta * KL(p(x) || p(x')) weighted by 1 - p_y(x) (Wang et al., ICLR 2020).
* ``score``: squared error on probabilities, ||p(x) - onehot||^2 + beta * ||p(x') - p(x)||^2 (Pang et al.,
  ICML 2022).
* ``square_kl``: the method's objective: the squared error against a soft target that mixes in the prediction
  on the lung-prior view, y~ = s * p(x_aug) + (1 - s) * onehot(y), plus beta * ||p(x') - p(x)||^2. The KL enters
  through the inner maximisation that made x'. As in CAP's code, the gradient flows through p(x_aug) in the
  soft target (``target_grad``, true for ``cap`` and ``robustmed``); ``--target_grad false`` is the named
  ablation that treats y~ as a fixed target (stop-gradient, one backward pass fewer).

Each training loss is registered (``components.register_loss``) with one signature, ``loss(model, batch, cfg)``:
the trainer calls it with the model in train mode (perturbed, where a method has weight noise) and a
``components.Batch``. The forward passes run in the order x, x_adv, x_aug, which fixes how BatchNorm's running
statistics are updated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..components import register_loss


def kl_per_sample(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """KL(softmax(logits_p) || softmax(logits_q)) per sample."""
    log_p, log_q = F.log_softmax(logits_p, 1), F.log_softmax(logits_q, 1)
    return (log_p.exp() * (log_p - log_q)).sum(1)


def ce_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy."""
    return F.cross_entropy(logits, y)


def trades_loss(logits_nat: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    """TRADES: natural CE plus beta times KL(p(x) || p(x'))."""
    return F.cross_entropy(logits_nat, y) + beta * kl_per_sample(logits_nat, logits_adv).mean()


def mart_loss(logits_nat: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    """MART: boosted CE on x' (CE plus a margin term on the strongest wrong class) and a KL term weighted by how
    unsure the model is on x."""
    p_adv = F.softmax(logits_adv, 1)
    wrong = p_adv.masked_fill(F.one_hot(y, p_adv.shape[1]).bool(), -1).max(1).values
    boosted = F.cross_entropy(logits_adv, y) - torch.log((1.0001 - wrong).clamp(min=1e-12)).mean()
    p_true = F.softmax(logits_nat, 1).gather(1, y[:, None]).squeeze(1)
    return boosted + beta * (kl_per_sample(logits_nat, logits_adv) * (1.0000001 - p_true)).mean()


def score_loss(logits_nat: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    """SCORE-style squared error on probabilities: natural fit plus beta times the robust gap."""
    p_nat = F.softmax(logits_nat, 1)
    return _square_loss(p_nat, F.softmax(logits_adv, 1), F.one_hot(y, p_nat.shape[1]).to(p_nat.dtype), beta)


def _square_loss(p_nat: torch.Tensor, p_adv: torch.Tensor, target: torch.Tensor, beta: float) -> torch.Tensor:
    """||p(x) - target||^2 + beta * ||p(x') - p(x)||^2, averaged over the batch."""
    return ((p_nat - target) ** 2).sum(1).mean() + beta * ((p_adv - p_nat) ** 2).sum(1).mean()


def soft_target(logits_aug: torch.Tensor, y: torch.Tensor, smooth: float) -> torch.Tensor:
    """y~ = smooth * p(x_aug) + (1 - smooth) * onehot(y)."""
    p_aug = F.softmax(logits_aug, 1)
    return smooth * p_aug + (1 - smooth) * F.one_hot(y, p_aug.shape[1]).to(p_aug.dtype)


def square_kl_loss(
    logits_nat: torch.Tensor,
    logits_adv: torch.Tensor,
    logits_aug: torch.Tensor,
    y: torch.Tensor,
    beta: float,
    smooth: float,
) -> torch.Tensor:
    """The method's square loss: ||p(x) - y~||^2 + beta * ||p(x') - p(x)||^2, with y~ from the prior view."""
    return _square_loss(F.softmax(logits_nat, 1), F.softmax(logits_adv, 1), soft_target(logits_aug, y, smooth), beta)


# ------------------------------------------------------------------------------------- registered losses
@register_loss("ce", description="cross-entropy, on x_adv where the method has a sample attack, else on x")
def _ce(model, batch, cfg) -> torch.Tensor:
    return ce_loss(model(batch.x if batch.x_adv is None else batch.x_adv).float(), batch.y)


@register_loss("trades", needs_attack=True, description="TRADES: CE(x) + beta KL(p(x) || p(x_adv))")
def _trades(model, batch, cfg) -> torch.Tensor:
    logits_nat, logits_adv = model(batch.x).float(), model(batch.x_adv).float()
    return trades_loss(logits_nat, logits_adv, batch.y, cfg.beta)


@register_loss("mart", needs_attack=True, description="MART: boosted CE on x_adv + beta KL weighted by 1 - p_y(x)")
def _mart(model, batch, cfg) -> torch.Tensor:
    logits_nat, logits_adv = model(batch.x).float(), model(batch.x_adv).float()
    return mart_loss(logits_nat, logits_adv, batch.y, cfg.beta)


@register_loss("score", needs_attack=True, description="SCORE: squared error on probabilities + beta robust gap")
def _score(model, batch, cfg) -> torch.Tensor:
    logits_nat, logits_adv = model(batch.x).float(), model(batch.x_adv).float()
    return score_loss(logits_nat, logits_adv, batch.y, cfg.beta)


@register_loss(
    "square_kl", needs_attack=True, description="square loss against the soft target from x_aug + beta square gap (CAP)"
)
def _square_kl(model, batch, cfg) -> torch.Tensor:
    logits_nat, logits_adv = model(batch.x).float(), model(batch.x_adv).float()
    # CAP's code backpropagates through p(x_aug) (target_grad true); false treats y~ as a fixed target.
    with torch.set_grad_enabled(bool(cfg.target_grad) and torch.is_grad_enabled()):
        logits_aug = model(batch.x_aug).float()
    return square_kl_loss(logits_nat, logits_adv, logits_aug, batch.y, cfg.beta, cfg.smooth)
