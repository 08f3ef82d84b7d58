"""Seconds per training step of one run shared by N ranks (DDP, launched by torchrun) against one process,
on the same global batch; with a paper estimate of the gradient traffic per step for more GPUs.

Every setting runs in its own processes: ``plain`` is one process without DDP (all the threads the ranks have
together); ``ranks=N`` is ``python -m torch.distributed.run --standalone --nproc_per_node N`` with
``threads / N`` threads per rank (gloo on the CPU, NCCL on CUDA, one GPU per rank). A step is timed on rank 0
from a barrier to the end of its optimizer step, which waits for the gradients' all-reduce, so it is the slowest
rank's step. ``ranks=1`` against ``plain`` is the overhead of DDP itself (on one GPU: the issue's 5% target).

Usage:
    python benchmarks/ddp.py                                          # CPU: plain vs 2 gloo ranks, 64 px
    python benchmarks/ddp.py --device cuda --ranks 1 --size 224 --batch 64   # DDP on one GPU vs no DDP
    python benchmarks/ddp.py --size 32 --batch 8 --steps 2 --out /tmp/ddp.json   # a smoke test
Writes benchmarks/results/ddp_<device>.json.
"""

import argparse
import json
import os
import sys
import time

import _harness as harness
import torch

METHODS = ("erm", "robustmed")


def _measure(args) -> dict:
    """One setting's step times (run inside each launched process; rank 0 prints the result)."""
    torch.set_num_threads(args.threads)
    from robustmed_lite import distributed

    # noise from the first step, for the methods that have it
    trainer = harness.step_trainer(args, args.method, args.attack_steps, defaults={"weight_noise_warmup": 0})
    rank, ranks = distributed.rank(), distributed.world_size()
    x, x_aug, y = next(trainer.data.train.batches(args.batch, epoch=0, rank=rank, ranks=ranks))[:3]
    attack = trainer.sample_attack(0)
    sync = harness.device_sync(trainer.device)
    times = []
    for step in range(args.warmup + args.steps):
        distributed.barrier()
        sync()
        start = time.perf_counter()
        trainer.train_step(x, x_aug, y, 0, attack, global_batch=args.batch)
        sync()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    parameters = sum(p.numel() for p in trainer.model.parameters())
    proxy = sum(p.numel() for p in getattr(trainer.weight_noise, "stepped", []))
    distributed.teardown()
    return {
        "method": args.method,
        "setting": f"ranks={ranks}" if args.launched else "plain",
        "ranks": ranks,
        "threads_per_process": args.threads,
        "seconds_per_step": harness.median(times),
        "all_seconds": times,
        "parameters": parameters,
        "proxy_parameters": proxy,
    }


def _run(args, method: str, ranks: int | None) -> dict:
    """Measures one method in fresh processes: ``ranks`` None is the plain process."""
    threads = str(args.threads // (ranks or 1))
    options = ["--single", method, "--threads", threads]
    options += harness.forwarded(args, ("device", "size", "batch", "model", "steps", "warmup", "attack_steps"))
    if ranks is None:
        cmd = [sys.executable, __file__, *options]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(ranks),
            __file__,
            *options,
            "--launched",
        ]
    return harness.run_measurement(cmd, OMP_NUM_THREADS=threads)


def allreduce_estimate(parameters: int, ranks: int) -> dict:
    """Bytes each rank sends (and receives) per step in a ring all-reduce of float32 gradients: 2 (N - 1) / N
    times the gradients' size (the model's, plus the proxy's perturbed weights for weight noise). An estimate on
    paper, not a measurement."""
    size = parameters * 4
    return {
        "ranks": ranks,
        "gradient_mb": round(size / 1e6, 1),
        "ring_traffic_mb_per_rank": round(size * 2 * (ranks - 1) / ranks / 1e6, 1),
    }


def main():
    parser = harness.measuring_parser(__doc__)
    batch_help = "the global batch (split over the ranks)"
    harness.add_step_options(parser, METHODS, model="tiny_visformer", steps=5, warmup=2, batch_help=batch_help)
    parser.add_argument("--ranks", nargs="+", type=int, default=[2], help="numbers of ranks to launch")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads of all ranks together")
    parser.add_argument("--attack_steps", type=int, default=10)
    parser.add_argument("--launched", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single:
        result = _measure(argparse.Namespace(**{**vars(args), "method": args.single}))
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(result))
        return
    rows = []
    for method in args.methods:
        plain = _run(args, method, None)
        for row in (plain, *(_run(args, method, n) for n in args.ranks)):
            row["vs_plain"] = round(row["seconds_per_step"] / plain["seconds_per_step"], 3)
            print(
                f"{method:10s} {row['setting']:8s} {row['seconds_per_step']:7.3f} s/step  x{row['vs_plain']} of plain"
            )
            rows.append(row)
    from robustmed_lite.runinfo import environment_info

    device = torch.device(args.device).type
    harness.write_record(
        args.out or harness.results_file(f"ddp_{device}.json"),
        {
            "benchmark": "ddp",
            "model": args.model,
            "size": args.size,
            "global_batch": args.batch,
            "attack_steps": args.attack_steps,
            "threads": args.threads,
            "results": rows,
            "allreduce_estimate": {
                row["method"]: [allreduce_estimate(row["parameters"] + row["proxy_parameters"], n) for n in (2, 4, 8)]
                for row in rows
                if row["setting"] == "plain"
            },
            "environment": environment_info(),
        },
    )


if __name__ == "__main__":
    main()
