"""Every notebook follows the book's conventions. (They execute once per CI, in the book build.)"""

import ast
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
BOOK_TOC = ROOT / "book" / "_toc.yml"
REPOSITORY = yaml.safe_load((ROOT / "book" / "_config.yml").read_text())["repository"]["url"]


def _toc_chapters() -> list[str]:
    """Every document of book/_toc.yml after the root, in reading order, whether listed as chapters or in parts."""
    sys.path.insert(0, str(ROOT / "book"))
    import execute_notebooks

    return execute_notebooks.toc_documents()[1:]


def _toc_notebooks() -> list[str]:
    """The chapters of book/_toc.yml that are notebooks, in the book's order (``notebooks/00_tour``)."""
    return [f for f in _toc_chapters() if f.startswith("notebooks/")]


def test_there_are_notebooks():
    """The notebooks folder holds exactly the notebooks the table of contents lists, numbered 00, 01, ... in the
    book's order."""
    assert NOTEBOOKS, "no notebooks found"
    listed = _toc_notebooks()
    assert listed == [f"notebooks/{p.stem}" for p in NOTEBOOKS], "every notebook is a chapter, in file order"
    assert [p.name[:3] for p in NOTEBOOKS] == [f"{i:02d}_" for i in range(len(NOTEBOOKS))]
    assert len(set(listed)) == len(listed), "no chapter is listed twice"


def _setup_cell(path: Path):
    return next(c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")


def _missing_package(test: ast.expr) -> str | None:
    """The package ``p`` of a test ``importlib.util.find_spec(p) is None``, else None."""
    if (
        isinstance(test, ast.Compare)
        and isinstance(test.ops[0], ast.Is)
        and isinstance(test.comparators[0], ast.Constant)
        and test.comparators[0].value is None
        and isinstance(test.left, ast.Call)
        and ast.unparse(test.left.func).endswith("find_spec")
        and len(test.left.args) == 1
    ):
        return ast.literal_eval(test.left.args[0])
    return None


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_the_colab_badge_is_the_first_cells_link_to_this_notebook(path):
    """The first cell is the chapter's title and the Open-in-Colab badge, whose link opens this notebook in this
    repository; no other Colab link in the notebook points elsewhere."""
    cells = nbformat.read(path, as_version=4).cells
    first = cells[0].source
    assert re.match(rf"# {path.name[:2]} · \S", first), "the first line is the chapter's title"
    repo = REPOSITORY.removeprefix("https://github.com/")
    url = f"https://colab.research.google.com/github/{repo}/blob/main/notebooks/{path.name}"
    badge = f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})"
    assert badge in first.splitlines(), "the badge is a line of its own"
    links = re.findall(r"https://colab\.research\.google\.com/github/[^\s)]+", "\n".join(c.source for c in cells))
    assert links == [url], "one Colab link, to this notebook"


# The standard setup cell of book/_config.yml's conventions (issue 32): the checks below must accept it as it is.
STANDARD_SETUP = """\
# Setup: install the package where it is missing (Colab), then find the device, the profile and the data.
import importlib.util
import subprocess
import sys

if importlib.util.find_spec("robustmed_lite") is None:
    PACKAGE = "robustmed-lite @ git+https://github.com/robustmed-lite/robustmed-lite"
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", PACKAGE])
from robustmed_lite.book.setup import notebook_setup

FETCH = []  # on Colab: ["ucsd"] downloads UCSD COVID-CT; "sarscov2" needs a Kaggle token
DEVICE, PROFILE, DATA_DIR = notebook_setup(fetch=FETCH)  # "fast" on a CPU, "full" on a GPU
"""


