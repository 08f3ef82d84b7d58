"""notebook_setup on Colab: the repository (notebooks, results) is cloned where it is missing, and nowhere else
is the network touched."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from robustmed_lite.book import setup


@pytest.fixture
def clones(monkeypatch):
    """The git commands the setup would run, recorded instead of run (a clone makes the folder)."""
    calls = []

    def run(command, check):
        calls.append(command)
        Path(command[-1]).mkdir(parents=True)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(setup.subprocess, "run", run)
    monkeypatch.delenv("COLAB_RELEASE_TAG", raising=False)
    return calls


def test_off_colab_nothing_is_cloned(clones, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert setup.colab_checkout(tmp_path / "clone") is None
    assert clones == [] and not (tmp_path / "clone").exists()


def test_on_colab_the_repository_is_cloned_once_and_becomes_the_working_folder(clones, tmp_path, monkeypatch):
    monkeypatch.setenv("COLAB_RELEASE_TAG", "release-test")
    monkeypatch.chdir(tmp_path)
    dest = tmp_path / "robustmed-lite"
    assert setup.colab_checkout(dest, verbose=False) == dest
    assert clones == [["git", "clone", "--depth", "1", "-q", setup.REPOSITORY, str(dest)]]
    monkeypatch.chdir(tmp_path)
    assert setup.colab_checkout(dest, verbose=False) == dest and len(clones) == 1, "an existing clone is reused"


def test_on_colab_inside_a_checkout_nothing_is_cloned(clones, tmp_path, monkeypatch):
    monkeypatch.setenv("COLAB_RELEASE_TAG", "release-test")
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "results").mkdir()
    (tmp_path / "notebooks" / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "notebooks" / "sub")
    assert setup.colab_checkout(tmp_path / "clone") is None and clones == []
