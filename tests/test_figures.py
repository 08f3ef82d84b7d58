"""The book's figure helpers: what they draw, checked on the drawn objects."""

from __future__ import annotations

import matplotlib
import numpy as np
import pandas as pd
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)


def test_the_effects_figure_draws_one_interval_per_comparison_and_metric():
    from robustmed_lite.figures import plot_paired_effects

    effects = pd.DataFrame(
        [
            {
                "group": "g",
                "row": row,
                "reference": "robustmed",
                "metric": metric,
                "gain_mean": mean,
                "gain_ci_low": mean - 0.05,
                "gain_ci_high": mean + 0.05,
                "n_pairs": 3,
            }
            for row, mean in (("robustmed+a", 0.1), ("robustmed+b", -0.2))
            for metric in ("pgd10_train_eps", "clean_accuracy")
        ]
    )
    fig = plot_paired_effects(effects)
    assert len(fig.axes) == 2  # the metric missing from the effects (the ensemble) is skipped
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["robustmed+a - robustmed", "robustmed+b - robustmed"]
    points = ax.lines[0].get_xydata()
    assert sorted(points[:, 0].tolist()) == [-0.2, 0.1]
    plt.close(fig)


def test_interactive_figure_redraws_the_image_when_a_slider_moves():
    ipywidgets = pytest.importorskip("ipywidgets")
    from robustmed_lite.figures import interactive_figure

    seen = []

    def draw(level):
        seen.append(level)
        fig, ax = plt.subplots(figsize=(1, 1))
        ax.imshow(np.full((4, 4), level), vmin=0, vmax=3)
        return fig

    open_before = set(plt.get_fignums())  # under xdist, another test on this worker may have left one open
    slider = ipywidgets.IntSlider(value=1, min=0, max=3)
    box = interactive_figure(draw, level=slider)
    image = box.children[-1]
    first = image.value
    assert seen == [1] and first[:8] == b"\x89PNG\r\n\x1a\n" and box.children[0] is slider
    slider.value = 3
    assert seen == [1, 3] and image.value != first
    assert set(plt.get_fignums()) == open_before  # every drawn figure is closed, none shows up twice


def test_the_threshold_figure_marks_the_values_at_the_chosen_threshold():
    from robustmed_lite.evaluation.metrics import threshold_sweep
    from robustmed_lite.figures import plot_threshold_sweep

    labels = np.array([1, 1, 0, 0])
    sweeps = {
        "erm": {"A": threshold_sweep(labels, [0.9, 0.6, 0.4, 0.1]), "B": threshold_sweep(labels, [0.9, 0.3, 0.7, 0.1])}
    }
    fig = plot_threshold_sweep(sweeps, threshold=0.5)
    ax = fig.axes[0]
    markers = [line.get_xydata()[0] for line in ax.lines if line.get_marker() == "o"]
    # site A: sensitivity 1, specificity 1 at 0.5; site B: 0.5 and 0.5
    assert sorted(tuple(np.round(m, 2)) for m in markers) == [(0.5, 0.5), (0.5, 0.5), (0.5, 1.0), (0.5, 1.0)]
    assert "threshold 0.50" in ax.get_title()
    plt.close(fig)


def test_the_corruption_figure_titles_each_panel_with_every_models_prediction():
    import torch

    from robustmed_lite.figures import plot_corruption_predictions

    image = torch.rand(1, 16, 16)
    fig = plot_corruption_predictions(
        image,
        1,
        {"low_dose, 3": image * 0.5},
        {"erm": {"clean": 0.8, "low_dose, 3": 0.3}, "trades": {"clean": 0.6, "low_dose, 3": 0.7}},
    )
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0] == "clean\nerm: 0.80 ✓\ntrades: 0.60 ✓"
    assert titles[1] == "low_dose, 3\nerm: 0.30 ✗\ntrades: 0.70 ✓"
    plt.close(fig)