def _assert_installs_only_where_missing(source: str) -> None:
    """pip runs only under ``if find_spec(package) is None`` (the package itself, and any optional extra a chapter
    needs); the package is imported after its check, unconditionally."""
    tree = ast.parse(source)
    guards = {_missing_package(node.test): node for node in tree.body if isinstance(node, ast.If)}
    guards.pop(None, None)
    assert "robustmed_lite" in guards, "the package is installed only where find_spec does not find it"
    installs = [
        node for node in ast.walk(tree) if isinstance(node, ast.Call) and "pip" in ast.unparse(node).split("install")[0]
    ]
    inside = {id(node): name for name, guard in guards.items() for node in ast.walk(guard)}
    assert installs and all(id(node) in inside for node in installs), "pip runs only inside a guard"
    assert "robustmed_lite" in [inside[id(node)] for node in installs], "the package's own install is guarded by it"
    assert all(not guard.orelse for guard in guards.values())
    after = tree.body[tree.body.index(guards["robustmed_lite"]) + 1 :]
    assert any(isinstance(node, ast.ImportFrom) and node.module.startswith("robustmed_lite") for node in after), (
        "the package is imported after the guard, whether or not it was installed"
    )


def _assert_profile_and_device_from_setup(source: str) -> None:
    """PROFILE is assigned once, from ``notebook_setup`` (the device or ROBUSTMED_PROFILE decide it, never a
    hard-coded value), which offers FETCH and prints the device line (no ``verbose=False``)."""
    setup = ast.parse(source)
    assigned = [
        node
        for node in ast.walk(setup)
        if isinstance(node, ast.Assign)
        and any("PROFILE" in [n.id for n in ast.walk(t) if isinstance(n, ast.Name)] for t in node.targets)
    ]
    assert len(assigned) == 1 and ast.unparse(assigned[0].value.func) == "notebook_setup"
    call = assigned[0].value
    assert not any(k.arg == "verbose" for k in call.keywords), "the setup prints its device line"
    assert "notebook_setup(fetch=FETCH)" in source, "setup reports the device and the profile, offers the data"


def test_the_standard_setup_cell_passes_the_setup_checks():
    _assert_installs_only_where_missing(STANDARD_SETUP)
    _assert_profile_and_device_from_setup(STANDARD_SETUP)
    unguarded = STANDARD_SETUP.replace('if importlib.util.find_spec("robustmed_lite") is None:\n    ', "")
    unguarded = unguarded.replace("\n    subprocess", "\nsubprocess")
    with pytest.raises(AssertionError, match="installed only where find_spec"):
        _assert_installs_only_where_missing(unguarded)
    silent = STANDARD_SETUP.replace("notebook_setup(fetch=FETCH)", "notebook_setup(fetch=FETCH, verbose=False)")
    with pytest.raises(AssertionError, match="prints its device line"):
        _assert_profile_and_device_from_setup(silent)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_the_setup_cell_installs_only_where_the_package_is_missing(path):
    """The first code cell installs only where the package is missing; no cell installs anything with a ! or %
    magic."""
    _assert_installs_only_where_missing(_setup_cell(path).source)
    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type == "code":
            magics = [line for line in cell.source.splitlines() if line.lstrip().startswith(("!", "%"))]
            assert not [m for m in magics if "install" in m], f"an unconditional install: {magics}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_the_profile_switch_comes_from_the_setup_and_sizes_the_work(path):
    """The setup cell sets PROFILE from ``notebook_setup``, and the notebook branches on it."""
    _assert_profile_and_device_from_setup(_setup_cell(path).source)
    code = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
    assert not re.search(r"^\s*PROFILE\s*=", code, re.M), "no cell overrides the profile"
    assert re.search(r"PROFILE == \"(fast|full)\"", code), "the profile switches something"


