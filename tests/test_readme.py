"""The README is short and for users: at most 15 KB, links that open, commands that exist, a layout that matches the
package, and a verdict table quoted from the committed files; the benchmark tables quote the benchmarks' files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from robustmed_lite.cli import _parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BENCHMARKS = ROOT / "benchmarks" / "README.md"
LINK = re.compile(r"\]\(([^)\s]+)\)")
INTERVAL = re.compile(r"([+-]\d\.\d{3}) \[([+-]\d\.\d{3}), ([+-]\d\.\d{3})\]")
DOCUMENTS = [
    README,
    BENCHMARKS,
    ROOT / "results" / "README.md",
    ROOT / "book" / "notes" / "index.md",
    *sorted((ROOT / "results").glob("*/*/README.md")),
]


def _table_after(marker: str, document: str) -> list[list[str]]:
    """The rows (cells) of the first Markdown table after ``marker``, without the header and the rule."""
    text = document[document.index(marker) :]
    rows = []
    for line in text[text.index("\n|") :].strip().splitlines():
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows[2:]


def test_the_readme_is_at_most_15_kb():
    size = len(README.read_bytes())
    assert size <= 15_000, f"README.md is {size} bytes: move detail to results/, benchmarks/ or the book"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_opens_a_file(document):
    missing = []
    for target in LINK.findall(document.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        if not (document.parent / target.split("#")[0]).exists():
            missing.append(target)
    assert not missing, f"{document.relative_to(ROOT)} links files that do not exist: {missing}"


def test_the_readme_links_the_results_and_benchmarks_pages():
    text = README.read_text()
    for target in ("results/README.md", "benchmarks/README.md", "notebooks/08_reproduction.ipynb"):
        assert f"]({target})" in text, target


def test_the_command_table_names_commands_that_exist():
    commands = _parser()._subparsers._group_actions[0].choices
    rows = _table_after("## Main commands", README.read_text())
    named = {re.match(r"`(\w+)", row[0]).group(1) for row in rows}
    assert named <= set(commands), named - set(commands)
    assert {"demo", "train", "evaluate", "reproduce", "sites", "fidelity", "ablation", "results"} <= named


def test_the_layout_names_what_the_package_holds():
    tree = README.read_text().split("## Layout", 1)[1].split("```")[1]
    package = ROOT / "robustmed_lite"
    names = re.findall(r"^  (\S+)", tree, flags=re.MULTILINE)
    assert names, "the layout lists the package's parts"
    for name in names:
        assert (package / name.rstrip("/")).exists(), f"the layout names robustmed_lite/{name}, which does not exist"
    subpackages = {p.parent.name + "/" for p in package.glob("*/__init__.py")}
    assert subpackages <= set(names), f"subpackages missing from the layout: {subpackages - set(names)}"


def test_the_verdict_table_quotes_the_committed_verdicts():
    verdicts = pd.read_csv(ROOT / "results" / "reproduction" / "cpu" / "verdicts.csv")
    rows = _table_after("## The current verdict", README.read_text())
    assert len(rows) == len(verdicts)
    for (claim, against, gain, detectable, verdict), (_, v) in zip(rows, verdicts.iterrows(), strict=True):
        assert claim == v["claim"] and against.startswith(v["comparator"]) and verdict == v["verdict"]
        assert detectable == f"{v['mde'] * 100:.1f} points"
        quoted = [float(x) for x in INTERVAL.search(gain).groups()]
        assert quoted == pytest.approx([round(v[c], 3) for c in ("gain_mean", "gain_ci_low", "gain_ci_high")], abs=5e-4)


def _seconds(text: str) -> int:
    """'1 min 05 s' or '48 s' -> seconds."""
    match = re.fullmatch(r"(?:(\d+) min )?(\d+) s", text.strip())
    assert match, f"not a time: {text!r}"
    return int(match.group(1) or 0) * 60 + int(match.group(2))


def test_the_notebook_times_quote_the_benchmark():
    """The per-notebook times in benchmarks/README.md and the instructor guide are those benchmarks/notebooks.py
    recorded, for both data settings."""
    recorded = {
        data: {
            row["notebook"]: row["seconds"]
            for row in json.loads((ROOT / "benchmarks" / "results" / f"notebooks_cpu_{data}.json").read_text())[
                "notebooks"
            ]
        }
        for data in ("phantom", "found")
    }
    rows = _table_after("**How long each notebook takes.**", BENCHMARKS.read_text())
    assert [r[0].strip("`") for r in rows] == sorted(recorded["phantom"]), "one row per notebook, in book order"
    for name, phantom, found in rows:
        name = name.strip("`")
        assert _seconds(phantom) == round(recorded["phantom"][name]), name
        assert _seconds(found) == round(recorded["found"][name]), name
    guide = _table_after("**How long the notebooks run.**", (ROOT / "book" / "workshop.md").read_text())
    assert {r[0].strip("`"): _seconds(r[1]) for r in guide} == {
        name: round(seconds) for name, seconds in recorded["phantom"].items()
    }, "the instructor guide's times"


def test_the_large_data_table_quotes_the_benchmark():
    """The slice store's peak memory and throughput are those benchmarks/large_data.py recorded."""
    recorded = json.loads((ROOT / "benchmarks" / "results" / "large_data_cpu.json").read_text())
    text = BENCHMARKS.read_text()
    rows = _table_after("**Measured** (`python benchmarks/large_data.py`", text)
    assert [r[0].split(" (")[0] for r in rows] == ["slice store", "the same slices in memory"]
    for row, result in zip(rows, recorded["results"], strict=True):
        assert row[1].strip("*") == f"{result['peak_rss_mb']:,} MB"
        assert row[2] == f"{result['ready_s']:g} s"
        assert row[3] == f"{result['data_pass_slices_per_s']:,} slices/s"
        assert row[4] == f"{round(result['epoch_s'])} s ({round(result['train_slices_per_s'])} slices/s)"
    assert f"{recorded['store_mb']} MiB store, written in {round(recorded['store_write_s'])} s" in " ".join(
        text.split()
    )


def test_the_timing_history_has_one_line_per_measurement():
    text = BENCHMARKS.read_text().split("## Timing history", 1)[1]
    for marker in ("`make demo`", "`make test` from a fresh clone"):
        rows = _table_after(marker, text)
        assert rows, marker
        for commit, date, time, machine in rows:
            assert re.fullmatch(r"[0-9a-f]{7}|not recorded", commit) and re.fullmatch(r"\d{4}-\d\d-\d\d", date)
            assert re.match(r"\d+ min \d\d s", time) and machine, (commit, date, time)
