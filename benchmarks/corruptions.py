"""Corruption throughput: images/s of every corruption at severity 3, per image size.

Usage: python benchmarks/corruptions.py [--device cpu] [--sizes 64 224] [--batch 64]
Writes benchmarks/results/corruptions_<device>.json.
"""

import argparse

import torch
from _harness import device_sync, results_file, seconds_per_call, write_record

from robustmed_lite.data.phantom import make_phantom_dataset
from robustmed_lite.evaluation.corruptions import CORRUPTIONS, FAMILY_OF, corrupt
from robustmed_lite.runinfo import environment_info


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    sync = device_sync(device)
    rows = []
    for size in args.sizes:
        x = make_phantom_dataset(args.batch, size, "A", seed=0).images.to(device)
        for name in CORRUPTIONS:
            seeds = iter([0, *range(args.repeats)])  # the warm-up's, then one per timed call
            best = min(seconds_per_call(lambda: corrupt(x, name, 3, seed=next(seeds)), args.repeats, sync))
            rows.append(
                {
                    "corruption": name,
                    "family": FAMILY_OF[name],
                    "size": size,
                    "batch": args.batch,
                    "seconds": round(best, 4),
                    "images_per_s": round(args.batch / best, 1),
                }
            )
            print(f"{size:3d} px {name:16s} {args.batch / best:9.1f} img/s")
    write_record(
        args.out or results_file(f"corruptions_{device.type}.json"),
        {"benchmark": "corruptions", "severity": 3, "results": rows, "environment": environment_info()},
    )


if __name__ == "__main__":
    main()
