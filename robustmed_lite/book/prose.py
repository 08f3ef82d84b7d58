"""Measured numbers handed to the book's prose: myst-nb's ``glue`` where the book's packages are installed.

A chapter states a number in a sentence as ``{glue:text}`name:.3f```; the cell that measured it calls
``glue(name, value, display=False)``. On Colab, or wherever myst-nb is missing, ``glue`` does nothing: the cell
outputs show the same numbers, and the notebook runs without the book's packages.
"""

from __future__ import annotations

import numbers


def glue(name: str, value, display: bool = True) -> None:
    """Stores ``value`` under ``name`` for the rendered page (a no-op without myst-nb).

    numpy scalars are passed on as Python numbers: myst-nb formats those, and would show a numpy float as empty.
    """
    try:
        from myst_nb import glue as myst_glue
    except ImportError:
        return
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = int(value)
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        value = float(value)
    myst_glue(name, value, display=display)
