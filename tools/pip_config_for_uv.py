"""Prints the uv arguments that carry over this machine's pip configuration (indexes, find-links, constraints).

uv reads its own settings, not pip's, so a machine whose packages come from a mirror configured for pip (pip.conf
or ``PIP_*`` variables, as on CI here) would otherwise send uv to pypi.org. pip lists every index on an equal
footing; ``--index-strategy unsafe-best-match`` makes uv do the same when there is more than one.

Usage (what the Makefile runs): uv pip install $(python tools/pip_config_for_uv.py) ...
"""

import shlex
import subprocess
import sys

OPTIONS = {
    "index-url": "--index-url",
    "extra-index-url": "--extra-index-url",
    "find-links": "--find-links",
    "constraint": "--constraint",
}


def pip_settings() -> list[tuple[str, str]]:
    """(option, value) pairs from ``pip config list``, which merges the files and the ``PIP_*`` variables."""
    listing = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=False
    )  # no pip configuration: no arguments
    settings = []
    for line in listing.stdout.splitlines():
        key, _, value = line.partition("=")
        option = key.rpartition(".")[2]
        if option in OPTIONS:
            # a value is quoted by pip and may hold several space-separated entries
            settings += [(option, entry) for entry in shlex.split(shlex.split(value)[0] if value else "")]
    return list(dict.fromkeys(settings))


def uv_arguments(settings: list[tuple[str, str]]) -> list[str]:
    arguments = [part for option, value in settings for part in (OPTIONS[option], value)]
    indexes = sum(option.endswith("index-url") for option, _ in settings)
    return arguments + (["--index-strategy", "unsafe-best-match"] if indexes else [])


if __name__ == "__main__":
    print(shlex.join(uv_arguments(pip_settings())))
