"""Small shared helpers that every other module imports downward: eval mode, a model's device, eps text, class
names.

This module imports nothing from the package, so any module may import it without a cycle.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

CLASS_NAMES = ("non-COVID", "COVID")  # label 0, label 1
_EPS_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(?:/\s*([0-9]*\.?[0-9]+)\s*)?$")


def parse_eps(eps: float | str) -> float:
    """An attack radius on the pixel scale from a float or a string such as ``"8/255"`` or ``"0.03"``.

    Raises:
        ValueError: A string that is not a number or a fraction, or a negative radius.
    """
    if isinstance(eps, str):
        match = _EPS_PATTERN.match(eps)
        if match is None:
            raise ValueError(f"cannot read eps={eps!r}: use a number or a fraction such as '8/255'")
        denominator = float(match.group(2)) if match.group(2) else 1.0
        if denominator == 0:
            raise ValueError(f"eps={eps!r} divides by zero: use a fraction with a positive denominator such as '8/255'")
        value = float(match.group(1)) / denominator
    else:
        value = float(eps)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    return value


def format_eps(eps: float) -> str:
    """``eps`` as k/255: ``8/255`` for 8/255, ``7.65/255`` for 0.03."""
    k = eps * 255
    return f"{round(k)}/255" if abs(k - round(k)) < 1e-4 else f"{k:.3g}/255"


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Puts every module in eval mode and restores each module's own flag afterwards, even on errors."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters are (the CPU for a model without any)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")
