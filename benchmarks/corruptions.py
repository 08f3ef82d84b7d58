"""Corruption throughput: images/s of every corruption at severity 3, per image size.

Usage: python benchmarks/corruptions.py [--device cpu] [--sizes 64 224] [--batch 64]
Writes benchmarks/results/corruptions_<device>.json.
"""

import argparse
import json
import time
from pathlib import Path

import torch

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
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = []
    for size in args.sizes:
        x = make_phantom_dataset(args.batch, size, "A", seed=0).images.to(device)
        for name in CORRUPTIONS:
            corrupt(x, name, 3, seed=0)  # warm-up
            sync()
            times = []
            for r in range(args.repeats):
                start = time.perf_counter()
                corrupt(x, name, 3, seed=r)
                sync()
                times.append(time.perf_counter() - start)
            best = min(times)
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
    out = Path(args.out or Path(__file__).parent / "results" / f"corruptions_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"benchmark": "corruptions", "severity": 3, "results": rows, "environment": environment_info()}, indent=2
        )
    )
    print(f"saved {out}")


if __name__ == "__main__":
    main()
