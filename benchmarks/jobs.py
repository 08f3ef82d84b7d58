"""Runs at once on a CPU: one process with every thread, or one process per core with one thread each?

Trains the same TRADES epochs (the `cpu` reproduction profile's settings: 64 px, `tiny_visformer`, 5 attack steps,
real CT when ../shared/data is present, else the phantom) in two ways on the same machine:

* one process with `--threads` threads (torch's intra-op parallelism), two runs one after the other;
* `--threads` processes with one thread each, the same runs at the same time (what `reproduce --jobs` does).

and reports the wall time of each and their ratio. Run it on an otherwise idle machine.

Usage: python benchmarks/jobs.py [--epochs 2] [--threads 2]
Writes benchmarks/results/jobs_cpu.json.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time

from _harness import results_file, write_record


def _one_run(threads: int, epochs: int, data: str, seed: int) -> None:
    import torch

    torch.set_num_threads(threads)
    from robustmed_lite.config import load_config
    from robustmed_lite.trainer import Trainer

    cfg = load_config(
        "cpu-demo",
        {
            "method": "trades",
            "data": data,
            "epochs": epochs,
            "seed": seed,
            "out_dir": tempfile.mkdtemp(),
            "progress": False,
        },
    )
    Trainer(cfg).fit()


def _spawn(threads: int, epochs: int, data: str, seed: int) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--single",
            str(threads),
            "--epochs",
            str(epochs),
            "--data",
            data,
            "--seed",
            str(seed),
        ]
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--single", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(results_file("jobs_cpu.json")))
    args = parser.parse_args()
    if args.single is not None:
        _one_run(args.single, args.epochs, args.data, args.seed)
        return
    from robustmed_lite.data.loaders import find_shared_data, load_images
    from robustmed_lite.runinfo import environment_info

    root = find_shared_data()
    data = args.data or (str(root / "sarscov2") if root and (root / "sarscov2").is_dir() else "phantom")
    if data != "phantom":
        load_images(data, 64, progress=False)  # fill the decode cache first: both ways then read it
    runs = args.threads
    start = time.perf_counter()
    for seed in range(runs):  # one process, all threads, the runs one after the other
        _spawn(args.threads, args.epochs, data, seed).wait()
    sequential = time.perf_counter() - start
    start = time.perf_counter()
    procs = [_spawn(1, args.epochs, data, seed) for seed in range(runs)]  # one thread each, side by side
    for p in procs:
        p.wait()
    parallel = time.perf_counter() - start
    result = {
        "data": data,
        "runs": runs,
        "epochs_per_run": args.epochs,
        "method": "trades",
        "preset": "cpu-demo",
        f"one_process_{args.threads}_threads_seconds": sequential,
        f"{runs}_processes_1_thread_seconds": parallel,
        "speedup": sequential / parallel,
        "environment": environment_info(),
        "recorded": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "environment"}, indent=2))
    write_record(args.out, result)


if __name__ == "__main__":
    main()
