"""The lung-cavity prior: a guided filter that smooths the inside of the dark lung region and keeps its contour.

Guided filter (He, Sun and Tang, 2013) with guide ``I`` and input ``p``, box means over a (2r+1)^2 window::

    a = cov(I, p) / (var(I) + eps),   b = mean(p) - a * mean(I),   q = mean(a) * I + mean(b)

Every mean is a box filter, and a box filter costs the same at any radius: a running (cumulative) sum, or
OpenCV's ``boxFilter``. Borders are mirrored with the edge pixel repeated (OpenCV's ``BORDER_REFLECT``), the
rule ``cv2.ximgproc.guidedFilter`` uses, so the two agree. The fast variant (He and Sun, 2015) computes ``a``
and ``b`` on images subsampled by ``s`` and upsamples them bilinearly before the last step.

Two exact backends compute the same function:

* ``"opencv"``: ``cv2.boxFilter`` per image, for CPU tensors that need no gradient (the data pipeline);
* ``"torch"``: cumulative sums, for gradients and GPUs.

``backend="auto"`` picks OpenCV where it can and torch otherwise.

The prior (CAP, Xu et al., AAAI 2023): the dark region ``G <= t`` (lung cavity and air) is the filter input,
the full image the guide. Two views are registered (``components.PRIOR_VIEWS``, ``TrainConfig.prior_view``):

* ``"cap"``, CAP's code exactly (the default of ``cap`` and ``robustmed``): CAP's own fast guided filter
  (``cap_guided_filter``): the guide and input are down-sampled by s = 0.5 with *bicubic* interpolation; the box
  is ``round(window * s)`` pixels wide at that resolution, with CAP's window 5 (radius 2) a **2x2** box
  (Python's round: round(2.5) = 2), placed as ``cv2.blur`` places it (default anchor: offsets -1 and 0 on each
  axis) with ``BORDER_REFLECT_101`` borders; ``mean_a`` and ``mean_b`` are up-sampled bilinearly, and
  ``q = mean_a * I + mean_b`` at full resolution. The view is ``x_aug = bright part + q`` over the *whole* image:
  q is added everywhere, also on the bright part (where p = 0 it is near 0 except at the lung wall).
  CAP's code clips the sum above (``cv2.add`` saturates at 255) but casts negative q to uint8, which wraps them
  around to bright values; here the sum is clipped to [0, 1] on both sides (the wrap is a bug, not a feature).
  The 2x2 box is not symmetric, so the view does not commute with flips: the dataset computes the view of each
  flipped image (CAP flips first, then filters).
* ``"package"``, this package's earlier variant: the symmetric (2r'+1)^2 box at half resolution (r' = r * s
  rounded half up: a **3x3** box for radius 2), bilinear resampling, ``BORDER_REFLECT`` borders
  (``fast_guided_filter``), and the view keeps every pixel outside the dark region and replaces the dark region
  by the filtered interior, clipped to [0, 1]. It commutes with flips and agrees with ``cv2.ximgproc``'s
  conventions.

Images in [0, 1] versus CAP's 8-bit ``G``: CAP keeps the bright part ``G > 127`` and filters the dark part
``G <= 127``. Here the dark part is ``x <= threshold`` with threshold 0.5: for 8-bit data (x = G / 255) that is
exactly ``G <= 127``. Float inputs are not quantised (the package never rounds pixels), so the rare float value
in (127/255, 0.5] counts as dark, as 0.5 is the midpoint of [0, 1]. ``threshold="otsu"`` picks one per image.
"""

from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ..components import PRIOR_VIEWS, register_prior_view
from ..ops import border_index

BACKENDS = ("auto", "opencv", "torch")
CAP_WINDOW_SCALE = 0.5  # CAP's fast guided filter subsamples by s = 0.5


# ------------------------------------------------------------------------------------------- box filters
@lru_cache(maxsize=128)
def _padded_index(n: int, radius: int, device: torch.device) -> torch.Tensor:
    return border_index(torch.arange(-radius, n + radius), n, "symmetric").to(device)


