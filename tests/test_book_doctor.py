"""`doctor`: each check passes here, and each failure it exists for is reported with its fix."""

import sys
import types
from importlib import metadata

import pytest

from robustmed_lite.book import doctor
from robustmed_lite.cli import main


@pytest.fixture
def empty_data(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBUSTMED_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("ROBUSTMED_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    return tmp_path / "data"


def test_a_ready_machine_passes_and_missing_data_is_a_warning(empty_data, capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    for name in ("python", "torch", "timm", "opencv", "device", "runs", "cache"):
        assert any(line.startswith("PASS") and f" {name} " in line for line in out.splitlines()), (name, out)
    assert "WARN  data:ucsd" in out and "data fetch ucsd --dest" in out
    assert out.strip().splitlines()[-1].endswith("0 failed - ready")


def test_a_broken_data_set_fails_with_its_fix(empty_data, capsys):
    (empty_data / "ucsd_covidct" / "CT_COVID").mkdir(parents=True)
    (empty_data / "ucsd_covidct" / "CT_NonCOVID").mkdir()
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  data:ucsd" in out and "holds no images" in out and "fetch it again" in out
    assert "not ready: fix the FAIL lines above" in out


def test_a_missing_data_folder_fails(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBUSTMED_DATA", str(tmp_path / "nowhere"))
    [check] = doctor.check_data()
    assert check.status == "FAIL" and "is not a folder" in check.detail


def test_opencv_without_contrib_is_a_warning(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", types.SimpleNamespace(__version__="4.10.0"))
    check = doctor.check_opencv()
    assert check.status == "WARN" and "opencv-contrib-python-headless" in check.detail


def test_two_opencv_wheels_fail(monkeypatch):
    real = metadata.version
    monkeypatch.setattr(doctor.metadata, "version", lambda name: "4.10.0" if name.startswith("opencv") else real(name))
    check = doctor.check_opencv()
    assert check.status == "FAIL" and "4 OpenCV wheels" in check.detail and "uninstall" in check.detail


def test_an_unwritable_folder_fails(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    check = doctor.check_writable("runs", tmp_path / "a_file" / "runs")
    assert check.status == "FAIL" and "cannot write" in check.detail


def test_a_broken_model_stack_fails(monkeypatch):
    def broken(*args, **kwargs):
        raise AttributeError("module 'timm.layers' has no attribute 'trunc_normal_'")

    monkeypatch.setattr("robustmed_lite.models.create_model", broken)
    check = doctor.check_model()
    assert check.status == "FAIL" and "pip install -U timm" in check.detail
