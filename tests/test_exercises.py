"""Every exercise in the notebooks: its solution passes its check, and its starter gets a helpful "not yet", never a
traceback. (The book build runs the starters too; this runs the folded solutions, which the build never does.)"""

import linecache
import re
from pathlib import Path

import nbformat
import pytest

from robustmed_lite.book.workshop import EXERCISES, NOT_YET, RIGHT, check

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
EXERCISE = re.compile(r"```\{exercise\}[^\n]*\n:label: (\S+)")
SOLUTION = re.compile(r"````\{solution\} (\S+)\n.*?```python\n(.*?)```", re.S)
CHECK = re.compile(r'check\("([^"]+)", (\w+)\)')


def _exercises():
    found = {}
    for path in NOTEBOOKS:
        cells = nbformat.read(path, as_version=4).cells
        for label in (m for c in cells if c.cell_type == "markdown" for m in EXERCISE.findall(c.source)):
            starter = [c.source for c in cells if c.cell_type == "code" and f"# Exercise {label}:" in c.source]
            checks = [m for c in cells if c.cell_type == "code" for m in CHECK.findall(c.source) if m[0] == label]
            solutions = [
                code
                for c in cells
                if c.cell_type == "markdown"
                for lab, code in SOLUTION.findall(c.source)
                if lab == label
            ]
            found[label] = (path.name, starter, checks, solutions)
    return found


EXERCISES_IN_NOTEBOOKS = _exercises()


def _run(source: str, name: str, label: str):
    """Runs a cell's code as a notebook would, with its source readable by inspect (as IPython keeps it)."""
    filename = f"<exercise {label} {name}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    namespace = {}
    exec(compile(source, filename, "exec"), namespace)
    return namespace


def test_every_exercise_has_a_starter_a_check_and_a_solution():
    assert EXERCISES_IN_NOTEBOOKS, "no exercises found in the notebooks"
    for label, (notebook, starter, checks, solutions) in EXERCISES_IN_NOTEBOOKS.items():
        assert label.startswith(notebook[:2].join(("nb", "-"))), f"{label}: labels start with the notebook's number"
        assert label in EXERCISES, f"{notebook}: {label} has no checker in robustmed_lite.book.workshop"
        assert len(starter) == 1 and len(checks) == 1 and len(solutions) == 1, (notebook, label)


@pytest.mark.parametrize("label", sorted(EXERCISES_IN_NOTEBOOKS))
def test_the_solution_passes_and_the_starter_gets_a_helpful_message(label, capsys):
    _, [starter], [(_, name)], [solution] = EXERCISES_IN_NOTEBOOKS[label]
    assert check(label, _run(solution, name, label)[name]), capsys.readouterr().out
    assert capsys.readouterr().out.startswith(f"{RIGHT}: ")
    assert not check(label, _run(starter, name, label)[name])
    out = capsys.readouterr().out
    assert out.startswith(f"{NOT_YET}: ") and "replace the `...`" in out and "Traceback" not in out
