"""Test-time adaptation on unlabeled images of the target site: AdaBN and TENT.

* **AdaBN** (Li et al., 2016): the BatchNorm statistics are re-estimated on the target images (a cumulative
  average over all of them); no weight changes.
* **TENT** (Wang et al., ICLR 2021): AdaBN's statistics, then the BatchNorm affine parameters (and nothing else)
  take a few Adam steps that minimise the entropy of the predictions on target batches, BatchNorm normalising with
  the batch statistics as in TENT; the statistics are re-estimated once more at the end, so that the adapted model
  is an ordinary eval-mode model.

The functions take images only (a tensor, or ``UnlabeledImages``): a pair with labels, an ``ImageSet`` or a
``PhantomSet`` is refused, so that no label can reach an adaptation. They return an adapted copy; the source model
(and so the checkpoint it came from) is never modified.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ADAPT_METHODS = ("none", "adabn", "tent")


@dataclass(frozen=True)
class UnlabeledImages:
    """A batch of target images with nothing else attached."""

    images: torch.Tensor


def _images_only(images) -> torch.Tensor:
    if isinstance(images, UnlabeledImages):
        images = images.images
    if not isinstance(images, torch.Tensor):
        raise TypeError(
            f"test-time adaptation takes unlabeled images (a tensor or UnlabeledImages), got "
            f"{type(images).__name__}: pass only the images, e.g. data.images, never the labels"
        )
    if images.dim() != 4:
        raise ValueError(f"expected images (N,C,H,W), got shape {tuple(images.shape)}")
    if len(images) == 0:
        raise ValueError("the target set is empty: test-time adaptation needs target images")
    if not torch.isfinite(images).all():
        raise ValueError(f"the target images hold {int((~torch.isfinite(images)).sum())} non-finite values")
    return images


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The model's BatchNorm layers, or a clear error for a model without any."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no BatchNorm layer: AdaBN and TENT adapt BatchNorm "
            "statistics and affine parameters (LayerNorm models such as ViT/DeiT need another method)"
        )
    return layers


def _batches(images: torch.Tensor, batch_size: int, order: torch.Tensor | None = None):
    idx = torch.arange(len(images)) if order is None else order
    for start in range(0, len(idx), batch_size):
        yield images[idx[start : start + batch_size]]


@torch.no_grad()
def _reestimate(model: nn.Module, images: torch.Tensor, batch_size: int) -> None:
    """AdaBN: BatchNorm running statistics replaced by the cumulative average over ``images``."""
    layers = batchnorm_layers(model)
    device = next(model.parameters()).device
    model.eval()
    for bn in layers:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average: every target batch counts the same
        bn.train()
    for x in _batches(images, batch_size):
        model(x.to(device))
    model.eval()


def adabn(model: nn.Module, images, batch_size: int = 128) -> nn.Module:
    """An eval-mode copy of ``model`` whose BatchNorm statistics come from the target ``images``.

    Args:
        model: Source classifier (left unchanged).
        images: Target images (N,1,H,W) in [0,1], a tensor or ``UnlabeledImages``.
        batch_size: Images per forward pass.
    """
    images = _images_only(images)
    adapted = copy.deepcopy(model)
    momenta = [bn.momentum for bn in batchnorm_layers(adapted)]
    _reestimate(adapted, images, batch_size)
    for bn, momentum in zip(batchnorm_layers(adapted), momenta):
        bn.momentum = momentum
    return adapted.eval()


def tent(model: nn.Module, images, steps: int = 1, lr: float = 1e-3, batch_size: int = 64, seed: int = 0) -> nn.Module:
    """An eval-mode copy of ``model`` adapted by TENT on the target ``images``.

    Args:
        model: Source classifier (left unchanged).
        images: Target images, a tensor or ``UnlabeledImages``.
        steps: Passes over the target images (one Adam step per batch).
        lr: Adam's learning rate (TENT's default for Adam).
        batch_size: Images per step.
        seed: Seed of the batch order.
    """
    images = _images_only(images)
    if steps < 1:
        raise ValueError(f"TENT needs steps >= 1, got {steps}")
    adapted = adabn(model, images, batch_size=max(batch_size, 128))
    layers = batchnorm_layers(adapted)
    for p in adapted.parameters():
        p.requires_grad_(False)
    affine = [p for bn in layers for p in (bn.weight, bn.bias) if p is not None]
    if not affine:
        raise ValueError("the model's BatchNorm layers have no affine parameters for TENT to adapt")
    for p in affine:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(affine, lr=lr, betas=(0.9, 0.999))
    device = next(adapted.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for bn in layers:
            bn.train()  # TENT normalises with the statistics of the batch it adapts on
        for x in _batches(images, batch_size, torch.randperm(len(images), generator=gen)):
            logits = adapted(x.to(device)).float()
            entropy = -(F.softmax(logits, 1) * F.log_softmax(logits, 1)).sum(1).mean()
            optimizer.zero_grad(set_to_none=True)
            entropy.backward()
            optimizer.step()
    for p in adapted.parameters():
        p.requires_grad_(True)
    momenta = [bn.momentum for bn in layers]
    _reestimate(adapted, images, max(batch_size, 128))
    for bn, momentum in zip(layers, momenta):
        bn.momentum = momentum
    return adapted.eval()


def adapt(model: nn.Module, images, method: str, **kwargs) -> nn.Module:
    """``method`` in ``ADAPT_METHODS``: ``none`` returns the model itself, else an adapted copy."""
    if method not in ADAPT_METHODS:
        raise ValueError(f"unknown adaptation {method!r}: choose one of {ADAPT_METHODS}")
    if method == "none":
        _images_only(images)
        return model
    return adabn(model, images, **kwargs) if method == "adabn" else tent(model, images, **kwargs)
