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

    effects = pd.DataFrame([
        {"group": "g", "row": row, "reference": "robustmed", "metric": metric, "gain_mean": mean,
         "gain_ci_low": mean - 0.05, "gain_ci_high": mean + 0.05, "n_pairs": 3}
        for row, mean in (("robustmed+a", 0.1), ("robustmed+b", -0.2))
        for metric in ("pgd10_train_eps", "clean_accuracy")])
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

    slider = ipywidgets.IntSlider(value=1, min=0, max=3)
    box = interactive_figure(draw, level=slider)
    image = box.children[-1]
    first = image.value
    assert seen == [1] and first[:8] == b"\x89PNG\r\n\x1a\n" and box.children[0] is slider
    slider.value = 3
    assert seen == [1, 3] and image.value != first
    assert not plt.get_fignums()  # every drawn figure is closed, none shows up twice
