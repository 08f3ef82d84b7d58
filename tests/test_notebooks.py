"""Every notebook follows the book's conventions. (They execute once per CI, in the book build.)"""

from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
BOOK_TOC = Path(__file__).resolve().parents[1] / "book" / "_toc.yml"


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks found"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_conventions(path):
    nb = nbformat.read(path, as_version=4)
    first = nb.cells[0]
    assert first.cell_type == "markdown" and "colab-badge.svg" in first.source
    assert f"blob/main/notebooks/{path.name}" in first.source, "the Colab badge points at this notebook"
    setup = next(c for c in nb.cells if c.cell_type == "code")
    assert 'find_spec("robustmed_lite") is None' in setup.source, "setup installs the package only if missing"
    assert "notebook_setup()" in setup.source, "setup reports the device and the profile"
    assert "PROFILE" in setup.source
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.get("outputs"), "notebooks are committed without outputs (the book executes them)"
    if any("ipywidgets" in c.source for c in nb.cells if c.cell_type == "code"):
        assert any("static" in c.source.lower() for c in nb.cells), "widgets need a static figure beside them"
    assert f"notebooks/{path.stem}" in BOOK_TOC.read_text(), "the notebook is in the book"
