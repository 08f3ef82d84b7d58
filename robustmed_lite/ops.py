"""Small batched image operations shared by the phantom, the corruptions and the figures."""

from __future__ import annotations

import math
from functools import lru_cache

import torch


def gaussian_kernel1d(sigma: float, truncate: float = 3.0) -> torch.Tensor:
    """A normalised 1-D Gaussian kernel (float64) of radius ``ceil(truncate * sigma)``."""
    radius = max(1, int(math.ceil(truncate * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def border_index(idx: torch.Tensor, n: int, mode: str) -> torch.Tensor:
    """Maps out-of-range indices into [0, n) the way ``F.pad`` modes do; -1 marks a zero ('constant') tap."""
    if mode == "replicate":
        return idx.clamp(0, n - 1)
    if mode == "reflect":  # mirror without repeating the edge pixel (numpy 'reflect', OpenCV REFLECT_101)
        period = max(2 * n - 2, 1)
        idx = idx.remainder(period)
        return torch.where(idx >= n, period - idx, idx)
    if mode == "symmetric":  # mirror repeating the edge pixel (OpenCV BORDER_REFLECT)
        idx = idx.remainder(2 * n)
        return torch.where(idx >= n, 2 * n - 1 - idx, idx)
    if mode == "constant":
        return torch.where((idx >= 0) & (idx < n), idx, torch.full_like(idx, -1))
    raise ValueError(f"unknown border mode {mode!r}: use reflect, symmetric, replicate or constant")


@lru_cache(maxsize=64)
def _filter_matrix(n: int, taps: tuple[float, ...], mode: str) -> torch.Tensor:
    """(n, n) matrix that applies a centred 1-D filter with the given border handling."""
    k = torch.tensor(taps, dtype=torch.float64)
    r = k.numel() // 2
    rows = torch.arange(n).view(-1, 1).expand(n, k.numel())
    cols = border_index(rows + torch.arange(-r, r + 1).view(1, -1), n, mode)
    weights = k.view(1, -1).expand(n, -1)
    keep = cols >= 0
    m = torch.zeros(n, n, dtype=torch.float64)
    m.index_put_((rows[keep], cols[keep]), weights[keep], accumulate=True)
    return m


def separable_filter(x: torch.Tensor, kernel: torch.Tensor, mode: str = "reflect") -> torch.Tensor:
    """Filters the last two dimensions of ``x`` with a 1-D kernel along each, as two small matrix products.

    One-channel convolutions are slow in PyTorch on a CPU; a banded matrix product runs on BLAS, costs the
    same for any kernel width, and applies the border rule exactly.
    """
    h, w = x.shape[-2:]
    taps = tuple(float(v) for v in kernel)
    mh = _filter_matrix(h, taps, mode).to(x.device, x.dtype)
    mw = mh if w == h else _filter_matrix(w, taps, mode).to(x.device, x.dtype)
    return mh @ x @ mw.T


def gaussian_blur(x: torch.Tensor, sigma: float, mode: str = "reflect") -> torch.Tensor:
    """Gaussian blur of the last two dimensions (any leading shape, e.g. (N,C,H,W)).

    Args:
        x: Images.
        sigma: Standard deviation in pixels; 0 or less returns ``x``.
        mode: Border rule: 'reflect', 'symmetric', 'replicate' or 'constant'.
    """
    if sigma <= 0:
        return x
    return separable_filter(x, gaussian_kernel1d(sigma), mode)
