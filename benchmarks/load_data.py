"""Times loading the Soares SARS-CoV-2 set: a first load (decode and write the cache) and a cached second load.

Run with ``python benchmarks/load_data.py``; writes ``benchmarks/results/load_data.json``. Each size gets a fresh,
empty cache folder, so "first" really decodes. The image files themselves may already sit in the operating
system's page cache: "first" measures decoding, not a cold disk.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from _harness import results_file, write_record

from robustmed_lite.data.loaders import LOADER_VERSION, find_shared_data, load_images
from robustmed_lite.runinfo import environment_info


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--root", type=Path, default=None, help="folder with COVID/ and non-COVID/ (default: <shared data>/sarscov2)"
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 224], help="output sides in pixels")
    parser.add_argument("--out", type=Path, default=results_file("load_data.json"))
    return parser.parse_args()


def time_size(root: Path, size: int) -> dict:
    """First (empty cache) and cached load times for one size."""
    with tempfile.TemporaryDirectory(prefix="robustmed-bench-") as cache_dir:
        start = time.perf_counter()
        first = load_images(root, size, cache_dir=cache_dir, progress=False)
        first_s = time.perf_counter() - start
        start = time.perf_counter()
        cached = load_images(root, size, cache_dir=cache_dir, progress=False)
        cached_s = time.perf_counter() - start
        cache_bytes = sum(f.stat().st_size for f in Path(cache_dir).iterdir())
    assert cached.images.equal(first.images), "the cache returned different pixels"
    n = len(first)
    return {
        "size": size,
        "n_images": n,
        "first_s": round(first_s, 3),
        "cached_s": round(cached_s, 3),
        "first_img_per_s": round(n / first_s, 1),
        "cached_img_per_s": round(n / cached_s, 1),
        "cache_mib": round(cache_bytes / 2**20, 1),
        "tensor_mib": round(first.images.nbytes / 2**20, 1),
    }


def main() -> None:
    args = parse_args()
    root = args.root
    if root is None:
        shared = find_shared_data()
        if shared is None:
            sys.exit("no shared data found: pass --root or set ROBUSTMED_DATA")
        root = shared / "sarscov2"
    rows = [time_size(root, size) for size in args.sizes]

    print(f"{'size':>5} {'images':>7} {'first s':>8} {'img/s':>7} {'cached s':>9} {'img/s':>8} {'cache MiB':>10}")
    for r in rows:
        print(
            f"{r['size']:>5} {r['n_images']:>7} {r['first_s']:>8.2f} {r['first_img_per_s']:>7.0f} "
            f"{r['cached_s']:>9.3f} {r['cached_img_per_s']:>8.0f} {r['cache_mib']:>10.1f}"
        )

    record = {
        "benchmark": "load_data",
        "dataset": str(root),
        "loader_version": LOADER_VERSION,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "results": rows,
        "environment": environment_info(),
    }
    write_record(args.out, record)


if __name__ == "__main__":
    main()
