"""What each part of the method adds: ``robustmed`` with one part switched off at a time, three seeds, paired.

    python -m robustmed_lite ablation --profile cpu --data phantom   # the phantom -> results/ablation/cpu-phantom
    python -m robustmed_lite ablation --profile cpu                  # Soares -> results/ablation/cpu

Each row is ``robustmed`` with one of its switches changed (the other settings are the method's):

* ``cap`` is ``robustmed`` without the prediction feedback on the sample perturbation (``--feedback none``): the
  two methods differ in nothing else (``config.PAPER_ADDITIONS``, a test checks it), so the ablation reuses it;
* ``robustmed-prior``: no lung-prior view (``--prior false``): the soft target and the proxy's consistency term
  see the image itself;
* ``robustmed-weight_noise``: no proxy attention noise (``--weight_noise none``);
* ``robustmed-square_loss``: TRADES' cross-entropy + KL as the outer loss instead of the square loss against the
  soft target (``--loss trades``).

Every comparison is a paired per-seed difference, row minus ``robustmed``, with a 95% t-interval, on the metrics of
``METRICS``: the in-domain test split, the phantom's other site (or the other hospital's data) and the corruptions,
with checkpoints chosen on validation. The runs share their folder with the fidelity study
(``runs/fidelity/<profile>[-phantom]``), so the runs the two studies have in common (ERM, ``cap``, ``robustmed``)
train once.
"""

from __future__ import annotations

import pandas as pd

from .fidelity import run_paired_study, summarise_effects

# row -> (what it switches off, its settings)
ABLATIONS = {
    "cap": ("prediction feedback", {"method": "cap"}),
    "robustmed-prior": ("lung-prior view", {"method": "robustmed", "prior": False}),
    "robustmed-weight_noise": ("proxy attention noise", {"method": "robustmed", "weight_noise": "none"}),
    "robustmed-square_loss": ("square loss (TRADES' CE + KL instead)", {"method": "robustmed", "loss": "trades"}),
}
REFERENCE = "robustmed"
METRICS = ("clean_accuracy", "pgd10_train_eps", "ensemble_train_eps", "ood_mean_accuracy", "corruption_all")


def comparisons() -> list[tuple[str, str, str]]:
    """(what is switched off, row, reference): each a paired difference row minus ``robustmed``."""
    return [(off, row, REFERENCE) for row, (off, _) in ABLATIONS.items()]


def summarise_ablation(runs: pd.DataFrame) -> pd.DataFrame:
    """The paired effects of switching each part off, on ``METRICS`` (rows without runs are left out)."""
    return summarise_effects(runs, comparisons(), METRICS)


def run_ablation(profile: str = "cpu", **options) -> dict[str, pd.DataFrame]:
    """Trains the ablation's rows and writes ``effects.csv`` and ``table.md`` to ``out`` (default
    ``results/ablation/<profile>[-phantom]``; every run's row and the table of means in its ``all_runs``, as
    ``reproduce`` writes them).

    Args:
        profile: A reproduction profile.
        **options: Those of ``run_paired_study`` (data, seeds, out, runs, jobs, progress, command, overrides):
            the runs default to the fidelity study's folder, ``runs/fidelity/<profile>[-phantom]``.
    """
    variants = {row: settings for row, (_, settings) in ABLATIONS.items() if row != "cap"}
    return run_paired_study(
        "ablation",
        "Ablation of robustmed",
        comparisons(),
        METRICS,
        profile=profile,
        methods=f"cap,{REFERENCE}",
        rows=variants,
        **options,
    )
