"""book/check_offline.py, which `make book` runs on the built pages: it finds what a page loads from the web."""

import importlib.util
from pathlib import Path

import pytest

BOOK = Path(__file__).resolve().parents[1] / "book"
_spec = importlib.util.spec_from_file_location("check_offline", BOOK / "check_offline.py")
check_offline = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_offline)


@pytest.mark.parametrize(
    "tag, remote",
    [
        ('<script src="https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-mml-chtml.js"></script>', True),
        ('<img alt="Open In Colab" src="https://colab.research.google.com/assets/colab-badge.svg" />', True),
        ('<link rel="stylesheet" href="//fonts.example.org/a.css" />', True),
        ('<script src="_static/mathjax/tex-chtml.js"></script>', False),
        ('<img src="../_images/colab-badge.svg" />', False),
        ('<a href="https://colab.research.google.com/github/x/y/blob/main/notebooks/a.ipynb">open</a>', False),
        ('<link rel="canonical" href="https://example.org/page.html" />', False),
    ],
)
def test_remote_loads(tag, remote):
    assert bool(check_offline.remote_loads(f"<html><body>{tag}</body></html>")) is remote


def test_a_build_with_remote_loads_fails(tmp_path, capsys):
    (tmp_path / "_static" / "mathjax").mkdir(parents=True)
    (tmp_path / "_static" / "mathjax" / "tex-chtml.js").write_text("")
    (tmp_path / "index.html").write_text('<img src="_static/colab-badge.svg">')
    assert check_offline.main(str(tmp_path)) == 0
    (tmp_path / "page.html").write_text('<script src="https://cdn.example.org/require.js"></script>')
    assert check_offline.main(str(tmp_path)) == 1
    assert "page.html: 1 remote loads" in capsys.readouterr().err
    assert check_offline.main(str(tmp_path / "nothing")) == 2


def test_the_local_badge_exists():
    assert (BOOK / "_static" / "colab-badge.svg").read_text().lstrip().startswith("<svg")