# ------------------------------------------------------------------------------ legible at the column's width
def _effects(rows: int, metrics) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "group": "g",
                "row": f"robustmed-part{i}",
                "reference": "robustmed",
                "metric": metric,
                "gain_mean": 0.01 * i,
                "gain_ci_low": -0.05,
                "gain_ci_high": 0.05,
                "n_pairs": 3,
            }
            for i in range(rows)
            for metric in metrics
        ]
    )


def _figures():
    """One figure of each layout the book draws, at the sizes that overflowed (issue 32): wide grids, many panels."""
    import torch

    from robustmed_lite import figures
    from robustmed_lite.evaluation.metrics import threshold_sweep

    image = torch.rand(8, 1, 16, 16)
    models = ["erm", "trades", "awp", "robustmed"]
    corruptions = pd.DataFrame(
        [
            {"model": m, "corruption": c, "severity": s, "accuracy": 0.5, "n": 64}
            for m in models
            for c in [f"corruption_{k}" for k in range(15)]
            for s in range(6)
        ]
    )
    table = pd.DataFrame(
        [
            {"name": m, "metric": metric, "mean": 0.7, "ci_low": 0.6, "ci_high": 0.8, "n_seeds": 3}
            for m in models
            for metric, _ in figures.REPRODUCTION_PANELS
        ]
    )
    history = pd.DataFrame(
        [
            {"method": m, "epoch": e, "train_loss": 0.5, "val_clean": 0.8, "val_robust": 0.4}
            for m in models
            for e in range(1, 4)
        ]
    )
    ratios = pd.DataFrame(
        [
            {"method": k, "model": m, "image": i, "lung_ratio": 0.5, "lung_area": 0.3, "pointing": 1.0}
            for k in ("gradient", "attention")
            for m in models
            for i in range(4)
        ]
    )
    sweep = threshold_sweep(np.array([1, 1, 0, 0]), [0.9, 0.6, 0.4, 0.1])
    metrics = ["clean_accuracy", "pgd10_train_eps", "ensemble_train_eps"]
    return {
        "samples, 8 a row": figures.plot_samples(image, n=8, cols=8),
        "image grid, 15 x 6": figures.plot_image_grid([[image[0]] * 6] * 15, [f"r{k}" for k in range(15)]),
        "adversarial, 5 columns": figures.plot_adversarial(image[0], {f"a{k}": image[k] for k in range(4)}),
        "paired effects, ablation": figures.plot_paired_effects(
            _effects(4, metrics), metrics=[(m, m) for m in metrics]
        ),
        "training curves": figures.plot_training_curves(history, selected={"erm": 2}),
        "corruption heatmap, 4 models": figures.plot_corruption_heatmap(corruptions),
        "reproduction bars": figures.plot_reproduction_bars(table, extra_domains=False),
        "attention ratios": figures.plot_attention_ratios(ratios),
        "threshold sweep, 4 models": figures.plot_threshold_sweep({m: {"A": sweep, "B": sweep} for m in models}),
        "corruption predictions, 7 panels": figures.plot_corruption_predictions(
            image[0],
            1,
            {f"c{k}": image[k] for k in range(6)},
            {m: {"clean": 0.6, **{f"c{k}": 0.4 for k in range(6)}} for m in models},
        ),
        "saliency grid, 5 columns": figures.plot_saliency_grid(image[:3], {m: image[:3] for m in models}),
    }


def test_every_figure_fits_the_column_with_text_of_at_least_8_points():
    from matplotlib.text import Text

    from robustmed_lite.figures import MIN_FONT, PAGE_WIDTH

    for name, fig in _figures().items():
        width = fig.get_size_inches()[0]
        assert width <= PAGE_WIDTH + 1e-6, f"{name}: {width:.1f} in wide"
        small = {t.get_text() for t in fig.findobj(Text) if t.get_text().strip() and t.get_fontsize() < MIN_FONT}
        assert not small, f"{name}: text below {MIN_FONT} pt: {sorted(small)[:5]}"
        plt.close(fig)
