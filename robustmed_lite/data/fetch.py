"""Fetching the real CT sets onto a fresh machine (Colab): ``python -m robustmed_lite data fetch NAME --dest DIR``.

Both sets land where ``find_shared_data`` and the notebooks look, one folder per set under ``DIR``, which then is
what ``ROBUSTMED_DATA`` names:

* ``sarscov2`` -> ``DIR/sarscov2``: the Soares set from Kaggle, through ``data.download_sarscov2`` (needs Kaggle
  credentials, which is the one manual step);
* ``ucsd`` -> ``DIR/ucsd_covidct``: UCSD COVID-CT from its public GitHub repository's archive, with the official
  ``Data-split/`` lists beside the class folders.

Every fetch ends with a count check against the published numbers, so a partial or wrong download is an error
that says what to do, not a data set that is quietly smaller. The archive download resumes a partial file where
the server allows it (HTTP Range) and starts again cleanly where it does not.
"""

from __future__ import annotations

import http.client
import io
import os
import shutil
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

from tqdm.auto import tqdm

from ..common import CLASS_NAMES
from ..runinfo import progress_options
from .loaders import DataError, DownloadError, build_index, download_sarscov2, file_kind

UCSD_REPOSITORY = "https://github.com/UCSD-AI4H/COVID-CT"
UCSD_ARCHIVE_URL = f"{UCSD_REPOSITORY}/archive/refs/heads/master.zip"
FOLDERS = {"sarscov2": "sarscov2", "ucsd": "ucsd_covidct"}  # the names find_shared_data's users expect
LAYOUTS = {"sarscov2": "kaggle", "ucsd": "ucsd"}
# Published counts: Soares et al. report 1252 + 1230; the public copy lacks one non-COVID file (1229).
EXPECTED = {
    "sarscov2": {"non-COVID": (1229, 1230), "COVID": (1252, 1252)},
    "ucsd": {"non-COVID": (397, 397), "COVID": (349, 349)},
}
UCSD_CLASS_ZIPS = {"CT_COVID.zip": "CT_COVID", "CT_NonCOVID.zip": "CT_NonCOVID"}
CHUNK = 1 << 20


def count_classes(name: str, root: Path) -> dict[str, int]:
    """Images per class of a fetched set, read from its folders (no pixel is decoded)."""
    try:
        index = build_index(Path(root), LAYOUTS[name])
    except DataError as err:
        raise DownloadError(f"{root} is not a complete {name} set: {err}. Or delete {root} and fetch it again") from err
    if name == "ucsd" and index.official_split is None:
        raise DownloadError(
            f"{root} has no Data-split/ lists beside its class folders, so UCSD's official split "
            f"is lost. Fix: delete {root} and fetch it again"
        )
    return {cls: index.labels.count(label) for label, cls in enumerate(CLASS_NAMES)}


def check_counts(name: str, root: Path) -> dict[str, int]:
    """The class counts of ``root``, or a DownloadError when they are not the published ones."""
    counts = count_classes(name, root)
    wrong = {cls: n for cls, n in counts.items() if not EXPECTED[name][cls][0] <= n <= EXPECTED[name][cls][1]}
    if wrong:
        expected = ", ".join(
            f"{cls} {lo}" if lo == hi else f"{cls} {lo}-{hi}" for cls, (lo, hi) in EXPECTED[name].items()
        )
        raise DownloadError(
            f"{root} holds {counts}, but the published {name} set has {expected}: the download is "
            f"incomplete or not that set. Fix: delete {root} and run python -m robustmed_lite data "
            f"fetch {name} --dest {Path(root).parent} again"
        )
    return counts


def download(url: str, file: Path, *, opener=urllib.request.urlopen) -> Path:
    """Downloads ``url`` to ``file`` through ``file.part``, resuming a partial ``.part`` where the server allows.

    Args:
        url: What to download (``https://`` or ``file://``).
        file: Where it ends up; it appears only once the download is complete.
        opener: ``urllib.request.urlopen`` or a stand-in (tests).

    Raises:
        DownloadError: No network, a refused download, or an interrupted one (the message says that running the
            same command again resumes it).
    """
    part = file.with_name(file.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = opener(request, timeout=60)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # the range starts past the end: the .part is not this file, start again
            part.unlink()
            return download(url, file, opener=opener)
        raise DownloadError(
            f"{url} answered HTTP {err.code} ({err.reason}). Fix: check the address, or download "
            f"it by hand on a machine with internet and save it as {file}"
        ) from err
    except (urllib.error.URLError, OSError) as err:
        raise DownloadError(
            f"could not reach {url} ({err}): you seem to be offline or behind a firewall. Fix: "
            f"download it by hand on a machine with internet and save it as {file}"
        ) from err
    with response:
        resumed = have > 0 and getattr(response, "status", None) == 206
        if have and not resumed:  # the server sent the whole file, not the rest: a clean restart
            have = 0
        length = response.headers.get("Content-Length")
        total = int(length) + have if length else None
        try:
            with (
                open(part, "ab" if resumed else "wb") as out,
                tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=file.name, **progress_options()) as bar,
            ):
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
        except (OSError, http.client.HTTPException) as err:
            raise DownloadError(
                f"the download of {url} was interrupted ({err}) after {part.stat().st_size} bytes. "
                "Fix: run the same command again: it resumes from there"
            ) from err
    size = part.stat().st_size
    if total is not None and size != total:
        raise DownloadError(
            f"the download of {url} stopped at {size} of {total} bytes. Fix: run the same command "
            "again: it resumes from there"
        )
    part.replace(file)
    return file