def test_the_profile_follows_robustmed_profile_and_else_the_device(monkeypatch, tmp_path):
    """notebook_setup's profile: ROBUSTMED_PROFILE where set ('fast' or 'full', anything else refused), else
    'fast' on a CPU."""
    from robustmed_lite.book.setup import notebook_setup

    monkeypatch.setenv("ROBUSTMED_DATA", str(tmp_path))
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.delenv("ROBUSTMED_PROFILE", raising=False)
    device, profile, _ = notebook_setup(verbose=False)
    assert (device.type, profile) == ("cpu", "fast")
    monkeypatch.setenv("ROBUSTMED_PROFILE", "full")
    assert notebook_setup(verbose=False)[1] == "full"
    monkeypatch.setenv("ROBUSTMED_PROFILE", "medium")
    with pytest.raises(ValueError, match="use 'fast' or 'full'"):
        notebook_setup(verbose=False)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_conventions(path):
    nb = nbformat.read(path, as_version=4)
    first = nb.cells[0]
    assert first.cell_type == "markdown" and "colab-badge.svg" in first.source
    repo = REPOSITORY.removeprefix("https://github.com/")
    badge = f"https://colab.research.google.com/github/{repo}/blob/main/notebooks/{path.name}"
    assert f"]({badge})" in first.source, f"the Colab badge opens this notebook in this repository: {badge}"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.get("outputs"), "notebooks are committed without outputs (the book executes them)"
    if any("ipywidgets" in c.source for c in nb.cells if c.cell_type == "code"):
        assert any("static" in c.source.lower() for c in nb.cells), "widgets need a static figure beside them"
    assert f"notebooks/{path.stem}" in BOOK_TOC.read_text(), "the notebook is in the book"


CODE_COLUMNS = 88  # the rendered book shows this many columns of a code cell without a sideways scroll


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_code_wraps_at_88_columns(path):
    nb = nbformat.read(path, as_version=4)
    long = [
        f"cell {i}: {line[:60]}... ({len(line)})"
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code"
        for line in cell.source.splitlines()
        if len(line) > CODE_COLUMNS
    ]
    assert not long, f"{len(long)} code lines are wider than {CODE_COLUMNS} columns:\n" + "\n".join(long)


WORKFLOWS = ROOT / ".github" / "workflows"


def test_the_github_workflows_run_the_readme_commands():
    test = yaml.safe_load((WORKFLOWS / "test.yml").read_text())
    pages = yaml.safe_load((WORKFLOWS / "pages.yml").read_text())
    on_test = test.get("on", test.get(True))  # YAML 1.1 reads a bare `on` key as True
    assert {"push", "pull_request"} <= set(on_test)
    assert [s["run"] for s in test["jobs"]["test"]["steps"] if "run" in s] == ["make test"]
    assert "make test" in (ROOT / "README.md").read_text(), "the workflow runs the README's test command"
    build = pages["jobs"]["build"]["steps"]
    assert [s["run"] for s in build if "run" in s] == ["make book"]
    upload = next(s for s in build if s.get("uses", "").startswith("actions/upload-pages-artifact"))
    assert upload["with"]["path"] == "book/_build/html"
    assert pages["permissions"] == {"contents": "read", "pages": "write", "id-token": "write"}
    assert any(s.get("uses", "").startswith("actions/deploy-pages") for s in pages["jobs"]["deploy"]["steps"])


