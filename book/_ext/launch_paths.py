"""The header's launch and source buttons open the real notebook, not the symlink the book reads it through.

Sphinx reads only inside its source folder, so the book reaches the chapters through ``book/notebooks``, a
symlink to ``../notebooks``. sphinx-book-theme builds the Colab button and the source links from the page's path
in the book, ``book/notebooks/<name>.ipynb``; in git that path is a symlink, which Colab and GitHub cannot open.
After the theme has made its buttons, every URL into this repository's files gets the path its symlinks resolve to.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# .../<org>/<repo>/blob/<branch>/<path> on GitHub and on Colab (colab.research.google.com/github/...)
_REPO_PATH = re.compile(r"^(?P<head>.*?/(?:blob|edit)/[^/]+/)(?P<path>[^?#]+)(?P<tail>.*)$")


def real_path(path: str, root: Path = ROOT) -> str:
    """A path in the repository with its symlinks resolved: ``book/notebooks/a.ipynb`` -> ``notebooks/a.ipynb``.
    A path that leads outside the repository is returned as it is."""
    root = root.resolve()
    try:
        return (root / path).resolve().relative_to(root).as_posix()
    except ValueError:
        return path


def real_url(url: str, repository: str, root: Path = ROOT) -> str:
    """``url`` with its file path resolved, if it names a file of ``repository`` (``org/name``); else unchanged."""
    match = _REPO_PATH.match(url)
    if match is None or f"/{repository}/" not in match["head"]:
        return url
    return match["head"] + real_path(match["path"], root) + match["tail"]


def _rewrite(buttons: list, repository: str) -> None:
    for button in buttons:
        if "url" in button:
            button["url"] = real_url(button["url"], repository)
        _rewrite(button.get("buttons", []), repository)


def fix_header_buttons(app, pagename, templatename, context, doctree) -> None:
    repository = app.config.html_theme_options.get("repository_url", "").removeprefix("https://github.com/")
    if repository:
        _rewrite(context.get("header_buttons", []), repository.strip("/"))


def setup(app):
    app.connect("html-page-context", fix_header_buttons, priority=900)  # after the theme's (501)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
