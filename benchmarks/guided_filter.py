"""Guided-filter throughput (images/s) per backend against OpenCV's ximgproc, at 224 px, batch 64.

Usage: python benchmarks/guided_filter.py [--device cuda] [--radii 2 4 8 16] [--batch 64] [--size 224]
Writes benchmarks/results/guided_filter_<device>.json with ratio columns (backend / ximgproc on this CPU).
On a machine without contrib OpenCV (no ximgproc), ``--cpu-reference`` takes the ximgproc images/s from an
earlier CPU run's JSON, so a GPU's ratio is against the 2-core CPU that developers and CI use.
"""

import argparse
import json
from pathlib import Path

import cv2
import torch
from _harness import device_sync, median, results_file, seconds_per_call, write_record

from robustmed_lite.data.phantom import make_phantom_dataset
from robustmed_lite.method.prior import guided_filter
from robustmed_lite.runinfo import environment_info


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
    sync = device_sync(device)
    rows = []
    for r in args.radii:
        row = {"radius": r, "batch": args.batch, "size": args.size}
        if has_ximgproc:
            ref = median(
                seconds_per_call(
                    lambda: [cv2.ximgproc.guidedFilter(xs[i], ps[i], r, args.eps, -1) for i in range(len(xs))],
                    args.repeats,
                )
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
            t = median(
                seconds_per_call(lambda: guided_filter(xd, pd, r, args.eps, backend=backend), args.repeats, sync)
            )
            row[f"{backend}_{dev}_img_s"] = round(args.batch / t, 1)
            row[f"{backend}_{dev}_vs_ximgproc"] = round(ref / t, 2)
        rows.append(row)
        print(" | ".join(f"{k}={v}" for k, v in row.items()))
    write_record(
        args.out or results_file(f"guided_filter_{device.type}.json"),
        {
            "benchmark": "guided_filter",
            "eps": args.eps,
            "opencv_threads": cv2.getNumThreads(),
            "torch_threads": torch.get_num_threads(),
            "results": rows,
            "environment": environment_info(),
        },
    )


if __name__ == "__main__":
    main()
