"""Runs the chapters train or restore: one call trains a method at a preset (or restores the shipped run) and
returns its validation-chosen checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from ..checkpoints import load_checkpoint, model_from_checkpoint, selected_checkpoint_name
from ..common import format_eps
from ..config import SIZE_KEYS, load_config
from ..evaluation.metrics import accuracy, adversarial_examples
from ..trainer import Trainer
from .bookruns import REGENERATE, restore


def train_or_load(
    method: str,
    preset: str = "cpu-demo",
    root: str = "runs/book",
    seed: int = 0,
    overrides: dict | None = None,
    progress: bool = True,
    shipped: bool = False,
) -> Trainer:
    """Trains a method once and reuses the run afterwards (a finished run trains nothing, an interrupted one
    resumes), so several notebooks and commands can share the same models. With ``shipped``, a run the package
    ships with exactly this config (``bookruns``: the book's fast profile) is restored instead, and says so.

    Args:
        method: A method name of ``config.METHODS``.
        preset: Config preset or YAML path.
        root: Folder holding one run directory per method and seed.
        seed: Training seed.
        overrides: Further config values.
        progress: Progress bars.
        shipped: Restore a matching shipped run instead of training it (the notebooks' fast profile).
    """
    values = dict(method=method, seed=seed, progress=progress, out_dir=str(Path(root) / f"{method}-seed{seed}"))
    # The overrides are a notebook's settings for every method it trains: silent where a method ignores one. The
    # split sizes are choices, though: on real data they sample its splits (as on the command line), not ignored.
    overrides = dict(overrides or {})
    values.update({key: overrides.pop(key) for key in SIZE_KEYS if key in overrides})
    cfg = load_config(preset, values, defaults=overrides)
    if shipped and restore(cfg):
        print(
            f"{method}: restored the shipped {preset} run into {cfg.run_dir()} (float16 weights, trained by "
            f"`{REGENERATE}`; SHIPPED = False trains it here)"
        )
    trainer = Trainer(cfg, resume=(cfg.run_dir() / "last.pt").exists())
    trainer.fit()
    return trainer


def selected_checkpoint(trainer: Trainer) -> Path:
    """The run's ``selected_checkpoint_name``."""
    return trainer.run_dir / selected_checkpoint_name(trainer.cfg.method)


@dataclass
class SelectedRun:
    """A trained (or reused) run and the model of its validation-chosen checkpoint.

    Attributes:
        trainer: The run's ``Trainer`` (its ``cfg``, ``data`` splits and ``history``).
        model: The selected checkpoint's model, in eval mode, on the requested device.
        cfg: The config the checkpoint was trained with.
        path: The selected checkpoint (``best_clean.pt`` for ERM, ``best_robust.pt`` otherwise).
        epoch: The epoch it was saved at (1-based).
    """

    trainer: Trainer
    model: torch.nn.Module
    cfg: object
    path: Path
    epoch: int


def load_selected(
    methods,
    preset: str = "cpu-demo",
    root: str = "runs/book",
    seed: int = 0,
    overrides: dict | None = None,
    device=None,
    progress: bool = False,
    shipped: bool = False,
) -> dict[str, SelectedRun]:
    """Trains or reuses (``train_or_load``) one run per method and loads each run's selected checkpoint: what
    notebooks 04-06 do before they look at the models.

    Args:
        methods: Method names.
        preset: Config preset or YAML path.
        root: Folder holding one run directory per method and seed (the book's runs are shared by notebooks).
        seed: Training seed.
        overrides: Further config values (e.g. real data and its epochs).
        device: Where the models go (default: the CPU).
        progress: Progress bars while training.
        shipped: Restore a matching shipped run instead of training it (``bookruns``).

    Returns:
        Method -> ``SelectedRun``, in the order given.
    """
    out = {}
    for method in methods:
        trainer = train_or_load(
            method, preset, root=root, seed=seed, overrides=overrides, progress=progress, shipped=shipped
        )
        path = selected_checkpoint(trainer)
        model, cfg = model_from_checkpoint(path, device or "cpu")
        out[method] = SelectedRun(trainer, model, cfg, path, int(load_checkpoint(path, required=("epoch",))["epoch"]))
    return out


def compare_methods(
    methods,
    preset: str = "cpu-demo",
    out_root: str = "runs/compare",
    seed: int = 0,
    overrides: dict | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Trains (or reuses, see ``train_or_load``) one run per method and tabulates test clean, PGD and
    site-shift accuracy of each method's ``selected_checkpoint``."""
    rows = []
    for method in methods:
        trainer = train_or_load(method, preset, out_root, seed, overrides, progress)
        cfg, device = trainer.cfg, trainer.device
        chosen = selected_checkpoint(trainer)
        model, _ = model_from_checkpoint(chosen, device)
        x, y = trainer.data.test
        adv = adversarial_examples(model, trainer.val_attack, x, y)  # PGD as on validation, seeded with the run
        row = {
            "method": method,
            "checkpoint": chosen.stem,
            "clean": accuracy(model, x, y),
            f"PGD-{cfg.eval_attack_steps} {format_eps(cfg.eps)}": accuracy(model, adv, y),
            "n_test": len(y),
        }
        if trainer.data.shift is not None:
            xs, ys = trainer.data.shift
            row[f"shift ({trainer.data.shift_name})"] = accuracy(model, xs, ys)
        row["train_minutes"] = sum(r["epoch_seconds"] for r in trainer.history) / 60
        rows.append(row)
    return pd.DataFrame(rows).round(3)
