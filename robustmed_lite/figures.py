"""Figures used across the book: sample grids with masks, and the shared plotting style."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch

from .data import CLASS_NAMES


def _numpy(t) -> np.ndarray:
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def plot_samples(images, labels=None, lung_masks=None, lesion_masks=None, n: int = 8, cols: int = 8,
                 titles=None, figsize_per: float = 1.9):
    """A grid of slices, with lung (cyan) and lesion (red) mask outlines where given.

    Args:
        images: (N,1,S,S) or (N,S,S) in [0,1].
        labels: (N,) class indices, shown as titles.
        lung_masks: Optional (N,1,S,S) masks, outlined in cyan.
        lesion_masks: Optional (N,1,S,S) masks, outlined in red.
        n: How many of the first slices to show.
        cols: Grid columns.
        titles: Optional list of titles, overriding the labels.
        figsize_per: Inches per panel.

    Returns:
        The matplotlib figure.
    """
    n = min(n, len(images))
    rows = max(1, int(np.ceil(n / cols)))
    cols = min(cols, n)
    fig, axes = plt.subplots(rows, cols, figsize=(figsize_per * cols, figsize_per * rows + 0.2), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        ax = axes.flat[i]
        ax.imshow(_numpy(images[i]).squeeze(), cmap="gray", vmin=0, vmax=1)
        for masks, colour in ((lung_masks, "cyan"), (lesion_masks, "red")):
            if masks is not None:
                m = _numpy(masks[i]).squeeze().astype(float)
                if m.any():
                    ax.contour(m, levels=[0.5], colors=colour, linewidths=0.7)
        if titles is not None:
            ax.set_title(titles[i], fontsize=8)
        elif labels is not None:
            ax.set_title(CLASS_NAMES[int(labels[i])], fontsize=8)
    fig.tight_layout()
    return fig
