"""The instructor guide's agendas fit: every agenda adds up to the length its heading states, and every chapter's
slot holds its notebook's measured run time and 8 minutes for each exercise it names, exercises that exist in that
chapter."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
GUIDE = (ROOT / "book" / "workshop.md").read_text()
RUN_SECONDS = {
    row["notebook"][:2]: row["seconds"]
    for row in json.loads((ROOT / "benchmarks" / "results" / "notebooks_cpu_phantom.json").read_text())["notebooks"]
}
EXERCISE_MINUTES = 8
AGENDA = re.compile(r"^\*\*(?P<title>[^*]*?(?P<length>\d+) (?P<unit>minutes|hours)[^*]*)\*\*", re.M)


def _agendas() -> dict[str, tuple[int, list[list[str]]]]:
    """Agenda title -> (its length in minutes, its rows as cells)."""
    found = {}
    for match in AGENDA.finditer(GUIDE):
        table = GUIDE[match.end() :].split("\n\n", 2)[1]
        rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table.splitlines()[2:]]
        length = int(match["length"]) * (60 if match["unit"] == "hours" else 1)
        found[match["title"]] = (length, rows)
    return found


def _exercises(chapter: str) -> list[str]:
    path = next((ROOT / "notebooks").glob(f"{chapter}_*.ipynb"))
    cells = nbformat.read(path, as_version=4).cells
    return [m for c in cells if c.cell_type == "markdown" for m in re.findall(r"```\{exercise\} ([^\n]+)", c.source)]


def test_there_are_two_agendas():
    assert len(_agendas()) == 2, list(_agendas())


@pytest.mark.parametrize("title", list(_agendas()))
def test_an_agenda_adds_up_and_every_slot_fits_its_chapter(title):
    length, rows = _agendas()[title]
    end = 0
    for minutes, what, exercises, _optional in rows:
        start, stop = map(int, minutes.split("-"))
        assert start == end, f"{title}: {minutes} does not follow {end}"
        end = stop
        chapter = re.match(r"(\d\d),", what)
        if chapter and exercises:
            named = [e.strip() for e in exercises.split(";")]
            known = _exercises(chapter[1])
            assert set(named) <= set(known), (
                f"{title}, {minutes}: not exercises of {chapter[1]}: {set(named) - set(known)}"
            )
            needed = math.ceil(RUN_SECONDS[chapter[1]] / 60) + EXERCISE_MINUTES * len(named)
            assert stop - start >= needed, f"{title}, {minutes}: chapter {chapter[1]} needs {needed} minutes"
    assert end == length, f"{title}: the slots add up to {end} minutes, not {length}"


def _as_minutes_and_seconds(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes else f"{rest} s"


def test_the_guide_states_the_measured_notebook_times():
    stated = dict(re.findall(r"^\| `(\d\d)_[^`]*\.ipynb` \| ([^|]+?) \|$", GUIDE, re.M))
    assert stated == {chapter: _as_minutes_and_seconds(s) for chapter, s in RUN_SECONDS.items()}
