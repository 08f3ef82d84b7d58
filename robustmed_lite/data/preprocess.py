"""Site-independent framing and intensities: crop every slice to its lungs, and standardise its grey levels.

Two hospitals rarely frame and window a slice alike. The Soares set (Brazil) holds tight crops around the lungs in
one lung window; UCSD COVID-CT (China) holds whole bodies, tables and black backgrounds, in windows that change from
slice to slice. A model that has only seen the first never saw a black background. Both steps below are computed
per slice, from the slice alone (no label, no other image), and are applied identically to training, validation
and every test domain (``TrainConfig.lung_crop`` and ``TrainConfig.intensity``).

* ``lung_crop``: the bounding box of the lung mask plus a margin, made square, cut from a higher-resolution copy and
  resized. Fallback where no lung is found, or where the box would be narrower than 40% of the slice (a dark
  patch, not two lungs): the whole slice (counted in ``CropReport``).
* ``standardise`` (``intensity=``):

  - ``percentile``: the 1st and 99th percentiles of the slice go to 0 and 1;
  - ``histeq``: histogram equalisation (each pixel becomes the share of pixels at or below it);
  - ``anchor``: CT-aware. The median of the air inside the lungs and the median of the soft tissue around them
    are mapped to where a standard lung window (W 1500, L -600 HU) puts air (-1000 HU, 0.233) and soft tissue
    (+40 HU, 0.927); where no lung is found, the 5th and 95th percentiles stand in for them.

  Each is invariant to an intensity change ``a * x + b`` with ``a > 0`` (``histeq`` to any increasing map): masks
  are found on a min-max normalised copy, so they do not move either.

The threat model follows: adversarial attacks perturb the model's input, which is the prepared slice.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..method.prior import lung_mask, otsu_threshold

INTENSITY_MODES = ("none", "percentile", "histeq", "anchor")
AIR_LEVEL = (-1000 + 1350) / 1500  # air in a W 1500 / L -600 lung window
TISSUE_LEVEL = (40 + 1350) / 1500  # soft tissue (+40 HU) in the same window
CROP_MARGIN = 0.08  # of the box side, on every side
MIN_BOX = 0.4  # a lung box narrower than this share of the slice is a dark patch, not the lungs


@dataclass
class CropReport:
    """How many slices a crop could frame by their lungs, and which fell back to the whole slice."""

    n: int
    fallback: list[int]

    @property
    def n_fallback(self) -> int:
        return len(self.fallback)


def _minmax(x: torch.Tensor) -> torch.Tensor:
    """Each slice rescaled to [0, 1] by its own minimum and maximum (a flat slice becomes 0)."""
    flat = x.flatten(1)
    lo, hi = flat.min(1).values.view(-1, 1, 1, 1), flat.max(1).values.view(-1, 1, 1, 1)
    return (x - lo) / (hi - lo).clamp(min=1e-12)


def lungs(x: torch.Tensor) -> torch.Tensor:
    """The lung mask of each slice, found on its min-max normalised copy with Otsu's threshold."""
    return lung_mask(_minmax(x), threshold="otsu")


def lung_boxes(
    masks: torch.Tensor, margin: float = CROP_MARGIN, min_side: float = MIN_BOX
) -> tuple[torch.Tensor, list[int]]:
    """Square boxes (top, left, side) around each mask's pixels, with a margin, inside the image.

    A mask that is empty, or whose box would be narrower than ``min_side`` of the image (a dark patch, not two
    lungs), gets the whole image as its box.

    Returns:
        (N, 3) int64 boxes, and the indices that fell back to the whole image.
    """
    n, _, h, w = masks.shape
    boxes, empty = torch.zeros(n, 3, dtype=torch.int64), []
    for i in range(n):
        rows = masks[i, 0].any(1).nonzero().flatten()
        cols = masks[i, 0].any(0).nonzero().flatten()
        too_small = len(rows) == 0 or max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 < min_side * min(h, w)
        if too_small:
            empty.append(i)
            boxes[i] = torch.tensor([0, 0, min(h, w)])
            continue
        top, bottom, left, right = rows[0].item(), rows[-1].item() + 1, cols[0].item(), cols[-1].item() + 1
        side = max(bottom - top, right - left)
        side = min(min(h, w), round(side * (1 + 2 * margin)))
        cy, cx = (top + bottom) / 2, (left + right) / 2
        y0 = int(min(max(round(cy - side / 2), 0), h - side))
        x0 = int(min(max(round(cx - side / 2), 0), w - side))
        boxes[i] = torch.tensor([y0, x0, side])
    return boxes, empty


