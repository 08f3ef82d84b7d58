"""The notebooks' setup cell: device, profile, where the real CT is, and on Colab the repository beside it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from ..runinfo import default_profile, get_device

REPOSITORY = "https://github.com/robustmed-lite/robustmed-lite"
COLAB_CLONE = Path("/content/robustmed-lite")


def on_colab() -> bool:
    """Whether this kernel runs on Google Colab."""
    return "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ


def has_checkout(start: Path) -> bool:
    """Whether ``start`` or a parent holds the repository's notebooks and results."""
    return any((folder / "notebooks").is_dir() and (folder / "results").is_dir() for folder in (start, *start.parents))


def colab_checkout(dest: Path = COLAB_CLONE, verbose: bool = True) -> Path | None:
    """On Colab, where ``pip install`` brought the package without the notebooks and results: a shallow clone of
    the repository into ``dest`` (once; an existing one is reused), which becomes the working directory, so that
    the chapters find the committed results and write their runs there.

    Anywhere else, or where the working directory is already inside a checkout, it does nothing and never touches
    the network.

    Returns:
        The checkout it moved into, or None.
    """
    if not on_colab() or has_checkout(Path.cwd()):
        return None
    if not dest.is_dir():
        subprocess.run(["git", "clone", "--depth", "1", "-q", REPOSITORY, str(dest)], check=True)
    os.chdir(dest)
    if verbose:
        print(f"notebooks and results: {dest} (a shallow clone of {REPOSITORY}), now the working folder")
    return dest


def notebook_setup(verbose: bool = True, fetch=()):
    """What every notebook needs first: the device, the profile and the real-data folder (or None).

    On Colab it first clones the repository where it is missing (``colab_checkout``): the notebooks and the
    committed results come with it.

    Args:
        verbose: Print one line with the three.
        fetch: Real CT sets to download where they are missing, ``"ucsd"`` (public) and ``"sarscov2"`` (Kaggle
            credentials), as ``python -m robustmed_lite data fetch`` does: into the data folder found, else into
            ``ROBUSTMED_DATA`` or ``~/robustmed-data``, which ``ROBUSTMED_DATA`` then names. Every notebook's
            setup cell offers it for Colab.

    Returns:
        ``(device, profile, data_dir)``; profile is 'fast' on a CPU and 'full' on a GPU unless
        ``ROBUSTMED_PROFILE`` says otherwise, and data_dir comes from ``ROBUSTMED_DATA`` or ``../shared/data``.
    """
    from ..data.loaders import find_shared_data

    colab_checkout(verbose=verbose)
    device = get_device()
    profile = default_profile(device)
    if fetch:
        from ..data import fetch as fetching

        env = os.environ.get("ROBUSTMED_DATA")
        dest = Path(env).expanduser() if env else find_shared_data() or Path.home() / "robustmed-data"
        for name in fetch:
            fetching.fetch(name, dest)
        os.environ["ROBUSTMED_DATA"] = str(dest)
    data_dir = find_shared_data()
    if verbose:
        name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
        found = data_dir or "not found, phantom only (FETCH = ['ucsd'] in the setup cell downloads UCSD COVID-CT)"
        print(f"device: {device} ({name}) | profile: {profile} | real CT: {found}")
    return device, profile, data_dir
