"""``python -m robustmed_lite``: the command line (``cli``)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
