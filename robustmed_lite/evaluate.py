"""Evaluation: predictions and accuracy (robust and clinical tables come with the attacks)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Logits of ``model`` in eval mode over a tensor of images, batch by batch; restores the mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        out = [model(images[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(images), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy in eval mode."""
    return (predict_logits(model, images, batch_size).argmax(1) == labels.cpu()).float().mean().item()
