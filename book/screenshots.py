"""The built book as a reader sees it with no network: every page of the TOC in headless Chromium, at 1280 px (a
laptop) and 390 px (a phone), screenshotted and checked.

Chromium runs with every host name unresolvable (and, where ``unshare -n`` is allowed, in a network namespace
with no interface but loopback), so anything a page would fetch from the web fails, as in a room without Wi-Fi.
Each page is loaded in a frame of the width under test with a small script added (in a temporary copy beside it)
that measures the page after its scripts and MathJax ran and hands what it found to the frame's page, whose DOM
``--dump-dom`` reads back:

- no table, pre block or display equation wider than the content column unless it sits in a scroll wrapper
  (an element that scrolls sideways and itself fits the column), and no image wider than the column;
- no page wider than the window (nothing to scroll the whole page sideways for on a phone);
- no raw Markdown or LaTeX in the rendered text outside code: ``$``, a table rule ``|---|``, ``**``, ``\\[``;
- formulas rendered by MathJax, and the Colab badges served from the book itself.

Usage: python book/screenshots.py [book/_build/html] [--out book/screenshots] [--shots book/_build/screenshots]
       [--pages intro.html ...] [--if-chromium]
Needs Chromium (Debian: ``apt-get install chromium``). Writes ``report.json`` to ``--out`` (the committed record)
and one PNG per page and width to ``--shots``; exits 1 when a page fails a check, 2 when the book is not built or
no Chromium is found (0 with ``--if-chromium``, which `make book` uses).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

WIDTHS = {1280: 1800, 390: 844}  # window width -> height: a laptop and a phone
NO_NETWORK = ["--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9"]
REPORT_ID = "robustmed-layout-report"

# Runs in the page after its load event and MathJax: measures, then appends its findings as JSON to the body.
MEASURE = """
(function () {
  const SKIP = "code, pre, script, style, mjx-container, kbd, samp, textarea, .highlight, svg";
  const RAW = [[/\\$/, "raw $"], [/\\|\\s*:?-{3,}:?\\s*\\|/, "raw table rule |---|"], [/\\*\\*/, "raw **"],
               [/\\\\\\[|\\\\\\(/, "raw LaTeX"]];
  function describe(el) {
    const text = (el.innerText || el.getAttribute("alt") || el.getAttribute("src") || "").trim();
    return el.tagName.toLowerCase() + ": " + text.replace(/\\s+/g, " ").slice(0, 70);
  }
  function scrollWrapper(el, column) {
    for (let a = el.parentElement; a && a !== column; a = a.parentElement) {
      const o = getComputedStyle(a).overflowX;
      if (o === "auto" || o === "scroll") return a;
    }
    return null;
  }
  function measure() {
    const column = document.querySelector("article.bd-article") || document.querySelector("main") || document.body;
    const col = column.getBoundingClientRect();
    const outside = r => r.right > col.right + 1 || r.left < col.left - 1;
    const problems = [];
    for (const el of column.querySelectorAll("table, pre, img, mjx-container[display='true']")) {
      const r = el.getBoundingClientRect();
      if (r.width === 0 && r.height === 0) continue;  // not shown (a folded solution)
      const kind = el.tagName.toLowerCase() === "mjx-container" ? "equation" : el.tagName.toLowerCase();
      const own = getComputedStyle(el).overflowX;
      if (kind === "img") {
        if (outside(r)) problems.push({check: "image wider than the column", what: describe(el)});
        continue;
      }
      if (own === "auto" || own === "scroll") {  // it scrolls itself: it must fit
        if (outside(r)) problems.push({check: kind + " wider than the column", what: describe(el)});
        continue;
      }
      const wrapper = scrollWrapper(el, column);
      const spills = el.scrollWidth > el.clientWidth + 1;  // its content is wider than its own box
      if (wrapper) {
        if (outside(wrapper.getBoundingClientRect()))
          problems.push({check: "scroll wrapper wider than the column", what: describe(el)});
      } else if (spills && (own === "hidden" || own === "clip")) {
        problems.push({check: kind + " clips its content", what: describe(el)});
      } else if (outside(r) || spills) {
        problems.push({check: kind + " wider than the column, not in a scroll wrapper", what: describe(el)});
      }
    }
    if (document.documentElement.scrollWidth > window.innerWidth + 1) {  // name what sticks out, innermost first
      const out = Array.from(document.body.querySelectorAll("*")).filter(e => {
        const r = e.getBoundingClientRect();
        return r.width > 0 && r.right > window.innerWidth + 1 && !scrollWrapper(e, null);
      });
      const innermost = out.filter(e => !Array.from(e.children).some(c => out.includes(c))).slice(0, 3);
      problems.push({check: "page wider than the window",
                     what: document.documentElement.scrollWidth + " px in a " + window.innerWidth + " px window: "
                           + innermost.map(describe).join("; ")});
    }
    const walker = document.createTreeWalker(column, NodeFilter.SHOW_TEXT);
    for (let node = walker.nextNode(); node; node = walker.nextNode()) {
      if (node.parentElement.closest(SKIP)) continue;
      for (const [pattern, check] of RAW) {
        const m = node.nodeValue.match(pattern);
        if (m) {
          const at = Math.max(0, m.index - 30);
          problems.push({check: check + " in the text", what: node.nodeValue.slice(at, at + 70).replace(/\\s+/g, " ")});
        }
      }
    }
    const badges = Array.from(document.querySelectorAll("img")).map(i => i.getAttribute("src") || "")
      .filter(s => s.includes("colab-badge"));
    const report = {
      width: window.innerWidth, column_px: Math.round(col.width),
      mathjax_containers: document.querySelectorAll("mjx-container").length,
      badges: badges, remote_badges: badges.filter(s => /^(https?:)?\\/\\//.test(s)), problems: problems,
    };
    parent.postMessage(JSON.stringify(report), "*");  // to the frame page, which --dump-dom reads
  }
  window.addEventListener("load", function () {
    const ready = (window.MathJax && MathJax.startup && MathJax.startup.promise) || Promise.resolve();
    ready.then(() => setTimeout(measure, 300), () => setTimeout(measure, 300));
  });
})();
"""

# Holds the page in a frame of the width under test: headless Chromium will not open a window narrower than 500 px,
# but a frame can be a phone's width, and the page's media queries answer to the frame.
FRAME = """<!DOCTYPE html><html><head><meta charset="utf-8"><style>body {{ margin: 0 }}</style></head><body>
<iframe src="{src}" style="width: {width}px; height: {height}px; border: 0; display: block"></iframe>
<script>
window.addEventListener("message", function (event) {{
  const out = document.createElement("script");
  out.type = "application/json";
  out.id = "{report_id}";
  out.textContent = event.data;
  document.body.appendChild(out);
}});
</script></body></html>"""


def chromium() -> str | None:
    """The Chromium command found on the PATH, or None."""
    return next((n for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def offline_prefix() -> list[str]:
    """``unshare -n`` where this user may create a network namespace; nothing otherwise."""
    if shutil.which("unshare") and subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0:
        return ["unshare", "-n"]
    return []


def browse(page: Path, width: int, height: int, *args: str) -> subprocess.CompletedProcess:
    command = [
        *offline_prefix(),
        chromium() or "chromium",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--window-size={width},{height}",
        "--virtual-time-budget=10000",
        *NO_NETWORK,
        *args,
        page.as_uri(),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=180)


def measure(page: Path, width: int, screenshot: Path | None = None) -> dict:
    """Loads ``page`` in a frame ``width`` pixels wide with the measuring script (both from temporary copies beside
    the page, so that its relative links still resolve), saves a screenshot where asked, and returns what the
    script found."""
    height = WIDTHS.get(width, 1200)
    html = page.read_text(encoding="utf-8")
    script = f"<script>{MEASURE}</script>"
    html = html.replace("</head>", script + "</head>", 1) if "</head>" in html else script + html
    probe = page.with_name(f".{page.stem}.layout-check.html")
    frame = page.with_name(f".{page.stem}.layout-frame.html")
    probe.write_text(html, encoding="utf-8")
    frame.write_text(FRAME.format(src=probe.name, width=width, height=height, report_id=REPORT_ID), encoding="utf-8")
    shot = [f"--screenshot={screenshot.resolve()}"] if screenshot else []
    try:
        dom = browse(frame, max(width, 500), height, "--dump-dom", *shot).stdout
    finally:
        probe.unlink()
        frame.unlink()
    found = re.search(rf'<script type="application/json" id="{REPORT_ID}">(.*?)</script>', dom, re.S)
    if found is None:
        return {"problems": [{"check": "the page did not finish loading", "what": str(page)}]}
    return json.loads(found.group(1))


def toc_pages() -> list[str]:
    """The built page of every document of the table of contents, in reading order."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from execute_notebooks import toc_documents

    return [f"{document}.html" for document in toc_documents()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("html", nargs="?", default="book/_build/html")
    parser.add_argument("--out", default="book/screenshots", help="where report.json goes (committed: the record)")
    parser.add_argument("--shots", default="book/_build/screenshots", help="where the PNGs go (one per page, width)")
    parser.add_argument("--pages", nargs="*", help="pages relative to the build (default: every page of the TOC)")
    parser.add_argument("--if-chromium", action="store_true", help="without Chromium, say so and exit 0 (make book)")
    args = parser.parse_args(argv)
    if chromium() is None:
        if args.if_chromium:
            print("book/screenshots.py skipped: no Chromium here (apt-get install chromium runs it)")
            return 0
        print("error: no Chromium found. Fix: apt-get install chromium", file=sys.stderr)
        return 2
    html, out, shots = Path(args.html).resolve(), Path(args.out), Path(args.shots)
    names = args.pages or toc_pages()
    missing = [name for name in names if not (html / name).exists()]
    if missing:
        print(f"error: {html} lacks {', '.join(missing)}. Fix: build the book first (make book)", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    shots.mkdir(parents=True, exist_ok=True)
    report = {"offline": " ".join(offline_prefix() + NO_NETWORK), "widths": list(WIDTHS), "pages": {}}
    failed = 0
    for name in names:
        report["pages"][name] = {}
        for width in WIDTHS:
            shot = shots / f"{name.removesuffix('.html').replace('/', '__')}-{width}.png"
            seen = measure(html / name, width, shot)
            problems = seen.setdefault("problems", [])
            problems += [{"check": "remote badge", "what": b} for b in seen.get("remote_badges", [])]
            problems += [] if shot.exists() else [{"check": "no screenshot", "what": str(shot)}]
            seen["screenshot"] = shot.name
            report["pages"][name][str(width)] = seen
            failed += bool(problems)
            print(
                f"{name} at {width} px: {seen.get('mathjax_containers', 0)} formulas, "
                + (f"{len(problems)} PROBLEMS" if problems else "ok")
                + "".join(f"\n    {p['check']}: {p['what']}" for p in problems)
            )
    report["failures"] = failed
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{len(names)} pages x {len(WIDTHS)} widths: {failed} with problems; {out / 'report.json'}, PNGs in {shots}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
