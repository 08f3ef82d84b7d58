"""book/runs.py: the notebooks' train-or-load helpers load each run's validation-chosen checkpoint."""

from __future__ import annotations

import torch
from _small import SMALL

from robustmed_lite.book.runs import load_selected, train_or_load
from robustmed_lite.checkpoints import load_checkpoint


def test_load_selected_loads_each_runs_validation_chosen_checkpoint(tmp_path):
    tiny = {k: v for k, v in SMALL.items() if k != "progress"} | {"epochs": 1}
    runs = load_selected(["erm", "trades"], "cpu-demo", root=str(tmp_path), overrides=tiny)
    assert list(runs) == ["erm", "trades"]
    for method, run in runs.items():
        assert run.path.name == ("best_clean.pt" if method == "erm" else "best_robust.pt")
        assert run.epoch == load_checkpoint(run.path)["epoch"] and run.cfg.method == method
        assert not run.model.training
        saved = load_checkpoint(run.path)["model"]
        assert all(torch.equal(v, run.model.state_dict()[k]) for k, v in saved.items())
    again = train_or_load("erm", "cpu-demo", root=str(tmp_path), overrides=tiny, progress=False)
    assert again.start_epoch == 1, "reused, not retrained"
