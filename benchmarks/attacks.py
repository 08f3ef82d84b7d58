"""PGD-10 speed: ours against torchattacks' PGD and against the floor, on the same model and batch.

The floor is what any PGD-10 must pay: 10 forward passes plus 10 backward passes to the input
(``torch.autograd.grad`` of a summed float32 cross-entropy), with no step, projection or bookkeeping. The three
are timed interleaved, in a rotating order, and the median of the repeats is reported, so that load from other
processes hits all three alike. Targets: torchattacks / ours >= 1.0 and ours / floor <= 1.05.

On the CPU, denormal floats are flushed to zero for all three (``torch.set_flush_denormal``): at the clean input
a confident model's gradients underflow into denormals, which slow CPU arithmetic several-fold, so a pass's cost
would depend on where the input lies (the floor's clean x, or PGD's high-loss iterates) rather than on the code.

Usage:
    python benchmarks/attacks.py                       # CPU: visformer_tiny and resnet18 at 64 and 224 px
    python benchmarks/attacks.py --device cuda --amp   # GPU, under autocast (fp16)
Results are merged into benchmarks/results/attacks.json under a key per device (and AMP).
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _harness import results_file, write_record

from robustmed_lite.evaluation.attacks import PGD
from robustmed_lite.models import create_model
from robustmed_lite.runinfo import environment_info

EPS, ALPHA, STEPS = 8 / 255, 2 / 255, 10
DEFAULT_BATCH = {"cpu": {64: 32, 224: 8}, "cuda": {64: 256, 224: 64}}


def floor(model, x, y):
    """The passes any PGD-10 needs, and nothing else."""
    for _ in range(STEPS):
        leaf = x.detach().requires_grad_()
        loss = F.cross_entropy(model(leaf).float(), y, reduction="sum")
        torch.autograd.grad(loss, leaf)


def timed(fn, device, amp_dtype):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench(model_name, size, batch, device, amp_dtype, repeats):
    import torchattacks

    model = create_model(model_name, img_size=size).to(device).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 1, size, size, generator=gen).to(device)
    y = torch.randint(0, 2, (batch,), generator=gen).to(device)
    ours = PGD(EPS, alpha=ALPHA, steps=STEPS, seed=0)
    theirs = torchattacks.PGD(model, eps=EPS, alpha=ALPHA, steps=STEPS, random_start=True)
    runs = {
        "ours": lambda: ours(model, x, y),
        "torchattacks": lambda: theirs(x, y),
        "floor": lambda: floor(model, x, y),
    }
    for fn in runs.values():  # warm-up (allocator, kernels, autotuning)
        timed(fn, device, amp_dtype)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        x_adv = ours(model, x, y)  # time a correct attack: inside the ball and [0, 1], in the input dtype
    valid = bool(
        (x_adv - x).abs().max() <= EPS + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1 and x_adv.dtype == x.dtype
    )
    times = {name: [] for name in runs}
    names = list(runs)
    for r in range(repeats):
        for name in names[r % 3 :] + names[: r % 3]:
            times[name].append(timed(runs[name], device, amp_dtype))
    median = {name: statistics.median(t) for name, t in times.items()}
    return {
        "model": model_name,
        "size": size,
        "batch": batch,
        "output_valid": valid,
        **{f"{name}_s": round(t, 4) for name, t in median.items()},
        "speedup_vs_torchattacks": round(median["torchattacks"] / median["ours"], 3),
        "ratio_to_floor": round(median["ours"] / median["floor"], 3),
        "all_s": {name: [round(v, 4) for v in t] for name, t in times.items()},
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true", help="run under autocast (bf16 on CPU, fp16 on CUDA)")
    parser.add_argument("--models", nargs="+", default=["visformer_tiny", "resnet18"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: per device and size)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads; 1 gives steadier ratios when other processes share the cores",
    )
    parser.add_argument("--out", default=str(results_file("attacks.json")))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    flush_denormal = device.type == "cpu" and torch.set_flush_denormal(True)
    amp_dtype = (torch.float16 if device.type == "cuda" else torch.bfloat16) if args.amp else None
    rows = []
    print(
        f"PGD-10 (eps 8/255, step 2/255) on {device}{' with AMP' if args.amp else ''}, "
        f"{torch.get_num_threads()} threads, median of {args.repeats}"
    )
    print(
        f"{'model':15s} {'px':>4s} {'batch':>5s} {'ours s':>8s} {'t.attacks s':>11s} {'floor s':>8s} "
        f"{'t.attacks/ours':>14s} {'ours/floor':>10s}"
    )
    for model_name in args.models:
        for size in args.sizes:
            batch = args.batch or DEFAULT_BATCH.get(device.type, DEFAULT_BATCH["cuda"]).get(size, 16)
            row = bench(model_name, size, batch, device, amp_dtype, args.repeats)
            rows.append(row)
            print(
                f"{model_name:15s} {size:4d} {batch:5d} {row['ours_s']:8.3f} {row['torchattacks_s']:11.3f} "
                f"{row['floor_s']:8.3f} {row['speedup_vs_torchattacks']:13.3f}x {row['ratio_to_floor']:9.3f}x",
                flush=True,
            )
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {"benchmark": "attacks", "runs": {}}
    key = device.type + ("-amp" if args.amp else "")
    results["runs"][key] = {
        "attack": "PGD-10, L-inf, eps 8/255, step 2/255, random start",
        "repeats": args.repeats,
        "amp_dtype": str(amp_dtype).replace("torch.", "") if amp_dtype else None,
        "flush_denormal": flush_denormal,
        "targets": {"speedup_vs_torchattacks": ">= 1.0", "ratio_to_floor": "<= 1.05"},
        "results": rows,
        "environment": environment_info(),
    }
    write_record(out, results)


if __name__ == "__main__":
    main()