def lung_crop(x: torch.Tensor, size: int, margin: float = CROP_MARGIN) -> tuple[torch.Tensor, CropReport]:
    """Each slice cropped to the square box around its lungs and resized to ``size`` (antialiased bilinear).

    Args:
        x: Slices (N,1,H,W) in [0,1], ideally at a higher resolution than ``size`` (the crop then loses
            nothing).
        size: Output side in pixels.
        margin: Margin around the lungs, as a fraction of the box side.

    Returns:
        (N,1,size,size) in [0,1], and a ``CropReport`` (slices without a lung mask keep their whole frame).
    """
    if x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"lung_crop takes grey images (N,1,H,W), got {tuple(x.shape)}")
    boxes, empty = lung_boxes(lungs(x), margin)
    out = torch.empty(len(x), 1, size, size, dtype=x.dtype, device=x.device)
    for i, (top, left, side) in enumerate(boxes.tolist()):
        patch = x[i : i + 1, :, top : top + side, left : left + side]
        out[i : i + 1] = F.interpolate(
            patch, size=(size, size), mode="bilinear", align_corners=False, antialias=side > size
        ).clamp(0, 1)
    return out, CropReport(len(x), empty)


def _quantiles(x: torch.Tensor, q: list[float]) -> torch.Tensor:
    return torch.quantile(x.flatten(1).float(), torch.tensor(q, device=x.device), dim=1).T  # (N, len(q))


