"""Figures used across the book: sample grids with masks, and the shared plotting style.

Every figure fits the book's text column: at most ``PAGE_WIDTH`` inches wide, its text at least ``MIN_FONT``
points at that width (tests/test_figures.py draws each and checks both); grids of panels wrap into rows.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch

from .common import CLASS_NAMES
from .evaluation.saliency import for_display

PAGE_WIDTH = 7.0  # inches: the text column of the rendered book at 1280 px
MIN_FONT = 8  # points, at PAGE_WIDTH


def _panels(n: int, max_cols: int, panel_height: float, **kwargs):
    """A figure ``PAGE_WIDTH`` wide with ``n`` panels in rows of at most ``max_cols``; the unused cells are off.

    Returns:
        The figure and its ``n`` axes, in reading order.
    """
    cols = max(1, min(max_cols, n))
    rows = -(-n // cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(PAGE_WIDTH, panel_height * rows + 0.5), squeeze=False, layout="constrained", **kwargs
    )
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, list(axes.flat[:n])


def _numpy(t) -> np.ndarray:
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def _outline(ax, mask, colour: str, linewidth: float) -> None:
    """Draws a binary mask's outline, if the mask has any pixel."""
    mask = _numpy(mask).squeeze().astype(float)
    if mask.any():
        ax.contour(mask, levels=[0.5], colors=colour, linewidths=linewidth)


