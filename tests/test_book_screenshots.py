"""book/screenshots.py's checks, on small hand-made pages in headless Chromium (no book build): each kind of
clipping and raw markup it must catch, and the same content made right, which it must pass."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "book"))
import screenshots  # noqa: E402  (book/ is not a package)

needs_chromium = pytest.mark.skipif(screenshots.chromium() is None, reason="no Chromium (apt-get install chromium)")

WIDE = "x" * 400
PAGE = """<!DOCTYPE html><html><head><meta charset="utf-8"><style>body {{ margin: 0 }}
article.bd-article {{ width: 600px; margin: 0 40px; }} pre {{ white-space: pre; }}</style></head>
<body><article class="bd-article">{body}</article></body></html>"""


def _problems(tmp_path: Path, body: str, width: int = 1280) -> list[str]:
    page = tmp_path / "page.html"
    page.write_text(PAGE.format(body=body), encoding="utf-8")
    return [p["check"] for p in screenshots.measure(page, width)["problems"]]


@needs_chromium
def test_a_page_that_fits_passes(tmp_path):
    body = (
        "<p>Short prose with <code>**kwargs</code> and <code>$HOME</code> in code.</p>"
        "<pre>print('code may hold $ and ** and |---|')</pre>"
        "<table><tr><td>a</td><td>b</td></tr></table>"
    )
    assert _problems(tmp_path, body) == []


@needs_chromium
def test_a_wide_table_fails_unless_it_scrolls_inside_the_column(tmp_path):
    table = f"<table><tr><td>key</td><td>{WIDE}</td></tr></table>"
    assert "table wider than the column, not in a scroll wrapper" in _problems(tmp_path, table)
    assert _problems(tmp_path, f'<div style="overflow-x: auto">{table}</div>') == []
    wider = f'<div style="overflow-x: auto; width: 700px">{table}</div>'
    assert _problems(tmp_path, wider) == ["scroll wrapper wider than the column"]


@needs_chromium
def test_a_long_output_line_fails_unless_it_wraps(tmp_path):
    assert "pre wider than the column, not in a scroll wrapper" in _problems(tmp_path, f"<pre>{WIDE}</pre>")
    wrapped = f'<pre style="white-space: pre-wrap; overflow-wrap: anywhere">{WIDE}</pre>'
    assert _problems(tmp_path, wrapped) == []
    assert _problems(tmp_path, f'<pre style="overflow-x: hidden">{WIDE}</pre>') == ["pre clips its content"]


@needs_chromium
def test_raw_markdown_and_latex_in_the_text_fail(tmp_path):
    found = _problems(tmp_path, "<p>the loss is $x_{aug}$, **not** bold</p><p>| a | b |</p><p>|---|---|</p>")
    assert sorted(set(found)) == ["raw $ in the text", "raw ** in the text", "raw table rule |---| in the text"]
    assert _problems(tmp_path, r"<p>\[ a + b \]</p>") == ["raw LaTeX in the text"]


@needs_chromium
def test_an_image_wider_than_the_column_fails_and_the_phone_width_is_checked(tmp_path):
    svg = "%3Csvg xmlns=%27http://www.w3.org/2000/svg%27 width=%27900%27 height=%2710%27/%3E"  # 900 x 10 px
    image = f'<img alt="figure" src="data:image/svg+xml,{svg}">'
    assert _problems(tmp_path, image) == ["image wider than the column"]
    assert _problems(tmp_path, image.replace(">", ' style="max-width: 100%">')) == []
    assert _problems(tmp_path, "<p>fits</p>", width=390) == ["page wider than the window"]  # 600 px column


@needs_chromium
def test_the_report_names_every_page_and_width_and_the_exit_code_says_whether_one_failed(tmp_path):
    html = tmp_path / "html"
    html.mkdir()
    (html / "good.html").write_text(PAGE.format(body="<p>fine</p>").replace("600px", "300px"), encoding="utf-8")
    (html / "bad.html").write_text(PAGE.format(body="<p>**raw**</p>").replace("600px", "300px"), encoding="utf-8")
    out, shots = tmp_path / "record", tmp_path / "shots"
    folders = [str(html), "--out", str(out), "--shots", str(shots), "--pages"]
    assert screenshots.main([*folders, "good.html"]) == 0
    assert screenshots.main([*folders, "good.html", "bad.html"]) == 1
    report = json.loads((out / "report.json").read_text())
    assert set(report["pages"]) == {"good.html", "bad.html"} and report["failures"] == 2
    assert set(report["pages"]["bad.html"]) == {"1280", "390"}
    assert (shots / "good-390.png").exists() and (shots / "bad-1280.png").exists()
    assert screenshots.main([*folders, "missing.html"]) == 2


def test_without_chromium_make_book_skips_with_a_message(monkeypatch, capsys):
    monkeypatch.setattr(screenshots, "chromium", lambda: None)
    assert screenshots.main(["--if-chromium"]) == 0
    assert "skipped: no Chromium" in capsys.readouterr().out
    assert screenshots.main([]) == 2
