"""Acquisition augmentation: at training time, some slices pass through a mild scanner change.

Each slice is changed with probability ``p`` by one of ``ACQUISITION``, drawn uniformly, at a severity drawn from
1..``max_severity`` of the corruption module (so the same calibrated parameters): another window and level, quantum
noise (Gaussian, or low-dose noise simulated in the sinogram), a sharper or smoother reconstruction kernel, blur,
a gamma change. Draws come from a seed, so an epoch's augmentation does not depend on the device or on a resume.

Every type here is also a corruption of the OOD evaluation (``corruptions.CORRUPTIONS``): a model trained with
them has seen milder versions of those corruptions, so its corruption accuracy is reported with and without them
(``corruption_all`` and ``corruption_not_augmented`` of the reproduction's per-run rows).
"""

from __future__ import annotations

import torch

from ..evaluation.corruptions import corrupt

ACQUISITION = ("window_shift", "gaussian_noise", "low_dose", "sharp_kernel", "smooth_kernel", "gaussian_blur", "gamma")


def acquisition_augment(x: torch.Tensor, p: float, max_severity: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A copy of ``x`` in which each slice, with probability ``p``, went through one acquisition change.

    Args:
        x: Slices (N,1,H,W) in [0,1].
        p: Probability per slice.
        max_severity: Severities 1..max_severity are drawn.
        seed: Seed of every draw (which slices, which change, which severity, the change's own noise).

    Returns:
        The augmented slices and a bool (N,) tensor of the slices that changed.
    """
    gen = torch.Generator().manual_seed(seed)
    changed = torch.rand(len(x), generator=gen) < p
    kind = torch.randint(len(ACQUISITION), (len(x),), generator=gen)
    severity = torch.randint(1, max_severity + 1, (len(x),), generator=gen)
    out = x.clone()
    for k, name in enumerate(ACQUISITION):
        for s in range(1, max_severity + 1):
            rows = (changed & (kind == k) & (severity == s)).nonzero().flatten()
            if len(rows):
                rows_on = rows.to(x.device)
                out[rows_on] = corrupt(x[rows_on], name, s, seed=seed * 31 + k * 7 + s)
    return out, changed