def plot_samples(
    images,
    labels=None,
    lung_masks=None,
    lesion_masks=None,
    n: int = 8,
    cols: int = 8,
    titles=None,
    figsize_per: float = 1.9,
):
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
    figsize_per = min(figsize_per, PAGE_WIDTH / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(figsize_per * cols, figsize_per * rows + 0.2), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        ax = axes.flat[i]
        ax.imshow(_numpy(images[i]).squeeze(), cmap="gray", vmin=0, vmax=1)
        for masks, colour in ((lung_masks, "cyan"), (lesion_masks, "red")):
            if masks is not None:
                _outline(ax, masks[i], colour, 0.7)
        if titles is not None:
            ax.set_title(titles[i], fontsize=8)
        elif labels is not None:
            ax.set_title(CLASS_NAMES[int(labels[i])], fontsize=8)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------ guided filter and lung prior
def plot_image_grid(
    panels,
    row_labels=None,
    col_labels=None,
    cmap="gray",
    vmin=0.0,
    vmax=1.0,
    colorbar=False,
    title=None,
    figsize_per=1.9,
):
    """A table of images with row and column labels, e.g. rows = guided-filter radius, columns = eps.

    Args:
        panels: A list of rows, each a list of images ((S,S) or (1,S,S), arrays or tensors; bool is shown
            black/white); None leaves a cell blank.
        row_labels: Optional label per row, written left of it.
        col_labels: Optional title per column.
        cmap: Colour map, one for all columns or a list with one per column.
        vmin: Lower end of the display range, one value or one per column.
        vmax: Upper end of the display range, one value or one per column.
        colorbar: Draw a colour bar right of a column: a bool for all columns or one per column.
        title: Optional figure title.
        figsize_per: Inches per panel, at most: the grid shrinks to fit ``PAGE_WIDTH``.

    Returns:
        The matplotlib figure; its first ``rows x cols`` axes are the grid's, row by row.
    """
    rows, cols = len(panels), max(len(row) for row in panels)

    def per_column(value):
        return list(value) if isinstance(value, (list, tuple)) else [value] * cols

    cmaps, vmins, vmaxs, bars = per_column(cmap), per_column(vmin), per_column(vmax), per_column(colorbar)
    extra = (0.3 if row_labels is not None else 0) + 0.6 * sum(map(bool, bars))
    figsize_per = min(figsize_per, (PAGE_WIDTH - extra) / cols)
    width = figsize_per * cols + extra
    height = figsize_per * rows + (0.3 if col_labels is not None else 0) + (0.3 if title else 0)
    fig, axes = plt.subplots(rows, cols, figsize=(width, height), squeeze=False, layout="constrained")
    for r in range(rows):
        for c in range(cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            ax.spines[:].set(color="0.75", linewidth=0.5)
            image = panels[r][c] if c < len(panels[r]) else None
            if image is None:
                continue
            shown = ax.imshow(_numpy(image).squeeze().astype(float), cmap=cmaps[c], vmin=vmins[c], vmax=vmaxs[c])
            if bars[c] and r == rows - 1:
                fig.colorbar(shown, ax=axes[:, c], shrink=0.8, aspect=30)
        if row_labels is not None:
            axes[r, 0].set_ylabel(row_labels[r], fontsize=9)
    for c, label in enumerate(col_labels or []):
        axes[0, c].set_title(label, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def plot_prior_views(x, p, q, x_aug, lung_masks=None, row_labels=None, figsize_per=1.9):
    """The lung-cavity prior step by step, one row per slice: x | p | q | x_aug | lung mask.

    Every panel uses the image's [0, 1] grey scale (q outside it saturates); the lung mask is filled in cyan
    over x.

    Args:
        x: Images (N,1,S,S) in [0,1].
        p: Guided-filter inputs (x on the dark region, 0 elsewhere), like x.
        q: Guided-filter outputs, like x.
        x_aug: Prior views, like x.
        lung_masks: Optional bool (N,1,S,S); None drops the last column.
        row_labels: Optional label per slice.
        figsize_per: Inches per panel.

    Returns:
        The matplotlib figure.
    """
    from matplotlib.colors import ListedColormap

    cols = ["x", "p: x on the dark region", "q: guided filter of p", "prior view x_aug", "lung mask"]
    panels = [[x[i], p[i], q[i], x_aug[i]] + ([x[i]] if lung_masks is not None else []) for i in range(len(x))]
    fig = plot_image_grid(panels, row_labels, cols[: len(panels[0])], figsize_per=figsize_per)
    axes = np.array(fig.axes[: len(panels) * len(panels[0])]).reshape(len(panels), len(panels[0]))
    if lung_masks is not None:
        for i in range(len(x)):
            mask = _numpy(lung_masks[i]).squeeze().astype(bool)
            axes[i, -1].imshow(np.ma.masked_where(~mask, mask.astype(float)), cmap=ListedColormap(["cyan"]), alpha=0.4)
    return fig


def plot_mask_comparison(
    images, pred, target, lesion_masks=None, titles=None, n: int = 6, cols: int = 6, figsize_per: float = 1.9
):
    """Slices with a computed lung mask (yellow) beside the ground truth (cyan) and lesions (red), all outlined.

    Args:
        images: (N,1,S,S) in [0,1].
        pred: Computed masks, bool (N,1,S,S).
        target: Ground-truth lung masks, bool (N,1,S,S).
        lesion_masks: Optional ground-truth lesion masks.
        titles: Optional title per slice.
        n: How many of the first slices to show.
        cols: Grid columns.
        figsize_per: Inches per panel.

    Returns:
        The matplotlib figure.
    """
    fig = plot_samples(
        images, lung_masks=target, lesion_masks=lesion_masks, n=n, cols=cols, titles=titles, figsize_per=figsize_per
    )
    for i, ax in enumerate(fig.axes[: min(n, len(images))]):
        _outline(ax, pred[i], "yellow", 0.7)
    fig.text(
        0.5, 0.0, "cyan: ground-truth lung, yellow: computed mask, red: lesions", ha="center", va="top", fontsize=9
    )
    return fig


# --------------------------------------------------------------------------------------- adversarial attacks
def plot_accuracy_vs_eps(table, metric: str = "accuracy", ax=None, title: str | None = None):
    """A metric against the attack radius, one line per condition (seaborn).

    Args:
        table: Long table with ``condition``, ``eps_value`` and ``metric`` columns, e.g. from
            ``robustmed_lite.evaluation.metrics.accuracy_vs_eps``.
        metric: The column to plot.
        ax: Optional axes to draw into.
        title: Optional title.

    Returns:
        The matplotlib figure.
    """
    import seaborn as sns

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.8))
    data = table.assign(eps_255=table["eps_value"] * 255)
    sns.lineplot(
        data=data, x="eps_255", y=metric, hue="condition", style="condition", markers=True, dashes=False, ax=ax
    )
    ax.set_xlabel("eps (k/255, L-inf)")
    ax.set_ylabel(metric)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xticks(sorted(data["eps_255"].unique()))
    ax.grid(alpha=0.3)
    ax.legend(title=None, fontsize=8, frameon=False)
    if title:
        ax.set_title(title)
    ax.figure.tight_layout()
    return ax.figure


def plot_adversarial(image, adversarials: dict, probs: dict | None = None, figsize_per: float = 2.1):
    """A clean slice beside adversarial versions of it (top) and their perturbations, amplified (bottom).

    Each perturbation is shown on a diverging scale (red brighter, blue darker) stretched to its own largest
    change, which the panel's title states: an 8/255 perturbation is invisible at the images' own scale.

    Args:
        image: The clean slice, (1,S,S) or (S,S) in [0,1].
        adversarials: Title -> adversarial slice of the same shape.
        probs: Optional title -> P(COVID) shown in the titles; the key ``"clean"`` for the clean slice.
        figsize_per: Inches per panel.

    Returns:
        The matplotlib figure.
    """
    clean = _numpy(image).squeeze()
    cols = 1 + len(adversarials)
    figsize_per = min(figsize_per, PAGE_WIDTH / cols)
    fig, axes = plt.subplots(2, cols, figsize=(figsize_per * cols, 2 * figsize_per + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")

    def titled(name):
        return name if probs is None or name not in probs else f"{name}\nP(COVID) = {probs[name]:.2f}"

    axes[0, 0].imshow(clean, cmap="gray", vmin=0, vmax=1)
    axes[0, 0].set_title(titled("clean"), fontsize=8)
    axes[1, 0].text(
        0.5,
        0.5,
        "perturbation\nx_adv - x,\neach panel stretched\nto its largest change",
        ha="center",
        va="center",
        fontsize=8,
        transform=axes[1, 0].transAxes,
    )
    for j, (name, adv) in enumerate(adversarials.items(), start=1):
        adv = _numpy(adv).squeeze()
        delta = adv - clean
        vlim = max(float(np.abs(delta).max()), 1e-8)
        axes[0, j].imshow(adv, cmap="gray", vmin=0, vmax=1)
        axes[0, j].set_title(titled(name), fontsize=8)
        axes[1, j].imshow(delta, cmap="seismic", vmin=-vlim, vmax=vlim)
        axes[1, j].set_title(f"±{vlim * 255:.2g}/255 (×{0.5 / vlim:.0f})", fontsize=8)
    fig.tight_layout()
    return fig


# -------------------------------------------------------------------------------------- weight perturbation
def _short_layer(name: str) -> str:
    return name.removeprefix("backbone.").removesuffix(".weight")


def plot_flat_sharp_minima(gamma: float = 0.25, shift: float = 0.12, ax=None):
    """A 1-D cartoon: a sharp and a flat minimum of equal depth, the worst loss within +-gamma of each, and the
    same landscape shifted a little (the test or adversarial loss).

    Args:
        gamma: Half-width of the weight neighbourhood.
        shift: Horizontal shift of the dashed landscape.
        ax: Optional axes.

    Returns:
        The matplotlib figure.
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.4))
    centres, widths = (-1.0, 1.2), (0.18, 0.8)

    def loss(w):
        w = np.asarray(w, dtype=float)
        return np.minimum(*[((w - c) / s) ** 2 for c, s in zip(centres, widths)]) * 0.25

    w = np.linspace(-2.0, 3.0, 1000)
    ax.plot(w, loss(w), color="C0", label="training loss")
    ax.plot(w, loss(w - shift), color="C1", ls="--", label=f"shifted by {shift} (test or adversarial loss)")
    ax.plot([], [], color="C3", lw=4, label=f"weights within ±{gamma} of a minimum")
    for c, name in zip(centres, ("sharp", "flat")):
        window = np.linspace(c - gamma, c + gamma, 50)
        worst = loss(window).max()
        ax.fill_between(window, 0, loss(window), color="C3", alpha=0.25)
        ax.plot([c - gamma, c + gamma], [0.02, 0.02], color="C3", lw=4, solid_capstyle="butt")
        ax.annotate(
            f"{name} minimum\nworst loss within ±{gamma}: {worst:.2f}\nshifted loss at the minimum: "
            f"{float(loss(c - shift)):.2f}",
            (c, worst),
            xytext=(c + 0.35, 1.3),
            fontsize=8,
            arrowprops=dict(arrowstyle="->", color="0.4"),
        )
    ax.set_ylim(0, 2.2)
    ax.set_xlabel("weight w")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8, frameon=False, loc="upper left")
    ax.figure.tight_layout()
    return ax.figure


def plot_layer_noise(
    table, value: str = "noise_norm", ax=None, title: str | None = None, log: bool = False, xlabel: str | None = None
):
    """Per-layer bars of a weight-noise statistic, one colour per kind of noise (seaborn).

    Args:
        table: Long table with columns ``layer`` (parameter names, in model order), ``kind`` and ``value``.
        value: The column to plot.
        ax: Optional axes.
        title: Optional title.
        log: Logarithmic value axis.
        xlabel: Axis label (default: the column name).

    Returns:
        The matplotlib figure.
    """
    import seaborn as sns

    data = table.assign(layer=table["layer"].map(_short_layer))
    order = list(dict.fromkeys(data["layer"]))
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 0.22 * len(order) + 1.2))
    sns.barplot(data=data, y="layer", x=value, hue="kind", order=order, orient="h", ax=ax)
    ax.set_ylabel(None)
    ax.set_xlabel(xlabel or value)
    ax.tick_params(axis="y", labelsize=MIN_FONT)
    if log:
        ax.set_xscale("log")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(title=None, fontsize=8, frameon=False)
    if title:
        ax.set_title(title, fontsize=10)
    ax.figure.tight_layout()
    return ax.figure


def plot_weight_sensitivity(
    table, condition: str = "clean", ax=None, title: str | None = None, relative: bool = False, legend: bool = True
):
    """Accuracy against the relative weight-noise size gamma, one line per method, band = +-1 standard
    deviation over the random directions (seaborn).

    Args:
        table: Long table from ``weight_perturbation.weight_sensitivity`` with a ``method`` column added (several
            models stacked).
        condition: Which rows to plot (``"clean"`` or an attack's name).
        ax: Optional axes.
        title: Optional title.
        relative: Plot the change from each method's accuracy at gamma = 0 instead of the accuracy.
        legend: Draw the legend.

    Returns:
        The matplotlib figure.
    """
    import seaborn as sns

    if ax is None:
        _, ax = plt.subplots(figsize=(5.5, 3.8))
    data = table[table["condition"] == condition]
    y = "accuracy"
    if relative:
        base = data[data["gamma"] == 0].groupby("method")["accuracy"].mean()
        data = data.assign(change=data["accuracy"] - data["method"].map(base))
        y = "change"
    sns.lineplot(
        data=data,
        x="gamma",
        y=y,
        hue="method",
        style="method",
        markers=True,
        dashes=False,
        errorbar="sd",
        ax=ax,
        legend=legend,
    )
    ax.set_xlabel("gamma  (||noise_l|| / ||w_l||, every layer)")
    if relative:
        ax.set_ylabel(f"{condition} accuracy - accuracy at gamma 0")
        ax.axhline(0, color="0.5", lw=0.8)
    else:
        ax.set_ylabel(f"{condition} accuracy")
        ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(title=None, fontsize=8, frameon=False)
    if title:
        ax.set_title(title, fontsize=10)
    ax.figure.tight_layout()
    return ax.figure


def plot_training_curves(
    history,
    selected: dict | None = None,
    metrics=(
        ("train_loss", "training loss (each method's own objective)"),
        ("val_clean", "validation clean accuracy"),
        ("val_robust", "validation PGD accuracy"),
    ),
):
    """Per-epoch curves from the trainer's logs, one panel per metric, one line per method (seaborn).

    Args:
        history: Long table with ``method``, ``epoch`` and the metric columns (e.g. the runs' ``history`` rows
            stacked, or their ``log.csv`` files).
        selected: Optional method -> epoch of the checkpoint chosen on validation, circled in the panels.
        metrics: (column, panel title) pairs.

    Returns:
        The matplotlib figure.
    """
    import seaborn as sns

    fig, axes = _panels(len(metrics), 2, 2.6)
    methods = list(dict.fromkeys(history["method"]))
    palette = dict(zip(methods, sns.color_palette(n_colors=len(methods))))
    for ax, (column, label) in zip(axes, metrics):
        sns.lineplot(data=history, x="epoch", y=column, hue="method", palette=palette, marker="o", ax=ax, legend=False)
        for method, epoch in (selected or {}).items():
            row = history[(history["method"] == method) & (history["epoch"] == epoch)]
            if column.startswith("val") and len(row):
                ax.scatter(
                    epoch,
                    row[column].iloc[0],
                    s=160,
                    facecolors="none",
                    edgecolors=palette[method],
                    linewidths=1.5,
                    zorder=5,
                )
        ax.set_title(label, fontsize=10)
        ax.set_ylabel(None)
        ax.set_xticks(sorted(history["epoch"].unique()))
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=palette[m], marker="o", label=m) for m in methods]
    note = "circles: the checkpoint each method's\ncomparison uses, chosen on validation" if selected else None
    fig.legend(
        handles=handles,
        loc="outside lower center",
        ncols=min(4, len(methods)),
        frameon=False,
        fontsize=9,
        title=note,
        title_fontsize=9,
    )
    return fig


def plot_corruption_heatmap(table, models=None):
    """Accuracy per corruption (rows) and severity (columns), one heatmap per model (two per row), shared colour
    scale.

    Args:
        table: ``ood.corruption_table``'s long table.
        models: Models to show, in order (default: all).

    Returns:
        The matplotlib figure.
    """
    import seaborn as sns

    models = list(models or dict.fromkeys(table["model"]))
    corrupted = table[table["severity"] > 0]
    order = list(dict.fromkeys(corrupted["corruption"]))
    fig, axes = _panels(len(models), 2, 0.24 * len(order) + 1.0, sharey=True)
    for i, (ax, model) in enumerate(zip(axes, models)):
        rows = corrupted[corrupted["model"] == model]
        grid = rows.pivot(index="corruption", columns="severity", values="accuracy").loc[order]
        clean = table[(table["model"] == model) & (table["severity"] == 0)]["accuracy"].iloc[0]
        sns.heatmap(
            grid,
            ax=ax,
            vmin=0,
            vmax=1,
            cmap="viridis",
            annot=True,
            fmt=".2f",
            annot_kws={"size": MIN_FONT},
            cbar=i == len(models) - 1,
            cbar_kws={"label": "accuracy"},
        )
        ax.set_title(f"{model} (clean {clean:.2f})", fontsize=9)
        ax.set_xlabel("severity")
        ax.set_ylabel("" if i % 2 else "corruption")
    fig.suptitle(f"Accuracy under corruption (n = {int(table['n'].iloc[0])})", fontsize=10)
    return fig


def plot_shift_bars(table, metric: str = "accuracy", ax=None):
    """Grouped bars of a metric per model and domain (``ood.shift_table``), one panel per setting if present.

    Returns:
        The matplotlib figure.
    """
    import seaborn as sns

    settings = list(dict.fromkeys(table["setting"])) if "setting" in table else [None]
    if ax is None:
        fig, axes = _panels(len(settings), 2, 3.2)
    else:
        fig, axes = ax.figure, [ax]
    for ax, setting in zip(axes, settings):
        rows = table if setting is None else table[table["setting"] == setting]
        sns.barplot(rows, x="model", y=metric, hue="domain", ax=ax)
        for container in ax.containers:
            ax.bar_label(container, fmt="%.2f", fontsize=MIN_FONT)
        ax.set_ylim(0, 1.05)
        ax.set_title(setting or "", fontsize=9)
        ax.legend(fontsize=MIN_FONT, loc="lower left")
    return fig


def plot_threshold_sweep(sweeps: dict, threshold: float = 0.5):
    """Sensitivity (solid) and specificity (dashed) against the decision threshold, one panel per model, one
    colour per domain (``metrics.threshold_sweep`` tables), with the values at ``threshold`` marked.

    Args:
        sweeps: ``{model: {domain: sweep table}}``.
        threshold: The threshold to mark (the argmax rule is 0.5).

    Returns:
        The matplotlib figure.
    """
    fig, axes = _panels(len(sweeps), 3, 2.6, sharey=True)
    for ax, (model, by_domain) in zip(axes, sweeps.items()):
        for colour, (domain, table) in enumerate(by_domain.items()):
            t = table["threshold"].to_numpy()
            at = int(np.abs(t - threshold).argmin())
            for column, style in (("sensitivity", "-"), ("specificity", "--")):
                values = table[column].to_numpy()
                ax.plot(t, values, style, color=f"C{colour}", lw=1.2, label=f"{domain}: {column}")
                ax.plot(t[at], values[at], "o", color=f"C{colour}", ms=4)
        ax.axvline(threshold, color="grey", lw=0.8, ls=":")
        ax.set_title(f"{model}, threshold {threshold:.2f}", fontsize=9)
        ax.set_xlabel("threshold on p(COVID)", fontsize=8)
        ax.set_ylim(-0.02, 1.02)
    axes[0].set_ylabel("sensitivity / specificity", fontsize=8)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=2, fontsize=MIN_FONT)
    return fig


def plot_corruption_predictions(image, label: int, corrupted: dict, p_covid: dict):
    """A slice under corruptions, four panels a row, each titled with every model's p(COVID) (a tick where the
    prediction is right at the 0.5 threshold).

    Args:
        image: The clean slice, (1, H, W) or (H, W).
        label: Its true class (1 = COVID).
        corrupted: ``{panel title: corrupted slice}``, in panel order.
        p_covid: ``{model: {panel title or "clean": p(COVID)}}``.

    Returns:
        The matplotlib figure.
    """
    panels = {"clean": image, **corrupted}
    fig, axes = _panels(len(panels), 4, PAGE_WIDTH / 4 + 0.2 * len(p_covid) + 0.3)
    for ax, (title, panel) in zip(axes, panels.items()):
        ax.imshow(_numpy(panel).squeeze(), cmap="gray", vmin=0, vmax=1)
        ax.set_axis_off()
        lines = [
            f"{model}: {probs[title]:.2f} {'✓' if (probs[title] > 0.5) == bool(label) else '✗'}"
            for model, probs in p_covid.items()
        ]
        ax.set_title(f"{title}\n" + "\n".join(lines), fontsize=MIN_FONT)
    fig.suptitle(f"p(COVID) per model; the slice is {CLASS_NAMES[label]}", fontsize=9)
    return fig


# ------------------------------------------------------------------------------------ where the models look
def plot_saliency_grid(
    images,
    maps_by_column: dict,
    lung_masks=None,
    lesion_masks=None,
    row_labels=None,
    alpha: float = 0.55,
    cmap: str = "inferno",
    figsize_per: float = 1.7,
    title=None,
):
    """Slices (rows) by models or methods (columns): each saliency map over its slice, scaled to its own
    maximum, with lung (cyan) and lesion (red) outlines. The first column shows the slice alone.

    Args:
        images: (N,1,S,S) in [0,1].
        maps_by_column: Column title -> (N,1,S,S) maps (e.g. one per model).
        lung_masks: Optional bool (N,1,S,S), outlined in cyan.
        lesion_masks: Optional bool (N,1,S,S), outlined in red.
        row_labels: Optional label per slice.
        alpha: Opacity of the maps.
        cmap: Colour map of the maps.
        figsize_per: Inches per panel.
        title: Optional figure title.

    Returns:
        The matplotlib figure.
    """
    cols = ["slice"] + list(maps_by_column)
    n = len(images)
    figsize_per = min(figsize_per, PAGE_WIDTH / len(cols))
    fig, axes = plt.subplots(
        n, len(cols), figsize=(figsize_per * len(cols), figsize_per * n + 0.4), squeeze=False, layout="constrained"
    )
    for i in range(n):
        for j, col in enumerate(cols):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            ax.imshow(_numpy(images[i]).squeeze(), cmap="gray", vmin=0, vmax=1)
            if j:
                ax.imshow(
                    _numpy(for_display(maps_by_column[col][i : i + 1])).squeeze(),
                    cmap=cmap,
                    vmin=0,
                    vmax=1,
                    alpha=alpha,
                )
            for masks, colour in ((lung_masks, "cyan"), (lesion_masks, "red")):
                if masks is not None:
                    _outline(ax, masks[i], colour, 0.6)
            if i == 0:
                ax.set_title(col, fontsize=8)
        if row_labels is not None:
            axes[i, 0].set_ylabel(row_labels[i], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def plot_attention_ratios(
    ratios,
    metrics=(
        ("lung_ratio", "lung_area", "lung-attention ratio"),
        ("lesion_ratio", "lesion_area", "lesion-attention ratio"),
        ("pointing", None, "pointing game (lesions)"),
    ),
    errorbar=("ci", 95),
    title=None,
):
    """Bars of mean saliency ratios per method (x) and model (colour), with error bars, and the score of a
    uniform map (the mask's mean area) as a dashed line (seaborn).

    Args:
        ratios: ``saliency.attention_ratios``' per-image table.
        metrics: (column, chance-level column or None, panel title); columns absent from the table are skipped.
        errorbar: seaborn's error bar: the default is a 95 % bootstrap interval of the mean over slices (seed 0);
            "sd" shows the spread over slices instead.
        title: Optional figure title.

    Returns:
        The matplotlib figure.
    """
    import seaborn as sns

    metrics = [m for m in metrics if m[0] in ratios]
    fig, axes = _panels(len(metrics), 2, 3.0)
    for k, (ax, (column, chance, label)) in enumerate(zip(axes, metrics)):
        data = ratios.dropna(subset=[column])
        sns.barplot(data=data, x="method", y=column, hue="model", errorbar=errorbar, seed=0, ax=ax, legend=k == 0)
        if chance is not None:
            ax.axhline(
                data[chance].mean(), color="0.3", ls="--", lw=1, label=f"uniform map ({data[chance].mean():.2f})"
            )
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{label} (n = {data['image'].nunique()})", fontsize=9)
        ax.set_xlabel(None)
        ax.set_ylabel(None)
        ax.tick_params(axis="x", labelsize=MIN_FONT, rotation=20)
        ax.grid(axis="y", alpha=0.3)
        if chance is not None or k == 0:
            ax.legend(fontsize=MIN_FONT, frameon=False, loc="upper right")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def plot_noise_magnitudes(table, title=None):
    """Weight noise on the attention projections: per head (heatmap, ||noise|| / ||weight|| over the head's
    slice of q, k, v or proj) and per part (bars, the same ratio over all heads of q, k, v or proj).

    Args:
        table: ``saliency.attention_noise_magnitudes(..., by="head")``.
        title: Optional figure title.

    Returns:
        The matplotlib figure.
    """
    import seaborn as sns

    data = table.assign(row=table["block"].map(_short_layer) + " " + table["part"])
    order = list(dict.fromkeys(data["row"]))
    grid = data.pivot(index="row", columns="head", values="relative").loc[order]
    squares = data.assign(n2=data["noise_norm"] ** 2, w2=data["weight_norm"] ** 2).groupby("row", sort=False)
    per_layer = (squares["n2"].sum() / squares["w2"].sum()) ** 0.5
    fig, (left, right) = plt.subplots(
        1,
        2,
        figsize=(PAGE_WIDTH, 0.32 * len(order) + 1.4),
        sharey=True,
        gridspec_kw={"width_ratios": [1.3, 1]},
        layout="constrained",
    )
    sns.heatmap(grid, ax=left, annot=True, fmt=".2g", annot_kws={"size": MIN_FONT}, cmap="magma", cbar=False)
    left.set_title("per head: ||noise|| / ||weight||", fontsize=9)
    left.set_ylabel(None)
    left.tick_params(axis="y", labelsize=MIN_FONT)
    # The heatmap's rows are centred at i + 0.5; the bars share its (inverted) axis.
    right.barh(np.arange(len(order)) + 0.5, per_layer.loc[order].to_numpy(), height=0.6, color="C0")
    right.set_title("per part, all heads: ||noise|| / ||weight||", fontsize=9)
    right.grid(axis="x", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


# ------------------------------------------------------------------------------------------ the reproduction
REPRODUCTION_PANELS = (
    ("clean_accuracy", "natural accuracy"),
    ("pgd10_train_eps", "PGD-10, training eps"),
    ("ensemble_train_eps", "ensemble, training eps"),
    ("ensemble_8_255", "ensemble, 8/255"),
    ("corruption_cap15", "CAP's 15 corruptions"),
    ("corruption_ct", "CT-physics corruptions"),
    ("ood_mean_accuracy", "OOD mean"),
)


def plot_reproduction_bars(table, panels=REPRODUCTION_PANELS, extra_domains: bool = True):
    """Mean over seeds with 95% t-interval error bars, one panel per metric, one bar per method.

    Args:
        table: ``reproduce``'s ``table.csv`` (name, metric, mean, ci_low, ci_high, n_seeds).
        panels: (metric, title) pairs; metrics missing from the table are skipped.
        extra_domains: Also draw each other-site domain's accuracy.

    Returns:
        The matplotlib figure.
    """
    panels = list(panels)
    if extra_domains:
        domains = [m for m in dict.fromkeys(table["metric"]) if m.endswith("_balanced_accuracy")]
        panels += [
            (m.replace("_balanced_accuracy", "_accuracy"), m.replace("_balanced_accuracy", "") + " accuracy")
            for m in domains
        ]
    panels = [(m, t) for m, t in panels if m in set(table["metric"])]
    names = list(dict.fromkeys(table["name"]))
    fig, axes = _panels(len(panels), 3, 2.4)
    colours = plt.get_cmap("tab10")
    for ax, (metric, title) in zip(axes, panels):
        part = table[table["metric"] == metric].set_index("name").reindex(names)
        mean = part["mean"].to_numpy(float)
        err = np.vstack([mean - part["ci_low"].to_numpy(float), part["ci_high"].to_numpy(float) - mean])
        err = np.nan_to_num(err, nan=0.0)
        ax.bar(range(len(names)), mean, yerr=err, capsize=3, color=[colours(i % 10) for i in range(len(names))])
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=MIN_FONT)
        ax.set_ylim(0, 1.02)
        ax.axhline(0.5, color="grey", lw=0.6, ls=":")
        ax.set_title(title, fontsize=9)
    n = int(table["n_seeds"].max()) if len(table) else 0
    fig.suptitle(f"Mean over {n} seeds, 95% t-interval (dotted: chance for a balanced set)", fontsize=10)
    return fig


def plot_robust_vs_clean(runs, robust: str = "ensemble_train_eps", clean: str = "clean_accuracy", ax=None):
    """Robust against natural accuracy: one small point per run, the method's mean as a large marker with its
    95% t-intervals as error bars in both directions.

    Args:
        runs: ``reproduce``'s ``runs.csv`` (name, seed and the metric columns).
        robust: Column on the y axis.
        clean: Column on the x axis.

    Returns:
        The matplotlib figure.
    """
    from .evaluation.stats import t_interval

    if ax is None:
        fig, ax = plt.subplots(figsize=(5.6, 4.4), layout="constrained")
    else:
        fig = ax.figure
    colours = plt.get_cmap("tab10")
    for i, (name, group) in enumerate(runs.groupby("name", sort=False)):
        c = colours(i % 10)
        ax.scatter(group[clean], group[robust], s=12, color=c, alpha=0.5)
        xi, yi = t_interval(group[clean]), t_interval(group[robust])
        ax.errorbar(
            xi.mean,
            yi.mean,
            xerr=None if np.isnan(xi.low) else [[xi.mean - xi.low], [xi.high - xi.mean]],
            yerr=None if np.isnan(yi.low) else [[yi.mean - yi.low], [yi.high - yi.mean]],
            fmt="o",
            ms=7,
            color=c,
            capsize=3,
            label=name,
        )
    ax.set_xlabel(f"{clean.replace('_', ' ')}")
    ax.set_ylabel(f"{robust.replace('_', ' ')}")
    ax.set_title("Robustness vs accuracy (points: seeds; markers: mean, 95% CI)", fontsize=9)
    ax.legend(fontsize=MIN_FONT, loc="best")
    return fig


def plot_paired_effects(
    effects,
    metrics=(
        ("pgd10_train_eps", "PGD-10 at the training eps"),
        ("ensemble_train_eps", "ensemble at the training eps"),
        ("clean_accuracy", "natural accuracy"),
    ),
    title: str | None = None,
):
    """Paired per-seed effects (row minus reference) with their 95% t-intervals, one panel per metric (two per
    row), one line per comparison; an interval that crosses the dotted zero line is no measured effect.

    Args:
        effects: ``fidelity``'s ``effects.csv`` (group, row, reference, metric, gain_mean, gain_ci_low,
            gain_ci_high, n_pairs).
        metrics: (metric, title) pairs; metrics missing from ``effects`` are skipped.
        title: Figure title.

    Returns:
        The matplotlib figure.
    """
    metrics = [(m, t) for m, t in metrics if m in set(effects["metric"])]
    labels = list(dict.fromkeys(f"{r} - {ref}" for r, ref in zip(effects["row"], effects["reference"])))
    fig, axes = _panels(len(metrics), 2, 0.3 * len(labels) + 0.9, sharey=True)
    for ax, (metric, panel_title) in zip(axes, metrics):
        part = (
            effects[effects["metric"] == metric]
            .assign(label=lambda d: [f"{r} - {ref}" for r, ref in zip(d["row"], d["reference"])])
            .set_index("label")
        )
        part = part.reindex(labels)
        y = np.arange(len(labels))[::-1]
        mean = part["gain_mean"].to_numpy(float)
        err = np.nan_to_num(
            np.vstack([mean - part["gain_ci_low"].to_numpy(float), part["gain_ci_high"].to_numpy(float) - mean]),
            nan=0.0,
        )
        ax.errorbar(mean, y, xerr=err, fmt="o", color="C0", capsize=3, ms=4)
        ax.axvline(0, color="grey", lw=0.8, ls=":")
        ax.set_yticks(y, labels, fontsize=MIN_FONT)
        ax.set_title(panel_title, fontsize=9)
        ax.set_xlabel("paired difference", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def interactive_figure(draw, **sliders):
    """Sliders that redraw a figure: ``draw(**values)`` returns a matplotlib figure, shown as a PNG image
    below the sliders and drawn again whenever one of them moves.

    ``ipywidgets.interact`` would show the figure in an Output widget. Executed headless (nbclient, and so the
    book build), an Output widget makes the client message the kernel while it waits for the cell's reply,
    which can stall the build until its timeout (jupyter/nbclient#312); an image widget needs no such message.

    Args:
        draw: Returns the figure for the sliders' values (it is closed after drawing).
        **sliders: ipywidgets value widgets, by the name of ``draw``'s argument they set.

    Returns:
        An ``ipywidgets.VBox`` of the sliders and the image: the last expression of a cell, or ``display`` it.
    """
    import io

    import ipywidgets

    image = ipywidgets.Image(format="png")

    def redraw(_=None):
        fig = draw(**{name: slider.value for name, slider in sliders.items()})
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", bbox_inches="tight")
        plt.close(fig)
        image.value = buffer.getvalue()

    for slider in sliders.values():
        slider.observe(redraw, names="value")
    redraw()
    return ipywidgets.VBox([*sliders.values(), image])
