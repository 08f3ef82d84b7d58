"""The built book as a reader sees it with no network: headless Chromium screenshots of three pages.

Chromium runs with every host name unresolvable (and, where ``unshare -n`` is allowed, in a network namespace
with no interface but loopback), so anything a page would fetch from the web fails, as in a room without Wi-Fi.
Besides the screenshots, each page's DOM after its scripts ran is read back: formulas count as rendered when
MathJax turned them into ``mjx-container`` elements and no raw ``\\[`` or ``$$`` is left in the text, and the
Colab badges count when they are images served from the book itself.

Usage: python book/screenshots.py [book/_build/html] [--out book/screenshots]
Needs Chromium (Debian: ``apt-get install chromium``). Writes PNGs and ``report.json`` to ``--out``; exit 1 when a
page shows raw LaTeX or a remote badge.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

PAGES = ("notebooks/02_adversarial_attacks.html", "notebooks/04_weight_perturbation.html", "workshop.html")
NO_NETWORK = ["--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9"]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return name
    raise SystemExit("no Chromium found. Fix: apt-get install chromium")


def offline_prefix() -> list[str]:
    """``unshare -n`` where this user may create a network namespace; nothing otherwise."""
    if shutil.which("unshare") and subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0:
        return ["unshare", "-n"]
    return []


def browse(page: Path, *args: str) -> subprocess.CompletedProcess:
    command = [
        *offline_prefix(),
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--window-size=1280,1800",
        "--virtual-time-budget=8000",
        *NO_NETWORK,
        *args,
        page.as_uri(),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def inspect_dom(dom: str) -> dict:
    """What rendered: MathJax containers, raw LaTeX left in the visible text, and where the badges come from."""
    text = re.sub(r"<(script|style)\b.*?</\1>", "", dom, flags=re.S)
    text = re.sub(r"<mjx-container\b.*?</mjx-container>", "", text, flags=re.S)
    text = re.sub(r"<[^>]+>", "", text)
    badges = re.findall(r'<img[^>]+src="([^"]*colab-badge[^"]*)"', dom)
    return {
        "mathjax_containers": dom.count("<mjx-container"),
        "raw_latex": len(re.findall(r"\\\[|\$\$|\\\(", text)),
        "badges": badges,
        "remote_badges": [b for b in badges if b.startswith(("http:", "https:", "//"))],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("html", nargs="?", default="book/_build/html")
    parser.add_argument("--out", default="book/screenshots")
    args = parser.parse_args()
    html, out = Path(args.html).resolve(), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report, failed = {"offline": " ".join(offline_prefix() + NO_NETWORK), "pages": {}}, False
    for name in PAGES:
        page = html / name
        if not page.exists():
            raise SystemExit(f"{page} does not exist. Fix: build the book first (make book)")
        shot = out / (Path(name).stem + ".png")
        browse(page, f"--screenshot={shot.resolve()}")
        seen = inspect_dom(browse(page, "--dump-dom").stdout)
        seen["screenshot"] = str(shot)
        report["pages"][name] = seen
        problems = (
            ([f"{seen['raw_latex']} raw LaTeX"] if seen["raw_latex"] else [])
            + ([f"remote badges {seen['remote_badges']}"] if seen["remote_badges"] else [])
            + (["no screenshot"] if not shot.exists() else [])
        )
        failed |= bool(problems)
        print(
            f"{name}: {seen['mathjax_containers']} formulas rendered, {len(seen['badges'])} local badge(s)"
            + (f"; PROBLEMS: {', '.join(problems)}" if problems else "")
            + f" -> {shot}"
        )
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