def _running_mean(x: torch.Tensor, radius: int, dim: int) -> torch.Tensor:
    """Mean over a (2r+1) window along ``dim`` with mirrored borders, from one cumulative sum."""
    n = x.shape[dim]
    if radius < n:  # mirror with slices: index_select is slow on multi-threaded CPUs
        padded = torch.cat([x.narrow(dim, 0, radius).flip(dim), x, x.narrow(dim, n - radius, radius).flip(dim)], dim)
    else:  # windows wider than the image mirror more than once
        padded = x.index_select(dim, _padded_index(n, radius, x.device))
    csum = padded.cumsum(dim)
    width = 2 * radius + 1
    upper = csum.narrow(dim, width - 1, n)
    lower = torch.cat([torch.zeros_like(csum.narrow(dim, 0, 1)), csum.narrow(dim, 0, n - 1)], dim)
    return (upper - lower) / width


def box_filter(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean over (2r+1)x(2r+1) windows of the last two dimensions, mirrored borders, cost independent of r."""
    return _running_mean(_running_mean(x, radius, -2), radius, -1)


# ------------------------------------------------------------------------------------------ guided filter
def _check(I: torch.Tensor, p: torch.Tensor, radius: int, eps: float, s: float) -> None:
    if I.dim() != 4 or p.dim() != 4:
        raise ValueError(
            f"guided_filter takes (N,C,H,W) tensors, got guide {tuple(I.shape)} and input "
            f"{tuple(p.shape)}; add batch/channel axes with x[None, None]"
        )
    if I.shape[1] != 1:
        raise ValueError(f"the guide must be grey (one channel), got {I.shape[1]} channels")
    if I.shape[0] != p.shape[0] or I.shape[2:] != p.shape[2:]:
        raise ValueError(f"guide {tuple(I.shape)} and input {tuple(p.shape)} differ in batch or size")
    if radius < 0 or eps <= 0 or not 0 < s <= 1:
        raise ValueError(f"need radius >= 0, eps > 0 and 0 < s <= 1, got radius={radius}, eps={eps}, s={s}")


def _small_radius(radius: int, s: float) -> int:
    """The radius at the subsampled resolution, rounded half up (Python's round() rounds half to even, which
    would map radius 5 at s = 0.5 to 2 like radius 4)."""
    return max(1, int(radius * s + 0.5)) if radius > 0 else 0


def _coefficients_torch(I, p, radius, eps):
    n, c = p.shape[:2]
    stats = box_filter(torch.cat([I, p, I * I, I * p], 1), radius)
    mean_i, mean_p, corr_ii, corr_ip = stats[:, :1], stats[:, 1 : 1 + c], stats[:, 1 + c : 2 + c], stats[:, 2 + c :]
    a = (corr_ip - mean_i * mean_p) / (corr_ii - mean_i * mean_i + eps)
    b = mean_p - a * mean_i
    return a, b


def _guided_filter_torch(I, p, radius, eps, s):
    if s == 1:
        a, b = _coefficients_torch(I, p, radius, eps)
        ab = box_filter(torch.cat([a, b], 1), radius)
    else:
        h, w = I.shape[-2:]
        small = (max(1, round(h * s)), max(1, round(w * s)))
        r_small = _small_radius(radius, s)
        down = [F.interpolate(t, size=small, mode="bilinear", align_corners=False) for t in (I, p)]
        a, b = _coefficients_torch(*down, r_small, eps)
        ab = F.interpolate(box_filter(torch.cat([a, b], 1), r_small), size=(h, w), mode="bilinear", align_corners=False)
    c = p.shape[1]
    return ab[:, :c] * I + ab[:, c:]


def _coefficients_opencv(I: np.ndarray, p: np.ndarray, radius: int, eps: float):
    """mean(a) and mean(b) of one grey image: six box filters and in-place array operations, all in cache."""
    k = (2 * radius + 1, 2 * radius + 1)

    def box(x):
        return cv2.boxFilter(x, -1, k, borderType=cv2.BORDER_REFLECT)

    mean_i, mean_p = box(I), box(p)
    var_i = box(I * I)
    var_i -= mean_i * mean_i
    var_i += eps
    a = box(I * p)
    a -= mean_i * mean_p
    a /= var_i
    mean_p -= a * mean_i  # now b
    return box(a), box(mean_p)


def _guided_filter_opencv(I, p, radius, eps, s):
    i_np = I.detach().numpy()
    p_np = p.detach().numpy()
    out = np.empty(p_np.shape, dtype=p_np.dtype)
    h, w = i_np.shape[-2:]
    if s != 1:
        small = (max(1, round(w * s)), max(1, round(h * s)))  # OpenCV sizes are (width, height)
        r_small = _small_radius(radius, s)
    for n in range(p_np.shape[0]):
        guide = np.ascontiguousarray(i_np[n, 0])
        if s != 1:
            g_small = cv2.resize(guide, small, interpolation=cv2.INTER_LINEAR)
        for c in range(p_np.shape[1]):
            src = np.ascontiguousarray(p_np[n, c])
            if s == 1:
                mean_a, mean_b = _coefficients_opencv(guide, src, radius, eps)
            else:  # mean(a), mean(b) at low resolution, upsampled: q = mean_a * I + mean_b at full resolution
                p_small = cv2.resize(src, small, interpolation=cv2.INTER_LINEAR)
                mean_a, mean_b = (
                    cv2.resize(t, (w, h), interpolation=cv2.INTER_LINEAR)
                    for t in _coefficients_opencv(g_small, p_small, r_small, eps)
                )
            out[n, c] = mean_a * guide + mean_b
    return torch.from_numpy(out)


def _pick_backend(I: torch.Tensor, p: torch.Tensor, backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: use one of {BACKENDS}")
    needs_grad = torch.is_grad_enabled() and (I.requires_grad or p.requires_grad)
    cpu = I.device.type == "cpu" and p.device.type == "cpu"
    if backend == "opencv" and (needs_grad or not cpu):
        raise ValueError("the opencv backend runs on CPU tensors without gradients: use backend='torch'")
    if backend == "auto":
        return "opencv" if cpu and not needs_grad and p.dtype in (torch.float32, torch.float64) else "torch"
    return backend


def guided_filter(
    I: torch.Tensor, p: torch.Tensor, radius: int, eps: float, s: float = 1.0, backend: str = "auto"
) -> torch.Tensor:
    """Guided filter of ``p`` with the grey guide ``I``.

    Args:
        I: Guide, (N,1,H,W).
        p: Input to filter, (N,C,H,W); each channel is filtered with the same guide.
        radius: Window radius r (window 2r+1).
        eps: Regulariser; larger smooths more (edges kept where var(I) >> eps).
        s: Subsampling factor of the fast variant; 1 is the exact filter.
        backend: 'auto', 'opencv' (CPU, no gradient) or 'torch' (any device, differentiable).

    Returns:
        The filtered ``q``, shaped like ``p``.
    """
    _check(I, p, radius, eps, s)
    I = I.to(p.dtype)
    if _pick_backend(I, p, backend) == "opencv":
        return _guided_filter_opencv(I, p, radius, eps, s)
    return _guided_filter_torch(I, p, radius, eps, s)


def fast_guided_filter(
    I: torch.Tensor, p: torch.Tensor, radius: int, eps: float, s: float = 0.5, backend: str = "auto"
) -> torch.Tensor:
    """The fast guided filter: coefficients computed at ``s`` times the resolution (He and Sun, 2015)."""
    return guided_filter(I, p, radius, eps, s=s, backend=backend)


# ------------------------------------------------------------------------- CAP's own fast guided filter
def cap_window(radius: int, s: float) -> int:
    """CAP's box side at the subsampled resolution: ``round((2r+1) * s)`` with Python's round (half to even),
    so window 5 at s = 0.5 gives 2 (CAP: ``round(5 * 0.5)``); at least 1."""
    return max(1, round((2 * radius + 1) * s))


def _cap_box_torch(x: torch.Tensor, k: int) -> torch.Tensor:
    """``cv2.blur(x, (k, k))``: the mean over a k x k window at offsets -(k//2) .. k-1-(k//2) (OpenCV's default
    anchor), borders mirrored without repeating the edge pixel (``BORDER_REFLECT_101``)."""
    if k <= 1:
        return x
    lo, hi = k // 2, k - 1 - k // 2
    h, w = x.shape[-2:]
    rows = border_index(torch.arange(-lo, h + hi), h, "reflect").to(x.device)
    cols = border_index(torch.arange(-lo, w + hi), w, "reflect").to(x.device)
    return F.avg_pool2d(x.index_select(-2, rows).index_select(-1, cols), k, stride=1)


def _cap_guided_torch(I, p, radius, eps, s):
    k = cap_window(radius, s)
    h, w = I.shape[-2:]
    if s != 1:
        small = (max(1, round(h * s)), max(1, round(w * s)))
        I_s, p_s = (F.interpolate(t, size=small, mode="bicubic", align_corners=False) for t in (I, p))
    else:
        I_s, p_s = I, p
    c = p.shape[1]
    stats = _cap_box_torch(torch.cat([I_s, p_s, I_s * I_s, I_s * p_s], 1), k)
    mean_i, mean_p, corr_ii, corr_ip = stats[:, :1], stats[:, 1 : 1 + c], stats[:, 1 + c : 2 + c], stats[:, 2 + c :]
    a = (corr_ip - mean_i * mean_p) / (corr_ii - mean_i * mean_i + eps)
    b = mean_p - a * mean_i
    ab = _cap_box_torch(torch.cat([a, b], 1), k)
    if s != 1:
        ab = F.interpolate(ab, size=(h, w), mode="bilinear", align_corners=False)
    return ab[:, :c] * I + ab[:, c:]


def _cap_guided_opencv(I, p, radius, eps, s):
    k = cap_window(radius, s)
    i_np, p_np = I.detach().numpy(), p.detach().numpy()
    out = np.empty(p_np.shape, dtype=p_np.dtype)
    h, w = i_np.shape[-2:]
    small = (max(1, round(w * s)), max(1, round(h * s)))  # OpenCV sizes are (width, height)

    def box(x):
        return cv2.blur(x, (k, k), borderType=cv2.BORDER_REFLECT_101) if k > 1 else x

    for n in range(p_np.shape[0]):
        guide = np.ascontiguousarray(i_np[n, 0])
        g_small = cv2.resize(guide, small, interpolation=cv2.INTER_CUBIC) if s != 1 else guide
        mean_i = box(g_small)
        var_i = box(g_small * g_small) - mean_i * mean_i
        for c in range(p_np.shape[1]):
            src = np.ascontiguousarray(p_np[n, c])
            p_small = cv2.resize(src, small, interpolation=cv2.INTER_CUBIC) if s != 1 else src
            mean_p = box(p_small)
            a = (box(g_small * p_small) - mean_i * mean_p) / (var_i + eps)
            b = mean_p - a * mean_i
            mean_a, mean_b = box(a), box(b)
            if s != 1:
                mean_a = cv2.resize(mean_a, (w, h), interpolation=cv2.INTER_LINEAR)
                mean_b = cv2.resize(mean_b, (w, h), interpolation=cv2.INTER_LINEAR)
            out[n, c] = mean_a * guide + mean_b
    return torch.from_numpy(out)


def cap_guided_filter(
    I: torch.Tensor,
    p: torch.Tensor,
    radius: int = 2,
    eps: float = 0.003,
    s: float = CAP_WINDOW_SCALE,
    backend: str = "auto",
) -> torch.Tensor:
    """CAP's fast guided filter, as its code computes it (see the module docstring).

    Guide and input down-sampled by ``s`` (bicubic), a ``cap_window(radius, s)``-wide box (``cv2.blur``'s
    default anchor, ``BORDER_REFLECT_101``), ``mean_a`` and ``mean_b`` up-sampled bilinearly,
    ``q = mean_a * I + mean_b``. With radius 2 and s = 0.5: a 2x2 box at half resolution.

    Args:
        I: Guide, (N,1,H,W).
        p: Input to filter, (N,C,H,W).
        radius: Window radius at full resolution (window 2r+1; CAP: 5, i.e. radius 2).
        eps: Regulariser (CAP: 0.003).
        s: Subsampling factor (CAP: 0.5; 1 filters at full resolution with a (2r+1)-wide box).
        backend: 'auto', 'opencv' (CPU, no gradient) or 'torch' (any device, differentiable).

    Returns:
        ``q``, shaped like ``p``.
    """
    _check(I, p, radius, eps, s)
    I = I.to(p.dtype)
    if _pick_backend(I, p, backend) == "opencv":
        return _cap_guided_opencv(I, p, radius, eps, s)
    return _cap_guided_torch(I, p, radius, eps, s)


# -------------------------------------------------------------------------------------------- the prior
def otsu_threshold(x: torch.Tensor, bins: int = 256) -> torch.Tensor:
    """Otsu's threshold per image of an (N,1,H,W) batch in [0,1], as an (N,1,1,1) tensor."""
    n = x.shape[0]
    idx = (x.detach().reshape(n, -1).clamp(0, 1) * (bins - 1)).round().long()
    idx = idx + torch.arange(n, device=x.device).view(-1, 1) * bins
    hist = torch.bincount(idx.flatten(), minlength=n * bins).view(n, bins).to(torch.float64)
    prob = hist / hist.sum(1, keepdim=True)
    levels = torch.arange(bins, device=x.device, dtype=torch.float64) / (bins - 1)
    w0 = prob.cumsum(1)
    mu = (prob * levels).cumsum(1)
    between = (mu[:, -1:] * w0 - mu) ** 2 / (w0 * (1 - w0)).clamp(min=1e-12)
    # Thresholds in an empty gap between the modes tie; take the middle of the tie, not its lower end.
    best = between >= between.max(1, keepdim=True).values * (1 - 1e-9)
    middle = (best * levels).sum(1) / best.sum(1)
    return middle.to(x.dtype).view(n, 1, 1, 1)


def _threshold(x: torch.Tensor, threshold) -> torch.Tensor:
    if isinstance(threshold, str):
        if threshold != "otsu":
            raise ValueError(f"threshold must be a number in (0,1) or 'otsu', got {threshold!r}")
        return otsu_threshold(x)
    return torch.as_tensor(threshold, dtype=x.dtype, device=x.device)


def lung_mask(x: torch.Tensor, threshold=0.5, min_area: float = 0.004, close: float = 0.03) -> torch.Tensor:
    """Lung mask: the dark region inside the body, without outside air or small parts, closed, holes filled.

    Connected components run with SciPy on the CPU; the mask comes back on ``x``'s device.

    Args:
        x: Images (N,1,H,W) in [0,1].
        threshold: Dark-region threshold, a number or 'otsu' (per image).
        min_area: Components smaller than this fraction of the image are dropped (trachea, bowel gas, noise).
        close: Radius, as a fraction of the image side, of a morphological closing that bridges vessels
            entering from the hilum and opacities on the pleura (which are brighter than the threshold); 0
            turns it off.

    Returns:
        A bool tensor (N,1,H,W).
    """
    from scipy import ndimage

    dark = (x <= _threshold(x, threshold)).detach().cpu().numpy()[:, 0]
    out = np.zeros_like(dark)
    min_pixels = min_area * dark[0].size
    k = round(close * dark.shape[-1])
    disk = np.hypot(*np.mgrid[-k : k + 1, -k : k + 1]) <= k
    for i, d in enumerate(dark):
        labels, count = ndimage.label(d)
        if count == 0:
            continue
        # Outside air touches the border of the image; the lungs do not.
        border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        sizes = ndimage.sum_labels(np.ones_like(d), labels, index=np.arange(1, count + 1))
        keep = np.zeros(count + 1, dtype=bool)
        keep[1:] = sizes >= min_pixels
        keep[border] = False
        mask = keep[labels]
        if k > 0:  # pad so that the closing does not stick to the image border
            mask = ndimage.binary_closing(np.pad(mask, k), disk)[k:-k, k:-k]
        out[i] = ndimage.binary_fill_holes(mask)
    return torch.from_numpy(out).unsqueeze(1).to(x.device)


def lung_prior(
    x: torch.Tensor,
    threshold=0.5,
    radius: int = 2,
    eps: float = 0.003,
    s: float = 0.5,
    with_mask: bool = True,
    backend: str = "auto",
    view: str = "cap",
):
    """The lung-cavity prior view of a batch and its lung mask.

    Defaults follow CAP's public code: threshold 0.5 (G <= 127 on 8-bit data), window 5 (radius 2), eps 0.003,
    subsampling s = 0.5, and CAP's own filter and composition (``view="cap"``; see the module docstring).

    Args:
        x: Images (N,1,H,W) in [0,1].
        threshold: Dark-region threshold, a number or 'otsu' (per image): dark is ``x <= threshold``.
        radius: Guided-filter radius.
        eps: Guided-filter regulariser.
        s: Subsampling factor of the fast guided filter (1 = exact).
        with_mask: Also compute the lung mask (SciPy, CPU); False returns None in its place.
        backend: Guided-filter backend ('auto', 'opencv', 'torch').
        view: A registered prior view: ``"cap"`` (CAP's code) or ``"package"`` (the earlier variant).

    Returns:
        ``(x_aug, lung_mask)``: x_aug in [0, 1] (``"cap"``: the bright part plus the filtered dark part,
        everywhere; ``"package"``: x outside the dark region, the filtered interior inside it); lung_mask is
        bool (N,1,H,W) or None.
    """
    if x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"lung_prior takes grey images (N,1,H,W), got {tuple(x.shape)}")
    make_view = PRIOR_VIEWS[view]
    threshold = _threshold(x, threshold)  # once: Otsu's is a histogram per image
    dark = x <= threshold
    x_aug = make_view(x, dark, radius, eps, s, backend)
    return x_aug, (lung_mask(x, threshold) if with_mask else None)


