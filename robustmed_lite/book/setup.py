"""The notebooks' setup cell: device, profile, and where the real CT is."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..runinfo import default_profile, get_device


def notebook_setup(verbose: bool = True, fetch=()):
    """What every notebook needs first: the device, the profile and the real-data folder (or None).

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
