"""Fails when a built page loads anything from the web, so that the book reads offline (issue 15).

Usage: python book/check_offline.py book/_build/html
"""

import re
import sys
from pathlib import Path

# Loaded resources only: a link the reader clicks (Colab, GitHub, papers) may point anywhere.
LOADS = re.compile(r"""<(?:script[^>]*\ssrc|img[^>]*\ssrc|link[^>]*\shref)=["'](https?:)?//[^"']+["']""", re.I)
STYLESHEET_OR_SCRIPT = re.compile(r"<(script|img)\b|<link[^>]*rel=[\"'](?:stylesheet|preload)", re.I)


def remote_loads(html: str) -> list[str]:
    """The tags of a page that load a script, style sheet or image from another host."""
    found = []
    for match in LOADS.finditer(html):
        tag = html[match.start() : html.index(">", match.start()) + 1]
        if STYLESHEET_OR_SCRIPT.search(tag):
            found.append(tag)
    return found


def main(build: str) -> int:
    root = Path(build)
    pages = sorted(root.rglob("*.html"))
    if not pages:
        print(f"error: no pages under {root}: build the book first (make book)", file=sys.stderr)
        return 2
    problems = {str(p.relative_to(root)): remote_loads(p.read_text(encoding="utf-8")) for p in pages}
    problems = {page: tags for page, tags in problems.items() if tags}
    if not (root / "_static" / "mathjax" / "tex-chtml.js").is_file():
        problems["_static/mathjax"] = ["the local MathJax is missing (sphinx-mathjax-offline in _config.yml)"]
    for page, tags in problems.items():
        print(f"{page}: {len(tags)} remote loads, e.g. {tags[0][:200]}", file=sys.stderr)
    print(
        f"{len(pages)} pages checked: "
        + ("every script, style sheet and image is local" if not problems else f"{len(problems)} load from the web")
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "book/_build/html"))
