"""Prints (or writes) the table of each method's weight-noise settings per preset, with the published values and
their sources, as Markdown: the table the README and the book embed.

    python tools/settings_table.py                  # to stdout
    python tools/settings_table.py --out FILE.md    # to a file
"""

from __future__ import annotations

import argparse
from pathlib import Path

from robustmed_lite.config import settings_markdown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the table to this Markdown file instead of printing it")
    args = parser.parse_args()
    text = settings_markdown()
    if args.out:
        args.out.write_text(text)
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
