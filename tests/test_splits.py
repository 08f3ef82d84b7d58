"""data/splits.py: the training data holds the configured prior view, and multi-source training pools the
other site's train split."""

from __future__ import annotations

import pytest
import torch
from _small import SMALL

from robustmed_lite.config import load_config
from robustmed_lite.data.splits import build_data
from robustmed_lite.method.prior import lung_prior


@pytest.mark.parametrize("view", ["cap", "package"])
def test_the_training_data_holds_the_configured_view(view):
    cfg = load_config("cpu-demo", dict(method="cap", prior_view=view, hflip=False), defaults=SMALL)
    splits = build_data(cfg)
    x, x_aug, _ = next(splits.train.batches(16, epoch=0, shuffle=False))[:3]
    assert torch.allclose(x_aug, lung_prior(x, with_mask=False, view=view)[0], atol=1e-6)


def test_multi_source_pools_the_other_sites_train_split(shared_data):
    cfg = load_config(
        "cpu-demo",
        dict(
            data=str(shared_data / "sarscov2"),
            extra_data=str(shared_data / "ucsd_covidct"),
            ood_data=str(shared_data / "ucsd_covidct") + ":test",
            img_size=32,
            progress=False,
        ),
    )
    splits = build_data(cfg)
    assert splits.extra_name == "ucsd_covidct (test)" and len(splits.extra_test[1]) == 203  # UCSD's official test
    assert splits.train.sites is not None and int((splits.train.sites == 1).sum()) == 425  # its official train
    assert len(splits.shift[1]) == 203 and splits.shift_name == "ucsd_covidct (test)"
