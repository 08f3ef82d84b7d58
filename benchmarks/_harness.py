"""What the benchmark scripts share: the timing loop, one training step's setup, a measurement in fresh
processes, and the result file.

The scripts run as ``python benchmarks/<name>.py``, which puts this folder on the import path.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def no_sync() -> None:
    """The CPU's ``sync``: its work is done when a call returns."""


def device_sync(device) -> Callable[[], None]:
    """What waits for a device's queued work: ``torch.cuda.synchronize`` on CUDA (kernels run asynchronously)."""
    import torch

    return torch.cuda.synchronize if torch.device(device).type == "cuda" else no_sync


def seconds_per_call(fn: Callable[[], object], repeats: int, sync=no_sync, warmup: int = 1) -> list[float]:
    """The seconds of each of ``repeats`` calls of ``fn``, after ``warmup`` untimed calls (kernels, caches,
    allocator); ``sync`` is called after each, so that a GPU's queued work counts."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def median(times: list[float]) -> float:
    """The middle time (the upper of the two middle ones for an even count): robust to a stray slow call."""
    return sorted(times)[len(times) // 2]


def add_step_options(parser: argparse.ArgumentParser, methods, model: str, steps: int, warmup: int, batch_help=None):
    """The options of a training-step benchmark: what ``step_trainer`` reads, the methods, and the numbers of
    timed and warm-up steps (defaults as given)."""
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32, help=batch_help)
    parser.add_argument("--model", default=model)
    parser.add_argument("--methods", nargs="+", default=list(methods))
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--warmup", type=int, default=warmup)


def step_trainer(args, method: str, attack_steps: int, defaults: dict | None = None):
    """A ``Trainer`` for timing training steps: the cpu-demo preset with ``args``' model, size, batch (one batch
    of training data, few evaluation images) and device, 8/255 attacks of ``attack_steps`` steps of 2/255.

    Args:
        args: Parsed options with ``model``, ``size``, ``batch`` and ``device``.
        defaults: Settings a method's own value overrides (``load_config``'s ``defaults``).
    """
    import tempfile

    import torch

    torch.set_flush_denormal(True)  # tiny gradients of a confident model otherwise slow CPU steps several-fold
    from robustmed_lite.config import load_config
    from robustmed_lite.trainer import Trainer

    settings = dict(
        method=method,
        model=args.model,
        img_size=args.size,
        batch_size=args.batch,
        n_train=args.batch,
        n_val=8,
        n_test=8,
        eval_n=8,
        attack_steps=attack_steps,
        eps="8/255",
        step_size="2/255",
        device=args.device,
        progress=False,
        out_dir=tempfile.mkdtemp(),
    )
    return Trainer(load_config("cpu-demo", settings, defaults=defaults))


def measuring_parser(description: str) -> argparse.ArgumentParser:
    """A parser for a script that measures in fresh processes (``run_measurement``): with ``--out`` and the
    hidden ``--single``, which tells a measuring process what to measure."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--single", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None)
    return parser


def forwarded(args, names: Iterable[str]) -> list[str]:
    """``--NAME VALUE`` for each of ``names``: the options a script passes on to its measuring process."""
    return [item for name in names for item in (f"--{name}", str(getattr(args, name)))]


def run_measurement(cmd: list[str], **env: str) -> dict:
    """Runs a measuring process (this repository first on its import path, ``env`` added to the environment)
    and returns the last JSON line it printed; its failure ends the benchmark with its command and stderr."""
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=path, **env))
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])


def write_record(out: str | Path, record: dict) -> Path:
    """Writes a benchmark's record as JSON to ``out`` (its folder made if needed) and says where."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"saved {out}")
    return out


def results_file(name: str) -> Path:
    """``benchmarks/results/<name>``: where a benchmark keeps its record unless told otherwise."""
    return Path(__file__).parent / "results" / name