def _masked_median(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per slice, the median of the pixels inside the mask (NaN where the mask is empty)."""
    values = torch.where(mask, x, torch.full_like(x, float("nan"))).flatten(1)
    return values.nanmedian(1).values


def standardise(x: torch.Tensor, mode: str) -> torch.Tensor:
    """Per-slice intensity standardisation (see the module docstring); ``none`` returns ``x``.

    Args:
        x: Slices (N,1,H,W); any real range (the output is in [0, 1]).
        mode: One of ``INTENSITY_MODES``.
    """
    if mode not in INTENSITY_MODES:
        raise ValueError(f"intensity={mode!r}: choose one of {INTENSITY_MODES}")
    if mode == "none" or len(x) == 0:
        return x
    if mode == "percentile":
        q = _quantiles(x, [0.01, 0.99])
        lo, hi = q[:, 0].view(-1, 1, 1, 1), q[:, 1].view(-1, 1, 1, 1)
        return ((x - lo) / (hi - lo).clamp(min=1e-12)).clamp(0, 1)
    if mode == "histeq":
        flat = x.flatten(1)
        ranks = torch.searchsorted(flat.sort(1).values.contiguous(), flat.contiguous(), right=True)
        return (ranks.to(x.dtype) / flat.shape[1]).view_as(x)
    normalised = _minmax(x)
    mask = lung_mask(normalised, threshold="otsu")
    body = ~mask & (normalised > otsu_threshold(normalised))  # Otsu's bright class: soft tissue (and some bone)
    air, tissue = _masked_median(x, mask), _masked_median(x, body)
    q = _quantiles(x, [0.05, 0.95])
    air = torch.where(torch.isnan(air), q[:, 0], air)
    tissue = torch.where(torch.isnan(tissue) | (tissue <= air), q[:, 1], tissue)
    scale = (TISSUE_LEVEL - AIR_LEVEL) / (tissue - air).clamp(min=1e-12)
    return (AIR_LEVEL + (x - air.view(-1, 1, 1, 1)) * scale.view(-1, 1, 1, 1)).clamp(0, 1)


LUNG_REGIONS = ("all", "no_lungs", "lungs_only")


def lung_region(x: torch.Tensor, region: str) -> tuple[torch.Tensor, list[int]]:
    """The shortcut tests' inputs (DeGrave, Janizek and Lee 2021): slices without their lungs, or lungs alone.

    * ``no_lungs``: the lung mask is filled with the median of the rest of the slice;
    * ``lungs_only``: everything outside the lung mask is set to 0.

    A slice whose lungs are not found is blanked entirely (set to 0): it shows nothing either way, and is
    counted. The silhouette of the mask stays visible in both variants, which is itself a (weak) cue.

    Returns:
        The slices and the indices of those blanked.
    """
    if region not in LUNG_REGIONS:
        raise ValueError(f"lung_region={region!r}: choose one of {LUNG_REGIONS}")
    if region == "all":
        return x, []
    mask = lungs(x)
    found = mask.flatten(1).any(1)
    if region == "no_lungs":
        rest = torch.where(mask, torch.full_like(x, float("nan")), x).flatten(1).nanmedian(1).values
        out = torch.where(mask, rest.view(-1, 1, 1, 1), x)
    else:
        out = torch.where(mask, x, torch.zeros_like(x))
    out[~found] = 0
    return out, (~found).nonzero().flatten().tolist()


def source_size(size: int, crop: bool) -> int:
    """The resolution to load slices at before preparing them: twice the output for a crop (at least 128)."""
    return max(2 * size, 128) if crop else size


def prepare(
    x: torch.Tensor, size: int, crop: bool, intensity: str, region: str = "all"
) -> tuple[torch.Tensor, CropReport | None]:
    """Crop (optional), standardise and (for the shortcut tests) mask a batch of slices, output side ``size``.

    Args:
        x: Slices (N,1,H,W) in [0,1], at ``source_size(size, crop)`` or any size.
        size: Output side.
        crop: Crop to the lungs first.
        intensity: One of ``INTENSITY_MODES``.
        region: One of ``LUNG_REGIONS`` (``all``: no masking).

    Returns:
        The prepared slices and a report (None without a crop or mask): crop fallbacks, or blanked slices.
    """
    report = None
    if crop:
        x, report = lung_crop(x, size)
    elif x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(
            x, size=(size, size), mode="bilinear", align_corners=False, antialias=x.shape[-1] > size
        ).clamp(0, 1)
    x = standardise(x, intensity)
    if region != "all":
        x, blanked = lung_region(x, region)
        report = CropReport(len(x), sorted(set(blanked) | set(report.fallback if report else [])))
    return x, report


def split_spec(spec: str) -> tuple[str, str | None]:
    """``"path"`` or ``"path:split"`` (split: train, val or test of the data set's own split) -> (path, split)."""
    head, sep, tail = str(spec).rpartition(":")
    if sep and tail in ("train", "val", "test") and head:
        return head, tail
    return str(spec), None


def resolve_spec(spec: str) -> str:
    """A data spec with its folder made absolute (the split suffix kept): one name per folder."""
    path, split = split_spec(spec)
    return str(Path(path).resolve()) + (f":{split}" if split else "")


def load_domain(
    spec: str, size: int, crop: bool = False, intensity: str = "none", region: str = "all", progress: bool = False
):
    """A labelled data set, or one split of it (``"path:test"``), prepared like a run's own data.

    Returns:
        ``(images, labels, report)``: prepared (N,1,size,size) slices, labels, and the crop report (or None).
    """
    from .loaders import load_images

    path, split = split_spec(spec)
    data = load_images(path, source_size(size, crop), progress=progress)
    if split is not None:
        data = data.subset(data.splits(seed=0)[split])
    images, report = prepare(data.images, size, crop, intensity, region)
    return images, data.labels, report


def domain_label(spec: str) -> str:
    """A short name for a domain spec: the folder name, with the split if one is given."""
    path, split = split_spec(spec)
    return Path(path).name + (f" ({split})" if split else "")
