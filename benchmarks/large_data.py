"""Training on data larger than memory: a slice store read by index against the same slices held in memory.

Writes a phantom of ``--n_train`` training slices (plus 256 validation and 256 test slices) at ``--size`` px as a
slice store once (``python -m robustmed_lite data store``; reused on later runs), then measures each path in a
fresh process, so that each peak resident memory is its own (after ``sync``, so that writing the store back to
disk does not overlap the timings):

* ``store``: ``train --data STORE``: training slices are read from the memory-mapped uint8 file batch by batch,
  the prior view computed per batch;
* ``memory``: the same slices loaded into one float32 tensor first (what ``load_images`` or the phantom give),
  the prior view precomputed for all of them.

For each path: the seconds to get ready (open or load, precompute), one pass over the training data with the prior
view and no model (the data pipeline alone), and one training epoch of ``--method`` (validation included), with
the process's peak resident memory (``VmHWM``, which counts the pages of the mapped file it has touched).

Usage:
    python benchmarks/large_data.py                      # the issue's benchmark: 50,000 slices at 128 px
    python benchmarks/large_data.py --n_train 2048 --size 64 --out /tmp/large.json   # a smoke test
Writes benchmarks/results/large_data_cpu.json.
"""

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from _harness import forwarded, measuring_parser, results_file, run_measurement, write_record

PATHS = ("store", "memory")


def _peak_rss_mb() -> float:
    """The peak resident memory of this process so far (VmHWM), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _measure(args) -> dict:
    """One path, in this (fresh) process."""
    import torch

    torch.set_flush_denormal(True)
    from robustmed_lite.config import load_config
    from robustmed_lite.data.dataset import PriorDataset
    from robustmed_lite.data.splits import build_data
    from robustmed_lite.trainer import Trainer

    cfg = load_config(
        "cpu-demo",
        {
            "data": args.store,
            "img_size": args.size,
            "method": args.method,
            "model": args.model,
            "epochs": 1,
            "batch_size": args.batch,
            "eval_n": 128,
            "prior": True,
            "progress": False,
            "out_dir": tempfile.mkdtemp(),
        },
    )
    start = time.perf_counter()
    splits = build_data(cfg)
    if args.single == "memory":
        train = splits.train
        splits.train = PriorDataset(
            train.images.store.load(train.images.indices),
            train.labels,
            prior=cfg.prior,
            hflip=cfg.hflip,
            vflip=cfg.vflip,
            seed=cfg.seed,
            prior_kwargs=train.prior_kwargs,
        )
    ready = time.perf_counter() - start
    rss_ready = _peak_rss_mb()
    start = time.perf_counter()
    for _ in splits.train.batches(cfg.batch_size, epoch=0):
        pass
    data_pass = time.perf_counter() - start
    trainer = Trainer(cfg, data=splits)
    start = time.perf_counter()
    trainer.fit()
    epoch = time.perf_counter() - start
    n = len(splits.train)
    return {
        "path": args.single,
        "train_slices": n,
        "ready_s": round(ready, 1),
        "peak_rss_ready_mb": round(rss_ready),
        "data_pass_s": round(data_pass, 1),
        "data_pass_slices_per_s": round(n / data_pass),
        "epoch_s": round(epoch, 1),
        "train_slices_per_s": round(n / epoch, 1),
        "val_acc": trainer.history[-1].get("val_clean"),
        "peak_rss_mb": round(_peak_rss_mb()),
    }


def main():
    parser = measuring_parser(__doc__)
    parser.add_argument("--n_train", type=int, default=50_000)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--store", default=None, help="the store folder (default: in the robustmed_lite cache)")
    parser.add_argument("--method", default="erm")
    parser.add_argument("--model", default="tiny_visformer")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    args = parser.parse_args()
    if args.single:
        print(json.dumps(_measure(args)))
        return
    from robustmed_lite.data.loaders import default_cache_dir
    from robustmed_lite.data.slicestore import is_slice_store, write_phantom_store
    from robustmed_lite.runinfo import environment_info

    store = Path(args.store or default_cache_dir() / f"phantom-store-{args.n_train}-{args.size}px")
    reused = is_slice_store(store)
    start = time.perf_counter()
    written = write_phantom_store(store, args.size, args.n_train)
    write_s = time.perf_counter() - start
    os.sync()  # the store's dirty pages reach the disk now, not while the first path is being timed
    print(f"store {store}: {'reused' if reused else f'written in {write_s:.0f} s'}")
    rows = []
    for path in args.paths:
        options = forwarded(args, ("size", "method", "model", "batch"))
        row = run_measurement([sys.executable, __file__, "--single", path, "--store", str(store), *options])
        print(
            f"{path:7s} peak {row['peak_rss_mb']:6.0f} MB  ready {row['ready_s']:6.1f} s  data pass "
            f"{row['data_pass_slices_per_s']:6d} slices/s  epoch {row['epoch_s']:6.1f} s "
            f"({row['train_slices_per_s']} slices/s)"
        )
        rows.append(row)
    write_record(
        args.out or results_file("large_data_cpu.json"),
        {
            "benchmark": "large_data",
            "command": " ".join(["python", "benchmarks/large_data.py", *sys.argv[1:]]),
            "n_train": args.n_train,
            "size": args.size,
            "method": args.method,
            "model": args.model,
            "batch": args.batch,
            "store_mb": round(written.megabytes_on_disk),
            "store_write_s": None if reused else round(write_s, 1),
            "results": rows,
            "environment": environment_info(),
        },
    )


if __name__ == "__main__":
    main()
