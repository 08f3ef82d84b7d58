"""Phantom generation speed: slices per second at several sizes (target: 2,000 slices at 128 px in < 10 s).

Usage: python benchmarks/phantom.py [--n 2000] [--sizes 64 128 224]
"""

import argparse

import torch
from _harness import results_file, seconds_per_call, write_record

from robustmed_lite.data.phantom import make_phantom_dataset
from robustmed_lite.runinfo import environment_info


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 224])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(results_file("phantom.json")))
    args = parser.parse_args()
    make_phantom_dataset(64, 64)  # warm-up
    rows = []
    for size in args.sizes:
        times = seconds_per_call(lambda: make_phantom_dataset(args.n, size, site="A", seed=0), args.repeats, warmup=0)
        best = min(times)
        rows.append(
            {
                "n": args.n,
                "size": size,
                "seconds_best": round(best, 3),
                "seconds_all": [round(t, 3) for t in times],
                "slices_per_s": round(args.n / best, 1),
            }
        )
        print(f"{args.n} slices at {size:3d} px: {best:6.2f} s best of {args.repeats} ({args.n / best:7.1f} slices/s)")
    write_record(
        args.out,
        {
            "benchmark": "phantom",
            "threads": torch.get_num_threads(),
            "results": rows,
            "environment": environment_info(),
        },
    )


if __name__ == "__main__":
    main()
