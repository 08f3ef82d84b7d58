"""Seconds per training step of every method, with peak memory, and ratios to ERM and to TRADES-10.

Each method runs in its own process (so CPU peak memory is that method's own), on phantom batches, with the
attack at full strength from the first step (no warm-up) and weight noise on.

Usage:
    python benchmarks/train_step.py                                   # CPU, 64 px, visformer_tiny, batch 32
    python benchmarks/train_step.py --device cuda --size 224 --batch 64
Writes benchmarks/results/train_step_<device>_<size>px.json.
"""

import argparse
import json
import resource
import sys

import _harness as harness
import torch

METHODS = ("erm", "pgd_at", "trades", "mart", "awp", "fat", "score", "cap", "robustmed")


def _measure(args) -> dict:
    trainer = harness.step_trainer(args, args.single, attack_steps=10)
    x, x_aug, y = next(trainer.data.train.batches(args.batch, epoch=0))[:3]
    attack = trainer.sample_attack(0)
    cuda = trainer.device.type == "cuda"
    sync = harness.device_sync(trainer.device)
    for _ in range(args.warmup):
        trainer.train_step(x, x_aug, y, 0, attack)
    sync()
    if cuda:  # the peak of the timed steps, not of the warm-up
        torch.cuda.reset_peak_memory_stats()
    times = harness.seconds_per_call(lambda: trainer.train_step(x, x_aug, y, 0, attack), args.steps, sync, warmup=0)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "method": args.single,
        "seconds_per_step": harness.median(times),
        "all_seconds": times,
        "peak_memory_mib": peak / 2**20,
        "memory_kind": "cuda max allocated" if cuda else "process peak RSS",
    }


def main():
    parser = harness.measuring_parser(__doc__)
    harness.add_step_options(parser, METHODS, model="visformer_tiny", steps=3, warmup=1)
    args = parser.parse_args()
    if args.single:
        print(json.dumps(_measure(args)))
        return
    rows = []
    for method in args.methods:
        if args.device.startswith("cuda"):  # the CUDA peak counter resets per method: no process needed
            rows.append(_measure(argparse.Namespace(**{**vars(args), "single": method})))
        else:
            options = harness.forwarded(args, ("device", "size", "batch", "model", "steps", "warmup"))
            rows.append(harness.run_measurement([sys.executable, __file__, "--single", method, *options]))
        print(f"{method:10s} {rows[-1]['seconds_per_step']:7.3f} s/step  peak {rows[-1]['peak_memory_mib']:8.0f} MiB")
    by = {r["method"]: r["seconds_per_step"] for r in rows}
    for r in rows:
        r["vs_erm"] = round(r["seconds_per_step"] / by["erm"], 2) if "erm" in by else None
        r["vs_trades10"] = round(r["seconds_per_step"] / by["trades"], 2) if "trades" in by else None
    print("\nmethod      s/step   x ERM   x TRADES-10")
    for r in rows:
        print(f"{r['method']:10s} {r['seconds_per_step']:7.3f} {r['vs_erm']!s:>7} {r['vs_trades10']!s:>9}")
    from robustmed_lite.runinfo import environment_info

    device = torch.device(args.device).type
    harness.write_record(
        args.out or harness.results_file(f"train_step_{device}_{args.size}px.json"),
        {
            "benchmark": "train_step",
            "model": args.model,
            "size": args.size,
            "batch": args.batch,
            "attack_steps": 10,
            "results": rows,
            "environment": environment_info(),
        },
    )


if __name__ == "__main__":
    main()
