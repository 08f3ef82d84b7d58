"""`data fetch`: the network is mocked (a fake archive on disk, stand-in openers), so these run offline."""

import http.client
import io
import sys
import types
import urllib.error
import zipfile

import numpy as np
import pytest
from PIL import Image

from robustmed_lite.cli import main
from robustmed_lite.data import fetch as fetch_module
from robustmed_lite.data.fetch import check_counts, download, fetch
from robustmed_lite.data.loaders import DownloadError, load_images

SMALL = {"sarscov2": {"non-COVID": (2, 2), "COVID": (3, 3)}, "ucsd": {"non-COVID": (4, 4), "COVID": (3, 3)}}
SPLIT = ("train", "train", "val", "test")  # the split of the i-th image of each class


@pytest.fixture(autouse=True)
def small_sets(monkeypatch):
    """The published counts, scaled down to the fake archives below."""
    monkeypatch.setattr(fetch_module, "EXPECTED", SMALL)


def _png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (16, 16), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _class_zip(folder: str | None, names: list[str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for i, name in enumerate(names):
            z.writestr(f"{folder}/{name}" if folder else name, _png(i))
        z.writestr("__MACOSX/._x.png", b"resource fork, not an image")
    return buffer.getvalue()


def ucsd_archive(path, n_covid=3, n_non=4, extra_member=None):
    """UCSD's repository as GitHub zips it: the class zips (one with a folder inside, one bare) and Data-split."""
    covid = [f"covid{i}.png" for i in range(n_covid)]
    non = [f"non{i}.jpg" for i in range(n_non)]
    with zipfile.ZipFile(path, "w") as z:
        top = "COVID-CT-master"
        z.writestr(f"{top}/README.md", "See Scripts/README.md")
        z.writestr(f"{top}/Images-processed/CT_COVID.zip", _class_zip("CT_COVID", covid))
        z.writestr(f"{top}/Images-processed/CT_NonCOVID.zip", _class_zip(None, non))
        for sub, cls, names in (("COVID", "CT_COVID", covid), ("NonCOVID", "CT_NonCOVID", non)):
            for split in ("train", "val", "test"):
                listed = [n for i, n in enumerate(names) if SPLIT[i % len(SPLIT)] == split]
                z.writestr(f"{top}/Data-split/{sub}/{split}{cls}.txt", "\n".join(listed) + "\n")
        if extra_member:
            z.writestr(extra_member, b"x")
    return path


def test_fetch_ucsd_from_the_archive(tmp_path, capsys):
    archive = ucsd_archive(tmp_path / "upstream.zip")
    assert main(["data", "fetch", "ucsd", "--dest", str(tmp_path / "data"), "--url", archive.as_uri()]) == 0
    out = capsys.readouterr().out
    root = tmp_path / "data" / "ucsd_covidct"
    assert f"export ROBUSTMED_DATA={(tmp_path / 'data').resolve()}" in out
    assert "4 non-COVID, 3 COVID" in out
    assert not (tmp_path / "data" / "COVID-CT-master.zip").exists()  # the archive is removed once unpacked
    imageset = load_images(root, 16, cache=False)
    assert imageset.layout == "ucsd"
    assert sorted(imageset.labels.tolist()) == [0] * 4 + [1] * 3
    assert sorted(set(imageset.official_split)) == ["test", "train", "val"]
    # a second call counts what is there and downloads nothing
    assert fetch("ucsd", tmp_path / "data", url="https://unreachable.invalid/x.zip") == root.resolve()


def test_offline_is_a_clear_error(tmp_path, capsys):
    def offline(request, timeout):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    with pytest.raises(DownloadError, match=r"could not reach .*offline.*save it as .*COVID-CT-master\.zip"):
        fetch("ucsd", tmp_path, opener=offline)
    assert not (tmp_path / "ucsd_covidct").exists()


class _Response:
    """A stand-in for an HTTP response: honours Range when asked to, can break off after some bytes."""

    def __init__(self, body: bytes, request, honour_range=True, break_after=None):
        start = 0
        wanted = request.get_header("Range")
        if wanted and honour_range:
            start = int(wanted.removeprefix("bytes=").rstrip("-"))
        self.status = 206 if start else 200
        self.body, self.pos, self.break_after = body[start:], 0, break_after
        self.headers = {"Content-Length": str(len(self.body))}

    def read(self, n):
        if self.break_after is not None and self.pos >= self.break_after:
            raise http.client.IncompleteRead(b"", len(self.body) - self.pos)
        chunk = self.body[self.pos : self.pos + min(n, self.break_after or n)]
        self.pos += len(chunk)
        return chunk

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("honour_range", [True, False], ids=["resumed", "restarted"])
def test_an_interrupted_download_resumes_or_restarts_cleanly(tmp_path, honour_range):
    body = ucsd_archive(tmp_path / "a.zip").read_bytes()
    target = tmp_path / "dl" / "COVID-CT-master.zip"
    target.parent.mkdir()
    seen = []

    def breaking(request, timeout):
        seen.append(request.get_header("Range"))
        return _Response(body, request, break_after=len(body) // 3)

    with pytest.raises(DownloadError, match=r"interrupted.*run the same command again: it resumes"):
        download("https://example.org/a.zip", target, opener=breaking)
    assert not target.exists()  # only the .part is there, never a truncated file under the final name
    part = target.with_name(target.name + ".part")
    assert part.stat().st_size == len(body) // 3

    def working(request, timeout):
        seen.append(request.get_header("Range"))
        return _Response(body, request, honour_range=honour_range)

    assert download("https://example.org/a.zip", target, opener=working) == target
    assert target.read_bytes() == body
    assert not part.exists()
    assert seen == [None, f"bytes={len(body) // 3}-"]


def test_wrong_counts_are_an_error_that_says_what_to_do(tmp_path):
    archive = ucsd_archive(tmp_path / "upstream.zip", n_covid=2)
    with pytest.raises(DownloadError, match=r"holds \{'non-COVID': 4, 'COVID': 2\}.*COVID 3.*delete .*ucsd_covidct"):
        fetch("ucsd", tmp_path / "data", url=archive.as_uri())


def test_an_existing_folder_is_counted_never_overwritten(tmp_path):
    root = tmp_path / "data" / "ucsd_covidct"
    (root / "CT_COVID").mkdir(parents=True)
    (root / "CT_NonCOVID").mkdir()
    (root / "CT_COVID" / "mine.png").write_bytes(_png(0))
    with pytest.raises(DownloadError, match=r"not a complete ucsd set: class folder .*CT_NonCOVID .*holds no images"):
        fetch("ucsd", tmp_path / "data", url="https://unreachable.invalid/x.zip")
    (root / "CT_NonCOVID" / "mine.png").write_bytes(_png(1))
    with pytest.raises(DownloadError, match=r"no Data-split/ lists"):
        fetch("ucsd", tmp_path / "data", url="https://unreachable.invalid/x.zip")
    assert (root / "CT_COVID" / "mine.png").read_bytes() == _png(0)


def test_unsafe_archive_paths_are_refused(tmp_path):
    archive = ucsd_archive(tmp_path / "upstream.zip", extra_member="../../evil.txt")
    with pytest.raises(DownloadError, match=r"unsafe path '\.\./\.\./evil\.txt'"):
        fetch("ucsd", tmp_path / "data", url=archive.as_uri())
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "data" / "ucsd_covidct").exists()


def test_sarscov2_without_credentials(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN", "KAGGLE_CONFIG_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setitem(sys.modules, "kaggle", None)
    assert main(["data", "fetch", "sarscov2", "--dest", str(tmp_path / "data")]) == 2
    assert "no Kaggle credentials" in capsys.readouterr().err


def test_sarscov2_through_kaggle(tmp_path, monkeypatch, capsys):
    """The Kaggle zip unpacks with a top folder of its own; the class folders end up in DEST/sarscov2."""
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", "x")

    def download_files(dataset, path, unzip, quiet):
        for cls, n in (("COVID", 3), ("non-COVID", 2)):
            folder = tmp_path / "data" / "sarscov2" / "archive" / cls
            folder.mkdir(parents=True)
            for i in range(n):
                (folder / f"{cls} ({i}).png").write_bytes(_png(i))

    monkeypatch.setitem(
        sys.modules, "kaggle", types.SimpleNamespace(api=types.SimpleNamespace(dataset_download_files=download_files))
    )
    assert main(["data", "fetch", "sarscov2", "--dest", str(tmp_path / "data")]) == 0
    assert check_counts("sarscov2", tmp_path / "data" / "sarscov2") == {"non-COVID": 2, "COVID": 3}
    assert "export ROBUSTMED_DATA=" in capsys.readouterr().out


def test_the_notebook_setup_fetches_where_asked(tmp_path, monkeypatch, capsys):
    from robustmed_lite.book.setup import notebook_setup

    archive = ucsd_archive(tmp_path / "upstream.zip")
    calls = []

    def offline_fetch(name, dest):
        calls.append((name, dest))
        return fetch(name, dest, url=archive.as_uri())

    monkeypatch.setattr(fetch_module, "fetch", offline_fetch)
    monkeypatch.setenv("ROBUSTMED_DATA", str(tmp_path / "data"))
    _, _, data_dir = notebook_setup(fetch=["ucsd"])
    assert calls == [("ucsd", tmp_path / "data")] and data_dir == (tmp_path / "data").resolve()
    assert check_counts("ucsd", data_dir / "ucsd_covidct") == {"non-COVID": 4, "COVID": 3}
    assert f"real CT: {data_dir}" in capsys.readouterr().out
    notebook_setup(fetch=["ucsd"])  # a second call finds the set and downloads nothing
    assert not (tmp_path / "data" / "COVID-CT-master.zip").exists()