def _safe_name(member: str) -> PurePosixPath:
    path = PurePosixPath(member)
    if path.is_absolute() or ".." in path.parts:
        raise DownloadError(
            f"the archive holds an unsafe path {member!r}; nothing was unpacked. Fix: download it "
            "again from the official repository"
        )
    return path


def unpack_ucsd(archive: Path, target: Path) -> Path:
    """Unpacks UCSD's repository archive into ``target``: ``CT_COVID/``, ``CT_NonCOVID/`` and ``Data-split/``.

    The images sit in two zips inside the archive (``Images-processed/CT_COVID.zip``, ``CT_NonCOVID.zip``);
    each image lands directly in its class folder, whether the inner zip holds a folder or bare files, because
    the split lists name images by class folder and file name. Unpacks into ``target.partial`` first, so that
    ``target`` appears only complete.
    """
    partial = target.with_name(target.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)  # our own leftover of an interrupted unpack
    try:
        with zipfile.ZipFile(archive) as outer:
            names = [(_safe_name(m.filename), m) for m in outer.infolist() if not m.is_dir()]
            inner = {p.name: m for p, m in names if p.name in UCSD_CLASS_ZIPS and "Images-processed" in p.parts}
            splits = [(p, m) for p, m in names if "Data-split" in p.parts and p.suffix == ".txt"]
            if len(inner) < len(UCSD_CLASS_ZIPS) or not splits:
                raise DownloadError(
                    f"{archive} lacks Images-processed/{{{','.join(UCSD_CLASS_ZIPS)}}} or "
                    f"Data-split/*.txt: it is not UCSD's COVID-CT repository. Fix: delete it and "
                    "fetch again"
                )
            for path, member in splits:
                dest = partial.joinpath("Data-split", *path.parts[path.parts.index("Data-split") + 1 :])
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(outer.read(member))
            for zip_name, folder in UCSD_CLASS_ZIPS.items():
                (partial / folder).mkdir(parents=True)
                with zipfile.ZipFile(io.BytesIO(outer.read(inner[zip_name]))) as images:
                    for member in images.infolist():
                        path = _safe_name(member.filename)
                        if member.is_dir() or "__MACOSX" in path.parts or path.name.startswith("."):
                            continue
                        if file_kind(path.name) is None:
                            continue
                        dest = partial / folder / path.name
                        if dest.exists():
                            raise DownloadError(
                                f"{zip_name} in {archive} holds {path.name} twice. Fix: delete the "
                                "archive and fetch again"
                            )
                        dest.write_bytes(images.read(member))
    except zipfile.BadZipFile as err:
        raise DownloadError(f"{archive} is not a readable zip ({err}). Fix: delete it and fetch again") from err
    partial.replace(target)
    return target


def fetch(name: str, dest: str | os.PathLike, *, url: str = UCSD_ARCHIVE_URL, opener=urllib.request.urlopen) -> Path:
    """Fetches one real CT set into ``dest/<folder>`` and checks its counts; a no-op where it is already there.

    Args:
        name: ``sarscov2`` (Kaggle, credentials needed) or ``ucsd`` (GitHub archive).
        dest: The data root, the folder ``ROBUSTMED_DATA`` then names.
        url: The UCSD archive (a mirror, or ``file://`` for a copy at hand).
        opener: ``urllib.request.urlopen`` or a stand-in (tests).

    Returns:
        The set's folder, ready for ``load_images``.

    Raises:
        DownloadError: Offline, no credentials, an interrupted download, or counts that are not the published
            ones; the message says what to do.
    """
    if name not in FOLDERS:
        raise DownloadError(f"unknown data set {name!r}. Fix: use one of {', '.join(FOLDERS)}")
    dest = Path(dest).expanduser().resolve()
    in_the_way = next((p for p in (dest, *dest.parents) if p.exists() and not p.is_dir()), None)
    if in_the_way is not None:  # mkdir would say only "File exists" or "Not a directory"
        raise NotADirectoryError(
            f"data fetch --dest {dest}: {in_the_way} is a file, not a folder. Fix: pass a folder as --dest (the "
            "data root; it is made if missing), e.g. --dest ~/robustmed-data"
        )
    target = dest / FOLDERS[name]
    if target.exists():  # fetched before, or put there by hand: count it, never overwrite it
        check_counts(name, target)
        return target
    dest.mkdir(parents=True, exist_ok=True)
    if name == "sarscov2":
        found = download_sarscov2(target)
        if found != target:  # the zip had a top folder of its own: lift the class folders to where they belong
            for cls in ("COVID", "non-COVID"):
                (found / cls).replace(target / cls)
        check_counts(name, target)
        return target
    archive = dest / "COVID-CT-master.zip"
    if not archive.exists():
        download(url, archive, opener=opener)
    unpack_ucsd(archive, target)
    check_counts(name, target)
    archive.unlink()  # a few hundred MB that the unpacked set makes redundant
    return target
