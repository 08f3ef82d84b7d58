"""How long each notebook takes in the fast profile, starting from nothing: no trained runs, no decode cache.

Each notebook runs alone (nbclient, a fresh kernel) in its own empty working folder with its own empty
``ROBUSTMED_CACHE``, so that no notebook profits from another's runs, as on an attendee's fresh laptop or Colab
runtime. The package (with its shipped fast-profile runs) and the committed results are found through the
installed package. ``--data phantom`` hides any real CT (``ROBUSTMED_DATA`` points at an empty folder), as on a
workshop laptop; ``--data found`` lets the notebooks find it as they would (``ROBUSTMED_DATA`` or
``../shared/data``), as in CI. Reports the wall time of each notebook and of each code cell. Run it on an
otherwise idle machine.

Usage: python benchmarks/notebooks.py [--data phantom|found] [--notebooks 00 02] [--timeout 1200]
Writes benchmarks/results/notebooks_<cpu|gpu>_<data>.json; with --notebooks, only those rows of it are replaced
(each row says when it was recorded).
"""

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from _harness import results_file, write_record

ROOT = Path(__file__).resolve().parents[1]


def run_notebook(path: Path, timeout: int, data: str) -> dict:
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory() as work:
        os.environ["ROBUSTMED_CACHE"] = str(Path(work) / "cache")
        if data == "phantom":
            (Path(work) / "no-real-data").mkdir()
            os.environ["ROBUSTMED_DATA"] = str(Path(work) / "no-real-data")
        os.environ.setdefault("ROBUSTMED_PROFILE", "fast")
        client = NotebookClient(
            nb, timeout=timeout, kernel_name="python3", record_timing=True, resources={"metadata": {"path": work}}
        )
        start = time.perf_counter()
        client.execute()
        seconds = time.perf_counter() - start
    cells = []
    for index, cell in enumerate(nb.cells):
        timing = cell.get("metadata", {}).get("execution", {})
        if cell.cell_type == "code" and "iopub.execute_input" in timing and "shell.execute_reply" in timing:
            began, ended = (
                datetime.fromisoformat(timing[k].replace("Z", "+00:00"))
                for k in ("iopub.execute_input", "shell.execute_reply")
            )
            cells.append(
                {
                    "cell": index,
                    "seconds": round((ended - began).total_seconds(), 1),
                    "first_line": cell.source.splitlines()[0][:80] if cell.source else "",
                }
            )
    return {"notebook": path.name, "seconds": round(seconds, 1), "cells": cells}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--notebooks", nargs="*", default=None, help="number prefixes, e.g. 00 02 (default: all)")
    parser.add_argument("--timeout", type=int, default=1200, help="per cell, seconds")
    parser.add_argument(
        "--data",
        choices=("phantom", "found"),
        default="phantom",
        help="phantom: hide real CT (as on a workshop laptop); found: use it where the notebooks find it",
    )
    args = parser.parse_args()

    import torch
    from tqdm import tqdm

    from robustmed_lite.runinfo import environment_info

    paths = sorted((ROOT / "notebooks").glob("*.ipynb"))
    if args.notebooks:
        paths = [p for p in paths if p.name[:2] in args.notebooks]
    rows = []
    for path in tqdm(paths, desc="notebooks", unit="nb"):
        rows.append(dict(run_notebook(path, args.timeout, args.data), recorded=time.strftime("%Y-%m-%dT%H:%M:%S%z")))
        slowest = sorted(rows[-1]["cells"], key=lambda c: -c["seconds"])[:3]
        print(
            f"{path.name}: {rows[-1]['seconds']:.0f} s; slowest cells: "
            + ", ".join(f"{c['cell']} ({c['seconds']:.0f} s)" for c in slowest),
            flush=True,
        )
    device = "gpu" if torch.cuda.is_available() else "cpu"
    out = results_file(f"notebooks_{device}_{args.data}.json")
    if args.notebooks and out.exists():  # a re-measured notebook replaces its own row; the others stay
        measured, before = {row["notebook"] for row in rows}, json.loads(out.read_text())
        kept = [
            dict(r, recorded=r.get("recorded", before["recorded"]))
            for r in before["notebooks"]
            if r["notebook"] not in measured
        ]
        rows = sorted(kept + rows, key=lambda r: r["notebook"])
    record = {
        "command": " ".join(["python benchmarks/notebooks.py", *sys.argv[1:]]),
        "data": args.data,
        "profile": os.environ["ROBUSTMED_PROFILE"],
        "recorded": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "environment": environment_info(),
        "notebooks": rows,
    }
    write_record(out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