def _load_launch_paths():
    import importlib.util

    spec = importlib.util.spec_from_file_location("launch_paths", ROOT / "book" / "_ext" / "launch_paths.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _git_files() -> dict[str, str]:
    """Path -> git mode of every tracked file (120000: a symlink)."""
    import subprocess

    out = subprocess.run(["git", "ls-files", "-s"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return {line.split("\t", 1)[1]: line.split()[0] for line in out.splitlines()}


def test_every_launch_and_badge_url_opens_a_real_file_in_git():
    """The book's launch button (as sphinx-book-theme builds it, then _ext/launch_paths.py) and every notebook's
    Colab badge name a file that git tracks and that is not a symlink (Colab cannot open one)."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    launch_paths, files = _load_launch_paths(), _git_files()
    config = yaml.safe_load((ROOT / "book" / "_config.yml").read_text())
    assert "launch_paths" in config["sphinx"]["local_extensions"], "the book loads the rewrite"
    repo, branch = REPOSITORY.removeprefix("https://github.com/"), config["repository"]["branch"]
    colab = config["launch_buttons"]["colab_url"]
    for path in NOTEBOOKS:
        in_book = f"{config['repository']['path_to_book']}/notebooks/{path.name}"  # the theme's path_rel_repo
        for url in (
            f"{colab}/github/{repo}/blob/{branch}/{in_book}",
            f"https://github.com/{repo}/blob/{branch}/{in_book}",
        ):
            fixed = launch_paths.real_url(url, repo)
            target = fixed.split(f"/blob/{branch}/", 1)[1]
            assert files.get(target) not in (None, "120000"), f"{url} -> {fixed}: not a regular file in git"
        badge = nbformat.read(path, as_version=4).cells[0].source
        target = badge.split(f"/blob/{branch}/", 1)[1].split(")", 1)[0]
        assert files.get(target) not in (None, "120000"), f"{path.name}'s badge opens {target}"


def test_the_launch_rewrite_touches_only_this_repositorys_files():
    launch_paths = _load_launch_paths()
    repo = "org/name"
    buttons = [
        {
            "type": "group",
            "buttons": [
                {"url": "https://colab.research.google.com/github/org/name/blob/main/book/notebooks/x.ipynb"},
                {"url": "https://github.com/org/name/edit/main/book/intro.md?plain=1"},
                {"url": "https://github.com/other/name/blob/main/book/notebooks/x.ipynb"},
            ],
        }
    ]
    launch_paths._rewrite(buttons, repo)
    urls = [b["url"] for b in buttons[0]["buttons"]]
    assert urls == [
        "https://colab.research.google.com/github/org/name/blob/main/notebooks/x.ipynb",
        "https://github.com/org/name/edit/main/book/intro.md?plain=1",
        "https://github.com/other/name/blob/main/book/notebooks/x.ipynb",
    ]


def test_the_glossary_defines_the_terms_the_chapters_use():
    glossary = (ROOT / "book" / "glossary.md").read_text()
    terms = [line for line in glossary.split("```{glossary}", 1)[1].splitlines() if line and not line[0].isspace()]
    for needed in (
        "Hounsfield unit (HU)",
        "Window and level",
        "Ground-glass opacity (GGO)",
        "PGD",
        "TRADES",
        "AWP",
        "FAT",
        "mCE",
        "Pointing game",
        "AdaBN",
    ):
        assert needed in terms, f"the glossary lacks {needed!r}"
    assert "file: glossary" in BOOK_TOC.read_text(), "the glossary is in the book"


BOOK = ROOT / "book"
PITFALLS = BOOK / "pitfalls.md"
LINK = re.compile(r"\]\(([^)\s]+)\)")  # the target of a markdown link


def _toc_documents() -> list[str]:
    """The book's documents in reading order, as the table of contents names them (e.g. notebooks/00_tour)."""
    return [yaml.safe_load(BOOK_TOC.read_text())["root"], *_toc_chapters()]


TOC_NOTEBOOKS = [ROOT / f"{doc}.ipynb" for doc in _toc_documents() if doc.startswith("notebooks/")]


def _relative_links(text: str, folder: Path) -> list[tuple[str, str | None]]:
    """(link, the book document it names or None) for every relative link in markdown text, as the book resolves
    it: relative to the page's own folder inside book/, without following the book/notebooks symlink."""
    found = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a URL, or a place on the same page
        path = os.path.normpath(folder / target.split("#", 1)[0])
        document = os.path.relpath(path, BOOK) if os.path.exists(path) else None
        found.append((target, document and os.path.splitext(document)[0]))
    return found


def _bullets(text: str) -> int:
    return len(re.findall(r"^[*-] ", text, flags=re.MULTILINE))


def test_every_chapter_of_the_book_is_a_notebook_the_front_matter_tests_read():
    assert len(TOC_NOTEBOOKS) >= 8 and all(path.exists() for path in TOC_NOTEBOOKS)


@pytest.mark.parametrize("path", TOC_NOTEBOOKS, ids=lambda p: p.name)
def test_every_chapter_opens_with_objectives_and_prerequisites_and_ends_with_takeaways(path):
    nb = nbformat.read(path, as_version=4)
    cells = nb.cells
    front = [c.source for c in cells[:6] if c.cell_type == "markdown" and "**You will be able to:**" in c.source]
    assert len(front) == 1, "one 'You will be able to' block among the first six cells"
    assert "**Know first:**" in front[0], "the opening block says what to know first"
    goals, know = front[0].split("**You will be able to:**", 1)[1].split("**Know first:**", 1)
    assert 3 <= _bullets(goals) <= 4, "three or four objectives"
    assert know.strip(), "the prerequisites are stated"
    chapters = [f"notebooks/{p.stem}" for p in TOC_NOTEBOOKS]
    for target, document in _relative_links(know, BOOK / "notebooks"):
        if target.endswith(".ipynb"):
            assert document in chapters, f"{target} is not a chapter of the book"
            assert chapters.index(document) < chapters.index(f"notebooks/{path.stem}"), (
                f"'Know first' links {target}, which is not an earlier chapter"
            )
    markdown = [i for i, c in enumerate(cells) if c.cell_type == "markdown"]
    takeaways = [i for i in markdown if cells[i].source.startswith("## Takeaways\n")]
    assert len(takeaways) == 1, "one '## Takeaways' cell"
    last = takeaways[0]
    assert last == markdown[-1] or last >= len(cells) - 3, "the takeaways close the chapter"
    assert 3 <= _bullets(cells[last].source) <= 5, "three to five takeaways"
    measured = re.findall(r"\b0\.\d+|\d+(?:\.\d+)? ?%", cells[last].source)
    assert not measured, f"takeaways quote measured values, which belong beside the outputs: {measured}"


@pytest.mark.parametrize("path", TOC_NOTEBOOKS, ids=lambda p: p.name)
def test_every_relative_link_of_a_chapter_opens_a_page_of_the_book(path):
    documents = _toc_documents()
    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type == "markdown":
            for target, document in _relative_links(cell.source, BOOK / "notebooks"):
                assert document in documents, f"{target} is not a page of the book"


def test_the_pitfalls_page_is_in_the_book_and_each_pitfall_links_the_chapter_that_shows_it():
    assert "pitfalls" in _toc_documents(), "the pitfalls page is in the book"
    text = PITFALLS.read_text()
    chapters = {f"notebooks/{p.stem}" for p in TOC_NOTEBOOKS}
    for target, document in _relative_links(text, BOOK):
        assert document in _toc_documents(), f"pitfalls.md links {target}, which is not a page of the book"
    pitfalls = re.split(r"^### ", text, flags=re.MULTILINE)[1:]
    assert 10 <= len(pitfalls) <= 16, f"{len(pitfalls)} pitfalls"
    for pitfall in pitfalls:
        title = pitfall.splitlines()[0]
        for part in ("**The mistake.**", "**Why it misleads.**", "**How this book avoids it.**", "**Shown in**"):
            assert part in pitfall, f"pitfall {title!r} lacks {part}"
        shown = pitfall.split("**Shown in**", 1)[1]
        linked = [document for _, document in _relative_links(shown, BOOK)]
        assert linked and set(linked) <= chapters, f"pitfall {title!r} links the chapter that shows it"


def test_the_tour_explains_hounsfield_units_and_windows_before_the_site_table():
    from robustmed_lite.data.phantom import SITES, Site

    cells = nbformat.read(ROOT / "notebooks" / "00_tour.ipynb", as_version=4).cells
    table = next(i for i, c in enumerate(cells) if c.cell_type == "code" and "SITES.values()" in c.source)
    primer = cells[table - 1]
    assert primer.cell_type == "markdown", "the primer comes right before the site table"
    for words in ("Hounsfield", "window", "-1000", "noise", "kernel", "mediastinal"):
        assert words in primer.source, f"the primer explains {words!r}"
    for field in dataclasses.fields(Site):
        if field.name != "name":
            assert f"`{field.name}`" in primer.source, f"the primer explains the column {field.name!r}"
    # The primer's reading of the sites, checked against the sites themselves.
    a, b, c = SITES["A"], SITES["B"], SITES["C"]
    reference = f"site A is the reference: a standard lung window (level {a.level:g}, width {a.width:g})"
    assert reference in " ".join(primer.source.split()), "site A's window as the primer quotes it"
    assert b.noise_hu > a.noise_hu > c.noise_hu, "B: much more noise, C: little noise"
    assert b.kernel < 0 < a.kernel < c.kernel, "B: a sharp kernel, A: slightly smoothing, C: smooth"
    assert b.width < a.width < c.width, "B: a narrower window, C: a wider one"
    assert b.gamma < a.gamma == 1 < c.gamma, "B: a brighter display, C: a darker one"
    assert b.fov < 2**0.5 < min(a.fov, c.fov), "B: a tighter field of view"
    assert max(c.zoom) < min(a.zoom), "C: a small patient in a large field of view"


def test_make_book_executes_every_chapter_of_the_table_of_contents_longest_first():
    sys.path.insert(0, str(ROOT / "book"))
    import execute_notebooks

    toc = [
        line.split("file: ")[1].strip()
        for line in (ROOT / "book" / "_toc.yml").read_text().splitlines()
        if "file: notebooks/" in line
    ]
    found = execute_notebooks.book_notebooks()
    assert [f"notebooks/{path.stem}" for path in found] == toc and all(path.exists() for path in found)
    ordered = execute_notebooks.longest_first(found)
    assert sorted(ordered) == sorted(found)
    times = {r["notebook"]: r["seconds"] for r in json.loads(execute_notebooks.TIMES.read_text())["notebooks"]}
    assert [times.get(p.name, float("inf")) for p in ordered] == sorted(
        (times.get(p.name, float("inf")) for p in ordered), reverse=True
    )


def test_uv_gets_the_indexes_and_constraints_pip_is_configured_with():
    sys.path.insert(0, str(ROOT / "tools"))
    import pip_config_for_uv as tool

    assert tool.uv_arguments([]) == []
    settings = [
        ("find-links", "/opt/wheels"),
        ("extra-index-url", "file:///a/simple"),
        ("extra-index-url", "file:///b/simple"),
        ("constraint", "/etc/c.txt"),
    ]
    assert tool.uv_arguments(settings) == [
        "--find-links",
        "/opt/wheels",
        "--extra-index-url",
        "file:///a/simple",
        "--extra-index-url",
        "file:///b/simple",
        "--constraint",
        "/etc/c.txt",
        "--index-strategy",
        "unsafe-best-match",
    ]
    assert tool.uv_arguments([("find-links", "/opt/wheels")]) == ["--find-links", "/opt/wheels"]


def test_pip_config_lines_are_read_as_pip_prints_them(monkeypatch):
    sys.path.insert(0, str(ROOT / "tools"))
    import pip_config_for_uv as tool

    listing = (
        "global.cert='/etc/ssl/certs/ca.crt'\n:env:.find-links='/opt/wheels'\n"
        "global.extra-index-url='file:///a/simple file:///b/simple'\nglobal.find-links='/opt/wheels'\n"
    )
    monkeypatch.setattr(
        tool.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, stdout=listing, stderr="")
    )
    assert tool.pip_settings() == [
        ("find-links", "/opt/wheels"),
        ("extra-index-url", "file:///a/simple"),
        ("extra-index-url", "file:///b/simple"),
    ]
