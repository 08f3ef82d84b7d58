"""book/prose.py: measured numbers reach myst-nb as Python numbers, and nothing breaks without myst-nb."""

from __future__ import annotations

import sys
import types

import numpy as np

from robustmed_lite.book.prose import glue


def test_glue_passes_numpy_scalars_on_as_python_numbers(monkeypatch):
    calls = []
    fake = types.ModuleType("myst_nb")
    fake.glue = lambda name, value, display=True: calls.append((name, value, type(value), display))
    monkeypatch.setitem(sys.modules, "myst_nb", fake)
    glue("acc", np.float32(0.75), display=False)
    glue("n", np.int64(372), display=False)
    glue("label", "TRADES")
    assert calls == [("acc", 0.75, float, False), ("n", 372, int, False), ("label", "TRADES", str, True)]


def test_glue_does_nothing_without_myst_nb(monkeypatch):
    monkeypatch.setitem(sys.modules, "myst_nb", None)  # import fails, as on Colab
    assert glue("acc", 0.5, display=False) is None
