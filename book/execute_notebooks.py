"""Executes the book's notebooks two at a time into the book's jupyter-cache, for `make book` to render.

Each notebook runs in a fresh kernel in its own empty temporary folder (as on a fresh laptop or Colab runtime:
nothing is shared between notebooks but the package and the decode cache), with one torch thread, one notebook
per core (jupyter-cache's pool), longest first (the times of ``benchmarks/results/notebooks_cpu_found.json``).
On two cores this takes 13% less time than one notebook after another with two threads each (measured on
notebooks 02 and 03: 194 s instead of 223 s): a notebook spends much of its time in single-threaded Python.
The book build (``execute_notebooks: cache``) then renders these outputs; it would execute any notebook missing
from the cache.

Usage: python book/execute_notebooks.py [--timeout 1200]
Exits 1, with the traceback, when a notebook fails.
"""

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import yaml

BOOK = Path(__file__).resolve().parent
CACHE = BOOK / "_build" / ".jupyter_cache"
TIMES = BOOK.parent / "benchmarks" / "results" / "notebooks_cpu_found.json"


def _files(entries: list[dict]) -> list[str]:
    return [f for entry in entries for f in [entry["file"], *_files(entry.get("sections", []))]]


def toc_documents(book: Path = BOOK) -> list[str]:
    """Every page of the table of contents in reading order, the root first: ``intro``, ``notebooks/00_tour``, ...
    (chapters, chapters in parts, and their sections)."""
    toc = yaml.safe_load((book / "_toc.yml").read_text())
    return [
        toc["root"],
        *_files(toc.get("chapters", []) + [c for part in toc.get("parts", []) for c in part["chapters"]]),
    ]


def book_notebooks() -> list[Path]:
    """The notebooks of the table of contents, in book order."""
    return [BOOK / f"{f}.ipynb" for f in toc_documents() if (BOOK / f"{f}.ipynb").exists()]


def longest_first(notebooks: list[Path]) -> list[Path]:
    seconds = {}
    if TIMES.exists():
        seconds = {row["notebook"]: row["seconds"] for row in json.loads(TIMES.read_text())["notebooks"]}
    return sorted(notebooks, key=lambda path: -seconds.get(path.name, float("inf")))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timeout", type=int, default=1200, help="per cell, seconds")
    args = parser.parse_args()

    from jupyter_cache import get_cache
    from jupyter_cache.executors import load_executor

    # one notebook per core, one torch (OpenMP) thread each: more threads than cores only wait for each other
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.setdefault("ROBUSTMED_PROFILE", "fast")
    # jupyter-cache runs each notebook in a temporary folder: a page a chapter writes for the book (chapter 10's
    # report) goes to this absolute path, which the build then copies into the site.
    os.environ["ROBUSTMED_BOOK_STATIC"] = str(Path(__file__).resolve().parent / "_static")
    shutil.rmtree(CACHE, ignore_errors=True)  # every build executes every notebook
    cache = get_cache(CACHE)
    for notebook in longest_first(book_notebooks()):
        cache.add_nb_to_project(str(notebook))
    logger = logging.getLogger("execute_notebooks")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    executor = load_executor("temp-parallel", cache, logger=logger)
    result = executor.run_and_cache(timeout=args.timeout, allow_errors=False)
    print(
        f"executed {len(result.succeeded)} notebooks in {time.perf_counter() - start:.0f} s, {os.cpu_count()} at "
        f"a time, one thread each"
    )
    failed = result.excepted + result.errored
    for uri in failed:
        print(f"FAILED {uri}\n{cache.get_project_record(uri).traceback or ''}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
