"""Prints (or writes) the table of each method's weight-noise settings per preset, with the published values and
their sources, as Markdown: the table the README and the book embed.

    python tools/settings_table.py                  # to stdout
    python tools/settings_table.py --out book/settings.md    # the book's page (a title and a note above it)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from robustmed_lite.config import settings_markdown

PAGE_HEAD = """# Each method's published settings

Every method trains at the settings of its own public code unless you set a value (`--gamma`, ...): CAP's for
`cap` and `robustmed`, AWP's for `awp`. Where a published setting counts epochs of a 200-epoch run, it is scaled
to the run's length (`config.scale_epochs`: round half up, at least 1) and counted from 1, as both codes count.
An option a method would ignore is refused. This page is written by `python tools/settings_table.py --out
book/settings.md`, and a test checks that it matches the code.

"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the table to this Markdown file instead of printing it")
    args = parser.parse_args()
    text = settings_markdown()
    if args.out:
        args.out.write_text(PAGE_HEAD + text)
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
