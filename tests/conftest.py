"""Shared fixtures: the real data in ../shared/data (skipped with a reason where absent), small thread counts, a
``reproduce`` that trains nothing for the paired studies, and a small trained CNN that the attack tests share."""

from __future__ import annotations

import os

import pandas as pd
import pytest
import torch

from robustmed_lite.data.loaders import find_shared_data
from robustmed_lite.data.phantom import make_phantom_dataset
from robustmed_lite.models import create_model
from robustmed_lite.studies import fidelity
from robustmed_lite.trainer import fit_erm

# Two threads, shared out among pytest-xdist's workers (`make test` runs one per core): more threads than cores
# make every worker slower.
torch.set_num_threads(max(1, 2 // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


@pytest.fixture(scope="session")
def shared_data():
    """Path of ../shared/data; tests that need it skip where it is absent (CI always has it)."""
    root = find_shared_data()
    if root is None:
        pytest.skip("real CT data not found: set ROBUSTMED_DATA or place it at ../shared/data (CI has it)")
    return root


@pytest.fixture
def reproduce_calls(monkeypatch, tmp_path):
    """The keyword arguments a paired study (ablation, fidelity) passes to ``reproduce``, which trains nothing here
    (in ``tmp_path``)."""
    calls = {}

    def fake_reproduce(**kwargs):
        calls.update(kwargs)
        return {"runs": pd.DataFrame(columns=["name", "seed"]), "table": pd.DataFrame()}

    monkeypatch.setattr(fidelity, "reproduce", fake_reproduce)
    monkeypatch.chdir(tmp_path)
    return calls


@pytest.fixture(scope="session")
def phantom_cnn():
    """small_cnn trained (ERM) on the 48 px phantom; 256 held-out slices (model, images, labels). About 15 s on 2
    cores; shared by test_attacks and test_feedback_attack."""
    data = make_phantom_dataset(1280, 48, site="A", seed=0)
    torch.manual_seed(0)
    net = create_model("small_cnn")
    fit_erm(net, data.images[:1024], data.labels[:1024], epochs=6, progress=False)
    return net.eval(), data.images[1024:], data.labels[1024:]
