"""Guided-filter throughput (images/s) per backend against OpenCV's ximgproc, at 224 px, batch 64.

Usage: python benchmarks/guided_filter.py [--device cuda] [--radii 2 4 8 16] [--batch 64] [--size 224]
Writes benchmarks/results/guided_filter_<device>.json with ratio columns (backend / ximgproc on this CPU).
On a machine without contrib OpenCV (no ximgproc), ``--cpu-reference`` takes the ximgproc images/s from an
earlier CPU run's JSON, so a GPU's ratio is against the 2-core CPU that developers and CI use.
"""

import argparse
import json
import time
from pathlib import Path

import cv2
import torch

from robustmed_lite.data.phantom import make_phantom_dataset
from robustmed_lite.method.prior import guided_filter
from robustmed_lite.runinfo import environment_info


def _seconds(fn, repeats, sync=lambda: None):
    fn()  # warm-up (kernels, caches)
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]  # median


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--radii", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--eps", type=float, default=0.003)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=None)
    parser.add_argument("--cpu-reference", default=None, help="JSON of a CPU run: its ximgproc images/s")
    args = parser.parse_args()
    reference = {}
    if args.cpu_reference:
        for row in json.loads(Path(args.cpu_reference).read_text())["results"]:
            reference[row["radius"]] = row["ximgproc_cpu_img_s"]
    has_ximgproc = hasattr(cv2, "ximgproc")

    x = make_phantom_dataset(args.batch, args.size, "A", seed=0).images
    p = torch.where(x <= 0.5, x, torch.zeros_like(x))
    xs, ps = x[:, 0].numpy(), p[:, 0].numpy()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = []
    for r in args.radii:
        row = {"radius": r, "batch": args.batch, "size": args.size}
        if has_ximgproc:
            ref = _seconds(
                lambda: [cv2.ximgproc.guidedFilter(xs[i], ps[i], r, args.eps, -1) for i in range(len(xs))], args.repeats
            )
            row["ximgproc_cpu_img_s"] = round(args.batch / ref, 1)
        if r in reference:
            row["ximgproc_reference_cpu_img_s"] = reference[r]
            ref = args.batch / reference[r]
        elif not has_ximgproc:
            raise SystemExit("no cv2.ximgproc here: pass --cpu-reference with a CPU run's JSON")
        backends = [("opencv", "cpu"), ("torch", "cpu")] if device.type == "cpu" else [("torch", args.device)]
        for backend, dev in backends:
            xd, pd = x.to(dev), p.to(dev)
            t = _seconds(lambda: guided_filter(xd, pd, r, args.eps, backend=backend), args.repeats, sync)
            row[f"{backend}_{dev}_img_s"] = round(args.batch / t, 1)
            row[f"{backend}_{dev}_vs_ximgproc"] = round(ref / t, 2)
        rows.append(row)
        print(" | ".join(f"{k}={v}" for k, v in row.items()))
    out = Path(args.out or Path(__file__).parent / "results" / f"guided_filter_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "guided_filter",
                "eps": args.eps,
                "opencv_threads": cv2.getNumThreads(),
                "torch_threads": torch.get_num_threads(),
                "results": rows,
                "environment": environment_info(),
            },
            indent=2,
        )
    )
    print(f"saved {out}")


if __name__ == "__main__":
    main()
