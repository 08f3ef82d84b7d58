"""``python -m robustmed_lite doctor``: is this machine ready for the notebooks? A short report to paste.

Each check says PASS, WARN (works, but not as a workshop expects) or FAIL (a notebook will break), with the fix.
The checks import nothing heavy until they run, so that a broken install is reported, not raised.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

OPENCV_WHEELS = ("opencv-python", "opencv-python-headless", "opencv-contrib-python", "opencv-contrib-python-headless")
MIN_PYTHON = (3, 10)


@dataclass
class Check:
    """One line of the report."""

    name: str
    status: str  # PASS, WARN or FAIL
    detail: str


def check_python() -> Check:
    version = ".".join(map(str, sys.version_info[:3]))
    if sys.version_info[:2] < MIN_PYTHON:
        return Check("python", "FAIL", f"{version}; robustmed-lite needs {'.'.join(map(str, MIN_PYTHON))} or newer")
    return Check("python", "PASS", f"{version} ({platform.system()} {platform.machine()})")


def check_torch() -> Check:
    try:
        import torch
        import torchvision
    except ImportError as err:
        return Check("torch", "FAIL", f"{err}. Fix: pip install torch torchvision (on Colab they are preinstalled)")
    return Check(
        "torch",
        "PASS",
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, {torch.get_num_threads()} CPU threads",
    )


def check_model() -> Check:
    """timm builds the default model and it runs a forward pass: the versions of torch and timm get along."""
    try:
        import timm
        import torch

        from ..models import create_model

        model = create_model("tiny_visformer", img_size=64).eval()
        with torch.no_grad():
            logits = model(torch.rand(1, 1, 64, 64))
    except Exception as err:  # any failure here is the report's point, whatever its type
        return Check(
            "timm",
            "FAIL",
            f"the default model does not run: {type(err).__name__}: {err}. Fix: pip install -U timm (0.9.12 or newer)",
        )
    return Check("timm", "PASS", f"timm {timm.__version__}; the default model runs (logits {tuple(logits.shape)})")


def check_opencv() -> Check:
    installed = []
    for wheel in OPENCV_WHEELS:
        try:
            installed.append(f"{wheel} {metadata.version(wheel)}")
        except metadata.PackageNotFoundError:
            continue
    if len(installed) > 1:
        return Check(
            "opencv",
            "FAIL",
            f"{len(installed)} OpenCV wheels share one cv2 folder ({', '.join(installed)}). "
            "Fix: pip uninstall them all, then pip install opencv-contrib-python-headless",
        )
    try:
        import cv2
    except ImportError as err:
        return Check("opencv", "FAIL", f"{err}. Fix: pip install opencv-contrib-python-headless")
    if not hasattr(cv2, "ximgproc"):
        return Check(
            "opencv",
            "WARN",
            f"cv2 {cv2.__version__} without ximgproc (not a contrib build): the package "
            "works, but the guided-filter reference check of notebook 01 is skipped. Fix: "
            "pip install opencv-contrib-python-headless instead",
        )
    return Check("opencv", "PASS", f"cv2 {cv2.__version__} with ximgproc")


def check_device() -> Check:
    import torch

    from ..runinfo import default_profile, get_device

    device = get_device()
    if device.type == "cuda":
        try:
            x = torch.rand(256, 256, device=device)
            (x @ x).sum().item()
        except RuntimeError as err:
            return Check(
                "device",
                "FAIL",
                f"CUDA is visible but does not run ({err}). Fix: restart the runtime, "
                "or reinstall the torch build that matches the driver",
            )
        return Check(
            "device",
            "PASS",
            f"cuda: {torch.cuda.get_device_name(0)}; notebooks use the {default_profile(device)!r} profile",
        )
    return Check(
        "device",
        "PASS",
        f"cpu (no GPU found); notebooks use the {default_profile(device)!r} profile, minutes per notebook",
    )


def check_data() -> list[Check]:
    """The real CT sets where the notebooks look; none is a warning (the phantom stands in), a broken one a failure."""
    from ..data.fetch import FOLDERS, check_counts
    from ..data.loaders import DataError, find_shared_data

    try:
        root = find_shared_data()
    except DataError as err:
        return [Check("data", "FAIL", str(err))]
    if root is None:
        return [
            Check(
                "data",
                "WARN",
                "no real CT found (ROBUSTMED_DATA unset and no ../shared/data): the notebooks "
                "use the phantom. Fix: python -m robustmed_lite data fetch ucsd --dest DIR, "
                "then export ROBUSTMED_DATA=DIR",
            )
        ]
    checks = []
    for name, folder in FOLDERS.items():
        if not (root / folder).is_dir():
            checks.append(
                Check(
                    f"data:{name}",
                    "WARN",
                    f"{root / folder} is absent. Fix: python -m robustmed_lite data fetch {name} --dest {root}",
                )
            )
            continue
        try:
            counts = check_counts(name, root / folder)
        except Exception as err:  # DataError or DownloadError: both say what is wrong and what to do
            checks.append(Check(f"data:{name}", "FAIL", str(err)))
            continue
        checks.append(
            Check(f"data:{name}", "PASS", f"{root / folder}: " + ", ".join(f"{n} {cls}" for cls, n in counts.items()))
        )
    return checks


def check_writable(name: str, folder: Path) -> Check:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as err:
        return Check(
            name,
            "FAIL",
            f"cannot write to {folder} ({err}). Fix: run from a folder you own, or set "
            "ROBUSTMED_CACHE to a writable folder",
        )
    return Check(name, "PASS", f"{folder} is writable")


def run_checks() -> list[Check]:
    """Every check, in the order a broken install is best diagnosed."""
    from ..data.loaders import default_cache_dir

    checks = [check_python(), check_torch()]
    if checks[-1].status == "FAIL":  # the rest needs torch
        return checks
    checks += [
        check_model(),
        check_opencv(),
        check_device(),
        *check_data(),
        check_writable("runs", Path(os.getcwd()) / "runs"),
        check_writable("cache", default_cache_dir()),
    ]
    return checks


def report(checks: list[Check]) -> str:
    """The report an attendee pastes: one line a check, then the verdict."""
    try:
        version = metadata.version("robustmed-lite")
    except metadata.PackageNotFoundError:
        version = "(not installed: run from a source folder)"
    lines = [f"robustmed-lite {version}"] + [f"{c.status:<4}  {c.name:<14} {c.detail}" for c in checks]
    counts = {s: sum(c.status == s for c in checks) for s in ("PASS", "WARN", "FAIL")}
    verdict = "ready" if not counts["FAIL"] else "not ready: fix the FAIL lines above"
    lines.append(
        f"robustmed-lite doctor: {counts['PASS']} passed, {counts['WARN']} warnings, {counts['FAIL']} failed "
        f"- {verdict}"
    )
    return "\n".join(lines)
