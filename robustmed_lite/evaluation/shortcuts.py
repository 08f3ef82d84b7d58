"""Is the model looking at the disease? Diagnosis of shortcut learning across sites.

DeGrave, Janizek and Lee (Nature Machine Intelligence, 2021) showed that COVID-19 classifiers trained on data
pooled from different sources learn the sources (laterality markers, text, framing, windowing) instead of the
lungs, and fail at a new hospital. The tools here ask that question of any model and any data root:

* ``domain_report``: per domain, the share of slices predicted COVID next to the true share, accuracy, balanced
  accuracy, AUC and the expected calibration error (a model that calls most slices of a new site COVID has found
  a cue that the new site carries, not the disease);
* ``intensity_histograms`` and ``intensity_summary``: how the grey levels of the domains differ before any model
  sees them;
* lung-region tests (``TrainConfig.lung_region``, see ``preprocess.lung_region``): train and test on slices with
  the lungs removed (``no_lungs``) or with everything but the lungs removed (``lungs_only``). High accuracy without
  the lungs means the labels are predictable from outside the lungs: a shortcut the data set offers;
* ``saliency_outside``: the share of a model's input-gradient saliency that falls outside the body and outside
  the lungs.

What these can show: that a cue outside the lungs *exists* in a data set (lung-region tests) and that a model
*uses* the pixels outside the lungs (saliency mass). What they cannot show: that a model uses the right thing
*inside* the lungs; the lung masks are estimated (Otsu), so their silhouette remains in both masked variants and
slices without a found lung are blanked (counted); saliency is one explanation method among several.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from scipy import ndimage
from torch import nn

from ..data.preprocess import _minmax, lungs
from ..method.prior import otsu_threshold
from .metrics import clinical_metrics, predict_logits
from .saliency import mass_ratio, saliency


def expected_calibration_error(probs, labels, bins: int = 15) -> float:
    """ECE: the mean gap between confidence and accuracy over equal-width confidence bins, weighted by bin size.

    Args:
        probs: (N, k) class probabilities.
        labels: (N,) true classes.
        bins: Number of confidence bins on [0, 1].
    """
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    if len(labels) == 0:
        raise ValueError("ECE needs at least one prediction")
    confidence, pred = probs.max(1), probs.argmax(1)
    correct = (pred == labels).astype(np.float64)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            ece += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(ece)


def domain_report(model: nn.Module, domains: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> pd.DataFrame:
    """Per domain: n, true and predicted COVID share, accuracy, balanced accuracy, AUC, sensitivity,
    specificity and ECE of one model."""
    rows = []
    for name, (x, y) in domains.items():
        probs = predict_logits(model, x).softmax(1).numpy()
        metrics = clinical_metrics(y.numpy(), probs)
        rows.append(
            {
                "domain": name,
                "n": len(y),
                "true_covid_share": float((y == 1).float().mean()),
                "predicted_covid_share": float((probs.argmax(1) == 1).mean()),
                **metrics,
                "balanced_accuracy": (metrics["sensitivity"] + metrics["specificity"]) / 2,
                "ece": expected_calibration_error(probs, y.numpy()),
            }
        )
    return pd.DataFrame(rows)


def intensity_histograms(domains: dict[str, torch.Tensor], bins: int = 64) -> pd.DataFrame:
    """Grey-level histograms (density over [0, 1]) of each domain's images, long format."""
    edges = np.linspace(0, 1, bins + 1)
    rows = []
    for name, images in domains.items():
        density, _ = np.histogram(images.flatten().numpy(), bins=edges, density=True)
        rows += [
            {"domain": name, "intensity": (a + b) / 2, "density": d} for a, b, d in zip(edges[:-1], edges[1:], density)
        ]
    return pd.DataFrame(rows)


def intensity_summary(domains: dict[str, torch.Tensor], black: float = 0.05) -> pd.DataFrame:
    """Per domain: grey-level percentiles (1, 50, 99) and the share of near-black pixels (below ``black``), the
    outside air that a tight crop never shows."""
    rows = []
    for name, images in domains.items():
        flat = images.flatten().double().numpy()
        p1, median, p99 = np.percentile(flat, [1, 50, 99])
        rows.append(
            {
                "domain": name,
                "grey_p1": p1,
                "grey_median": median,
                "grey_p99": p99,
                "near_black_share": float((flat < black).mean()),
            }
        )
    return pd.DataFrame(rows)


def body_mask(x: torch.Tensor) -> torch.Tensor:
    """The body of each slice: the largest bright component (Otsu, on a min-max normalised copy) with its holes,
    the lungs among them, filled."""
    normalised = _minmax(x)
    bright = (normalised > otsu_threshold(normalised)).cpu().numpy()[:, 0]
    out = np.zeros_like(bright)
    for i, b in enumerate(bright):
        labels, count = ndimage.label(b)
        if count:
            sizes = ndimage.sum_labels(np.ones_like(b), labels, index=np.arange(1, count + 1))
            out[i] = ndimage.binary_fill_holes(labels == 1 + int(np.argmax(sizes)))
    return torch.from_numpy(out).unsqueeze(1)


def saliency_outside(model: nn.Module, x: torch.Tensor, method: str = "input_grad") -> pd.DataFrame:
    """Per slice, the share of saliency mass outside the body and outside the lungs, with the areas as the
    chance level (a map spread evenly would put exactly that share there).

    Returns:
        Columns ``outside_body``, ``body_area_outside``, ``outside_lungs``, ``lung_area_outside``; NaN where a
        mask was not found.
    """
    maps = saliency(model, x, method)
    body, lung = body_mask(x), lungs(x)
    return pd.DataFrame(
        {
            "outside_body": (1 - mass_ratio(maps, body)).numpy(),
            "body_area_outside": (1 - body.flatten(1).float().mean(1)).numpy(),
            "outside_lungs": (1 - mass_ratio(maps, lung)).numpy(),
            "lung_area_outside": (1 - lung.flatten(1).float().mean(1)).numpy(),
        }
    )
