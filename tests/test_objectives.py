"""method/objectives.py: each loss against a hand computation on a two-sample batch, and where the
gradient of the method's square loss flows."""

from __future__ import annotations

import pytest
import torch

from robustmed_lite.components import LOSSES, Batch
from robustmed_lite.config import load_config
from robustmed_lite.data.phantom import make_phantom_dataset
from robustmed_lite.models import create_model


@pytest.mark.parametrize("target_grad", [True, False])
def test_the_gradient_reaches_the_prior_view_only_with_target_grad(target_grad):
    torch.manual_seed(0)
    model = create_model("small_cnn", img_size=32)
    data = make_phantom_dataset(8, 32, seed=1)
    x_aug = data.images.flip(-1).clone().requires_grad_(True)
    cfg = load_config("cpu-demo", {"method": "cap", "target_grad": target_grad})
    batch = Batch(data.images, data.images.clamp(0.01, 0.99), x_aug, data.labels)
    LOSSES["square_kl"](model.train(), batch, cfg).backward()
    assert (x_aug.grad is not None and x_aug.grad.abs().sum() > 0) == target_grad