def flip_equivariant(view: str) -> bool:
    """Whether a registered prior view commutes with flips (the dataset may then flip a precomputed view)."""
    return bool(PRIOR_VIEWS.entry(view).info.get("flip_equivariant", False))


@register_prior_view(
    "cap",
    flip_equivariant=False,
    description="CAP's code: bicubic 1/2, 2x2 box (REFLECT_101), bright part + q everywhere",
)
def _cap_view(x: torch.Tensor, dark: torch.Tensor, radius: int, eps: float, s: float, backend: str):
    p = torch.where(dark, x, torch.zeros_like(x))
    q = cap_guided_filter(x, p, radius, eps, s=s, backend=backend).to(x.device)
    return (torch.where(dark, torch.zeros_like(x), x) + q).clamp(0, 1)


@register_prior_view(
    "package",
    flip_equivariant=True,
    description="earlier variant: bilinear 1/2, 3x3 box (REFLECT), filtered dark part only",
)
def _package_view(x: torch.Tensor, dark: torch.Tensor, radius: int, eps: float, s: float, backend: str):
    p = torch.where(dark, x, torch.zeros_like(x))
    q = guided_filter(x, p, radius, eps, s=s, backend=backend)
    return torch.where(dark, q.to(x.device).clamp(0, 1), x)


def dice(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Dice coefficient per image of two boolean (N,1,H,W) masks (1 where both are empty)."""
    pred, target = pred.flatten(1).float(), target.flatten(1).float()
    inter = (pred * target).sum(1)
    total = pred.sum(1) + target.sum(1)
    return torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total))
