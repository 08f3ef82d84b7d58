"""Training loops."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


def fit_erm(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, epochs: int = 10, batch_size: int = 64,
            lr: float = 2e-3, weight_decay: float = 1e-4, seed: int = 0, progress: bool = True) -> list[float]:
    """Plain cross-entropy training (AdamW, cosine schedule, random horizontal flips).

    Returns:
        The mean loss of each epoch.
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * -(-len(labels) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.15)
    device = next(model.parameters()).device
    history = []
    for _ in tqdm(range(epochs), desc="erm", disable=not progress):
        model.train()
        order, total = torch.randperm(len(labels), generator=gen), 0.0
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            x, y = images[idx], labels[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            loss = F.cross_entropy(model(x.to(device)), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            total += loss.item() * len(idx)
        history.append(total / len(order))
    return history
