"""evaluation/checkpoint_eval.py: what a saved run is evaluated on."""

from __future__ import annotations

from _small import SMALL

from robustmed_lite.config import load_config


def _config(tmp_path, **overrides):
    return load_config("cpu-demo", dict(out_dir=str(tmp_path / "run"), **overrides), defaults=SMALL)


def test_a_run_that_trains_on_prior_views_is_evaluated_on_the_plain_splits(tmp_path):
    from robustmed_lite.evaluation.checkpoint_eval import _evaluation_splits

    cfg = _config(tmp_path, method="robustmed", prior_samples=0.5)
    splits = _evaluation_splits(cfg)
    assert cfg.prior_samples == 0 and not cfg.prior and len(splits.test[1]) > 0
