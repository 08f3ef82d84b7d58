"""Seeds, devices, progress bars and the record of what a run used (config, seed, versions)."""

from __future__ import annotations

import os
import platform
import random
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

_PACKAGES = (
    "robustmed-lite",
    "torch",
    "torchvision",
    "timm",
    "numpy",
    "opencv-contrib-python-headless",
    "opencv-python",
    "opencv-python-headless",
    "pillow",
    "pandas",
    "scipy",
    "scikit-learn",
)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seeds Python, NumPy and torch (all devices).

    Args:
        seed: The seed.
        deterministic: Also ask torch for deterministic kernels (slower on GPU; CPU runs are already
            bitwise reproducible for a fixed thread count).
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


@contextmanager
def flush_denormal() -> Iterator[None]:
    """Flushes denormal floats to zero on the CPU inside the block (torch's default, keeping them, is restored).

    A confident model's tiny gradients and activations (below 1e-38) can make CPU kernels many times slower;
    flushed, they change no prediction."""
    changed = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if changed:
            torch.set_flush_denormal(False)


# Seconds between redraws of a progress bar that writes to a log file or pipe instead of a terminal.
LOG_PROGRESS_INTERVAL = 10.0


def progress_options(enabled: bool = True, stream=None) -> dict:
    """Keyword arguments for every ``tqdm`` bar of the package.

    A terminal redraws a bar in place; a log file or a pipe (CI, ``nohup``, a job scheduler) keeps every redraw,
    and a bar refreshed ten times a second fills it with thousands of lines. There the bar redraws at most every
    ``LOG_PROGRESS_INTERVAL`` seconds, each redraw with its current counter. A bar's ``set_postfix`` must pass
    ``refresh=False``: a forced redraw defeats the interval, and inside a ``for`` loop over the bar it prints the
    counter of the last timed redraw (``0/N`` for the whole first interval). Notebook bars (widgets) are left
    alone.

    Args:
        enabled: False disables the bar.
        stream: Where the bar writes (default ``sys.stderr``, as tqdm does).
    """
    if not enabled:
        return {"disable": True}
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    try:
        terminal = bool(isatty()) if isatty is not None else False
    except (OSError, ValueError):  # a closed or detached stream
        terminal = False
    if terminal or _in_notebook():
        return {"disable": False}
    # miniters=1: the clock is read every step, so a redraw comes as soon as the interval is over; tqdm's dynamic
    # miniters would also let its monitor thread force redraws, which inside a for loop show a stale counter.
    return {"disable": False, "mininterval": LOG_PROGRESS_INTERVAL, "miniters": 1}


def _in_notebook() -> bool:
    """Whether tqdm.auto draws notebook widgets here (a Jupyter kernel with ipywidgets)."""
    from tqdm.auto import tqdm

    # tqdm.auto's class derives from the notebook bar inside a Jupyter kernel, from the text bar elsewhere.
    return any(cls.__module__ == "tqdm.notebook" for cls in tqdm.__mro__)


def get_device(name: str | None = None) -> torch.device:
    """Returns the requested device, or CUDA when available, else the CPU.

    Raises:
        ValueError: A name torch does not know (``gpu``), or a device this machine lacks; the message names the
            devices there are.
    """
    if not name or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(
            f"unknown device {name!r}. Fix: use auto, cpu, cuda, cuda:N or mps (auto takes a GPU where there is one)"
        ) from None
    present = {
        "cpu": True,
        "cuda": torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count(),
        "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
    }
    if not present.get(device.type, True):
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise ValueError(
            f"device {name!r} is not available here ({gpus} CUDA GPU(s) found; torch {torch.__version__}). "
            "Fix: use --device cpu, or auto to take a GPU only where there is one"
        )
    return device


def default_profile(device: torch.device | str | None = None) -> str:
    """The notebook profile: ``ROBUSTMED_PROFILE`` if set, else 'full' on a GPU and 'fast' on a CPU."""
    env = os.environ.get("ROBUSTMED_PROFILE")
    if env:
        if env not in ("fast", "full"):
            raise ValueError(f"ROBUSTMED_PROFILE={env!r}: use 'fast' or 'full'")
        return env
    device = get_device(None if device is None else str(device))
    return "full" if device.type == "cuda" else "fast"


def environment_info() -> dict:
    """Versions of Python, the key libraries and the hardware, for a run's record."""
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    info = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": versions,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
        # The CPU and the kernels torch picked for it: the same code, seeds and threads train bitwise alike on
        # one machine but not across CPUs (the ERM runs of results/sites/cpu and cpu-erm-robustmed differ so).
        "cpu_model": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    return info


def _cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
