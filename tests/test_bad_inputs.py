"""Bad input never passes silently: each malformed input a new user could make gets a clear message (or, where
it is acceptable, the correct result), in the loaders, the attacks, the evaluation, the config and the CLI.

Each test case (each parametrised case) tries one malformed input, or a few of one kind. This file is the one
place to find every bad input we refuse or repair. The cases of issue 34 are in sections 8 to 10 here, except
those of two features with their own test files, listed here so that none is missed:
    test_duplicates.py   the same image in two splits (kept in one, counted, recorded in data.json);
                         evaluate --data on the training images (a warning with the overlap)
    test_run_folder.py   two writers of one run folder (a lock; a stale lock taken over); output folders checked
                         before work (read-only, no space, evaluate --out onto a folder); a full disk (said as
                         such, the previous checkpoint kept); --img_size 7 or 100000, --device cuda without a
                         GPU and --device gpu (refused before any folder is made); Ctrl-C (saved, how to resume)
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from _bad_files import bad_checkpoint
from _medical_files import nibabel_or_skip, pydicom_or_skip, write_dicom, write_nifti
from _small import SIZES, options
from PIL import Image
from torch import nn

from robustmed_lite.checkpoints import (
    RESUME_KEYS,
    CheckpointError,
    config_differences,
    load_checkpoint,
    model_from_checkpoint,
)
from robustmed_lite.cli import main
from robustmed_lite.config import load_config
from robustmed_lite.data.loaders import DataError, load_images, read_gray, stratified_subset
from robustmed_lite.data.splits import build_data
from robustmed_lite.evaluation.attacks import FGSM, PGD
from robustmed_lite.evaluation.metrics import accuracy, evaluate
from robustmed_lite.runinfo import LOG_PROGRESS_INTERVAL, progress_options

TINY = options(model="small_cnn", **SIZES, eval_attack_steps=1, progress=False)
# The tiny run on real data: no sizes (each set size would sample its split of the data)
TINY_REAL = options(method="erm", epochs=1, model="small_cnn", img_size=16, batch_size=8, eval_n=4, progress=False)
RAMP = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1))  # 64 x 64, brighter to the right


def _png(path: Path, array=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((12, 10), 120, np.uint8) if array is None else array).save(path)
    return path


def _tree(root: Path, n_covid: int = 3, n_non: int = 3) -> Path:
    """Kaggle-style class folders; COVID files sort first, as in every folder layout."""
    for i in range(n_covid):
        _png(root / "COVID" / f"c{i:02d}.png", np.full((12, 10), 150 + i, np.uint8))
    for i in range(n_non):
        _png(root / "non-COVID" / f"n{i:02d}.png", np.full((12, 10), 60 + i, np.uint8))
    return root


def _kaggle(root, n: int = 3, extra: dict | None = None):
    """COVID/ and non-COVID/ with ``n`` ramps each, and the folders of ``extra`` (name -> images)."""
    for folder in ("COVID", "non-COVID", *(extra or {})):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range((extra or {}).get(folder, n)):
            Image.fromarray(RAMP).save(root / folder / f"{i}.png")
    return root


def _load(root, size=8, **kwargs):
    return load_images(root, size, cache=False, progress=False, **kwargs)


def _cli(capsys, *argv) -> tuple[int, str]:
    """Exit code and stderr of the command line."""
    capsys.readouterr()
    code = main(list(argv))
    return code, capsys.readouterr().err


def _evaluate_cli(capsys, checkpoint, data, out, *more) -> tuple[int, str]:
    """``evaluate`` of a checkpoint on a data folder with FGSM, its table written to ``out``."""
    where = ["--checkpoint", str(checkpoint), "--data", str(data), "--out", str(out)]
    return _cli(capsys, "evaluate", *where, "--attacks", "fgsm", *more)


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBUSTMED_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny trained ERM run (phantom, 32 px, small CNN, one epoch)."""
    out = tmp_path_factory.mktemp("runs") / "erm"
    assert main(["train", "--method", "erm", "--epochs", "1", "--out_dir", str(out), *TINY]) == 0
    return out


class Constant(nn.Module):
    """Always returns the given logits (NaN for a diverged model)."""

    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, x):
        return torch.full((len(x), 2), self.value)


# ======================================================= 1. evaluation subsets: seeded, stratified, per class


def test_evaluate_n_is_a_stratified_sample_not_the_first_n(run, tmp_path, capsys):
    data = _tree(tmp_path / "sorted", n_covid=12, n_non=12)  # the first 8 files are all COVID
    out = tmp_path / "table.csv"
    code, err = _evaluate_cli(capsys, run / "best_clean.pt", data, out, "--n", "8")
    assert code == 0, err
    table = pd.read_csv(out)
    assert (table["n"] == 8).all() and (table["n_covid"] == 4).all() and (table["n_noncovid"] == 4).all()
    assert table["auc"].notna().all() and table["specificity"].notna().all()
    # The same seed gives the same sample; the sample is stratified (both classes in proportion).
    labels = np.array([1] * 12 + [0] * 12)
    picked = stratified_subset(labels, 8, seed=0)
    assert np.array_equal(picked, stratified_subset(labels, 8, seed=0)) and labels[picked].sum() == 4


def test_run_ood_n_is_stratified_and_says_n_per_class(run, tmp_path):
    from robustmed_lite.evaluation.checkpoint_eval import run_ood

    results = run_ood(
        [run / "best_clean.pt"], out_dir=tmp_path / "ood", corruptions=["jpeg"], severities=[1], n=10, progress=False
    )
    shift = results["shift"]
    assert (shift["n"] == 10).all() and (shift["n_covid"] + shift["n_noncovid"] == 10).all()
    assert (shift["n_covid"] > 0).all() and (shift["n_noncovid"] > 0).all()
    assert (results["corruptions"]["n"] == 10).all()


def test_one_class_metrics_say_why_they_are_undefined(run, tmp_path, capsys):
    only_covid = tmp_path / "only"
    for i in range(6):
        _png(only_covid / "COVID" / f"c{i}.png")
    out = tmp_path / "t.csv"
    with pytest.warns(UserWarning, match="only COVID images .*AUC and specificity are undefined"):
        code, err = _evaluate_cli(capsys, run / "best_clean.pt", only_covid, out)
    assert code == 0, err
    table = pd.read_csv(out)
    assert table["auc"].isna().all() and table["note"].str.contains("accuracy is the sensitivity").all()


# ============================================================================= 2. non-finite values


@pytest.fixture
def batch():
    x = torch.rand(4, 1, 8, 8)
    x[2, 0, 3, 5] = float("nan")
    return x, torch.tensor([0, 1, 0, 1])


@pytest.mark.parametrize("attack", [FGSM("8/255"), PGD("8/255", steps=2, seed=0)], ids=["fgsm", "pgd"])
def test_nan_input_is_refused_by_the_attacks(batch, attack):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    with pytest.raises(ValueError, match=r"1 non-finite values \(1 NaN, 0 inf\).*\(2, 0, 3, 5\)"):
        attack(model, *batch)


def test_accuracy_refuses_nan_images_instead_of_scoring_them_class_0(batch):
    x, y = batch
    with pytest.raises(ValueError, match=r"non-finite values .*first images \[2\]"):
        accuracy(Constant(0.0), x, y)


def test_evaluate_refuses_nan_and_inf_with_their_positions(batch):
    x, y = batch
    x = x.clone()
    x[3, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"2 non-finite values \(1 NaN, 1 inf\) in 2 image\(s\)"):
        evaluate(Constant(0.0), (x, y), progress=False)


def test_a_model_with_nan_logits_is_an_error_not_class_0():
    x, y = torch.rand(3, 1, 8, 8), torch.tensor([0, 0, 1])
    with pytest.raises(ValueError, match=r"non-finite logits for 3 image\(s\).*diverged"):
        accuracy(Constant(float("nan")), x, y)


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_float_tiff_with_a_non_finite_pixel_names_the_file(tmp_path, bad):
    values = np.linspace(-1000, 400, 30, dtype=np.float32).reshape(5, 6)
    values[1, 4] = float(bad)
    root = _tree(tmp_path / "k")
    Image.fromarray(values).save(root / "COVID" / "hu.tif")  # float32: a 32-bit float TIFF
    counts = "1 NaN and 0 inf" if bad == "nan" else "0 NaN and 1 inf"
    with pytest.raises(DataError, match=rf"hu\.tif.*{counts} pixel\(s\), e\.g\. at \(row 1, column 4\).*Fix"):
        _load(root)


# ======================================================================== 3. training data with one class


def test_training_split_with_one_class_is_refused_and_no_run_folder_is_made(tmp_path, capsys):
    misnamed = tmp_path / "misnamed"
    for i in range(10):
        _png(misnamed / "COVID" / f"a{i}.png")
        _png(misnamed / "covid" / f"b{i}.png")  # meant to be non-COVID
    out = tmp_path / "run"
    # every file is the same ramp: without --duplicates off they would all be kept in one split
    code, err = _cli(capsys, "train", "--data", str(misnamed), "--out_dir", str(out), "--duplicates", "off", *TINY_REAL)
    line = _one_error_line(err)
    assert code == 2 and "training split of" in line and "holds only 14 COVID images" in line and "Fix" in line
    assert not out.exists()


def test_small_validation_and_test_splits_are_warned_about(tmp_path):
    data = _tree(tmp_path / "few", n_covid=20, n_non=20)
    cfg = load_config("cpu-demo", {"data": str(data), "img_size": 16, "progress": False, "prior": False})
    with pytest.warns(UserWarning, match=r"the val split of .* holds 3 non-COVID, 3 COVID: fewer than 10"):
        build_data(cfg)


# =============================================================================== 4. config values by type


@pytest.mark.parametrize(
    "args, message",
    [
        (["--epochs", "true"], "epochs takes an integer, got 'true'"),
        (["--epochs", "1.5"], "epochs takes an integer, got '1.5'"),
        (["--eps", "8/0"], "eps='8/0' divides by zero"),
        (["--pretrained", "maybe"], "pretrained takes true or false, got 'maybe'"),
        (["--lr", "nan"], "lr takes a finite number, got 'nan'"),
        (["--batch_size", "0"], "batch_size must be >= 1, got 0"),
        (["--method", "magic"], "unknown method 'magic'"),
        (["--model", "resnet9000"], "unknown model 'resnet9000'"),
    ],
    ids=["epochs-true", "epochs-1.5", "eps-8/0", "bool-maybe", "lr-nan", "batch-0", "method", "model"],
)
def test_bad_config_values_are_one_line_errors_and_leave_no_run(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    code, err = _cli(capsys, "train", "--epochs", "1", "--out_dir", str(out), *TINY, *args)
    assert code == 2 and message in _one_error_line(err)
    assert not out.exists(), "a failed start leaves no run folder behind"


# ================================================================================== 5. checkpoints


def test_bad_checkpoint_on_the_command_line_is_one_line(tmp_path, capsys):
    path = bad_checkpoint(tmp_path, "text")
    code, err = _cli(capsys, "evaluate", "--checkpoint", str(path), "--attacks", "fgsm")
    assert code == 2 and "is not a robustmed_lite checkpoint (not a torch file)" in _one_error_line(err)
    with pytest.raises(CheckpointError):  # --debug: the traceback, for a bug report
        main(["evaluate", "--checkpoint", str(path), "--debug"])


def test_a_best_checkpoint_cannot_resume(run):
    with pytest.raises(CheckpointError, match="missing keys optimizer, scheduler, rng_cpu.*last.pt to resume"):
        load_checkpoint(run / "best_clean.pt", required=RESUME_KEYS)


def test_weights_that_do_not_fit_the_model(run, tmp_path):
    state = torch.load(run / "best_clean.pt", weights_only=True)
    state["config"]["model"] = "resnet18"
    torch.save(state, tmp_path / "relabelled.pt")
    with pytest.raises(CheckpointError, match=r"weights in .*relabelled\.pt do not fit.*'resnet18'"):
        model_from_checkpoint(tmp_path / "relabelled.pt")


# ====================================================================== 6. ambiguous roots, tiny images


def test_class_folders_beside_an_index_csv_say_which_is_used(tmp_path):
    root = _tree(tmp_path / "both")
    (root / "labels.csv").write_text("path,label\nCOVID/c00.png,0\n")
    with pytest.warns(
        UserWarning,
        match=r"class folders .* and CSV file\(s\) \(labels\.csv\): the labels come from "
        r"the folders.*pass the CSV itself",
    ):
        data = _load(root)
    assert data.layout == "kaggle" and data.labels.tolist() == [1, 1, 1, 0, 0, 0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an explicit layout is not ambiguous
        assert _load(root, layout="folders").labels.sum() == 3
    assert _load(root / "labels.csv").labels.tolist() == [0]  # and the CSV, when asked for


def test_images_smaller_than_8_px_are_named(tmp_path):
    root = _tree(tmp_path / "k")
    _png(root / "non-COVID" / "dot.png", np.full((1, 1), 200, np.uint8))
    with pytest.warns(UserWarning, match=r"1 image\(s\) smaller than 8 px .*dot\.png \(1x1\)"):
        load_images(root, 16, cache_dir=tmp_path / "c", progress=False)
    with pytest.warns(UserWarning, match=r"dot\.png \(1x1\)"):  # and again from the cache
        load_images(root, 16, cache_dir=tmp_path / "c", progress=False)


# =========================================================================================== 7. the CLI


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    code, err = _cli(capsys, "evaluate", "--checkpoint", str(tmp_path / "missing.pt"))
    assert code == 2 and "missing.pt does not exist" in _one_error_line(err)
    code, err = _cli(capsys, "train", "--data", str(tmp_path / "nowhere"), "--out_dir", str(tmp_path / "r"))
    assert code == 2 and "data root" in _one_error_line(err) and not (tmp_path / "r").exists()


def test_python_dash_m_prints_one_line_and_exits_2(tmp_path):
    import subprocess

    result = subprocess.run(
        [sys.executable, "-m", "robustmed_lite", "evaluate", "--checkpoint", str(tmp_path / "missing.pt")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: checkpoint") and len(result.stderr.strip().splitlines()) == 1


def test_help_lists_the_choices(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "one of erm, pgd_at, trades, mart, awp, fat, score, cap, robustmed" in text
    assert "one of ce, trades, mart, score, square_kl (default: the method's)" in text
    assert "one of none, fat, last_correct" in text and "small_cnn, tiny_visformer or any timm" in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--n", "0"], "argument --n: takes an integer >= 1, got '0'"),
        (["--ood", "--severities", "a,b"], "--severities takes comma-separated integers 1..5, got 'a,b'"),
    ],
)
def test_bad_evaluation_options(run, capsys, argv, message):
    try:
        code = main(["evaluate", "--checkpoint", str(run / "best_clean.pt"), *argv])
    except SystemExit as exit_:  # argparse's own refusal
        code = exit_.code
    assert code == 2 and message in capsys.readouterr().err


def test_existing_run_without_resume_and_resume_with_another_config(run, capsys):
    code, err = _cli(capsys, "train", "--method", "erm", "--epochs", "1", "--out_dir", str(run), *TINY)
    assert code == 2 and "already holds" in _one_error_line(err) and "--resume" in err
    code, err = _cli(
        capsys, "train", "--resume", "--method", "erm", "--epochs", "1", "--out_dir", str(run), *TINY, "--lr", "0.5"
    )
    assert code == 2 and "other settings (lr)" in _one_error_line(err)


def test_resume_without_a_run(tmp_path, capsys):
    code, err = _cli(capsys, "train", "--resume", "--out_dir", str(tmp_path / "never"), *TINY)
    assert code == 2 and "cannot resume" in _one_error_line(err) and not (tmp_path / "never").exists()


def test_progress_bars_do_not_flood_a_log():
    assert progress_options(True, io.StringIO())["mininterval"] == LOG_PROGRESS_INTERVAL
    assert progress_options(False) == {"disable": True}

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert "mininterval" not in progress_options(True, Terminal())


class Slow(Constant):
    def forward(self, x):
        time.sleep(0.02)  # long enough for a bar redrawn every 0.1 s to redraw several times
        return super().forward(x)


def test_evaluate_progress_to_a_log_writes_few_updates(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    x, y = torch.rand(40, 1, 4, 4), torch.arange(40) % 2
    evaluate(Slow(0.0), (x, y), batch_size=1, progress=True)
    assert 0 < log.getvalue().count("\r") <= 3, log.getvalue()


# ======================================================== inputs that already worked: keep them working


def test_missing_root(tmp_path):
    with pytest.raises(DataError, match=r"nowhere does not exist\. Fix"):
        _load(tmp_path / "nowhere")


def test_empty_class_folder(tmp_path):
    _png(tmp_path / "d" / "COVID" / "a.png")
    (tmp_path / "d" / "non-COVID").mkdir()
    with pytest.raises(DataError, match=r"holds no images\. Fix"):
        _load(tmp_path / "d")


def test_truncated_png(tmp_path):
    root = _tree(tmp_path / "k")
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (12, 10), dtype=np.uint8)).save(buffer, format="PNG")
    (root / "COVID" / "cut.png").write_bytes(buffer.getvalue()[:60])  # the header and part of the pixels
    with pytest.raises(DataError, match=r"cannot decode image .*cut\.png.*Fix"):
        _load(root)


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    path = _png(tmp_path / "deep.png", np.array([[0, 32768, 65535]], dtype=np.uint16))
    np.testing.assert_allclose(read_gray(path), [[0, 32768 / 65535, 1]], atol=1e-6)


def test_rgba_png_becomes_one_grey_channel(tmp_path):
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = 200, 255
    gray = read_gray(_png(tmp_path / "rgba.png", rgba))
    assert gray.shape == (2, 2) and np.allclose(gray, 200 / 255, atol=1e-3)


def test_csv_with_wrong_columns(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "index.csv").write_text("file,class\na.png,1\n")
    with pytest.raises(DataError, match=r"expected 'path,label' or 'filename,label'.*Fix: rename its header"):
        _load(tmp_path / "index.csv")


def test_backslash_paths_in_a_csv(tmp_path):
    _png(tmp_path / "img" / "a.png")
    (tmp_path / "index.csv").write_text("path,label\nimg\\a.png,1\n")
    assert _load(tmp_path / "index.csv").labels.tolist() == [1]


def test_non_image_files_are_named_in_a_warning(tmp_path):
    root = _tree(tmp_path / "k")
    (root / "COVID" / "notes.txt").write_text("scanner settings")
    with pytest.warns(UserWarning, match=r"ignored 1 non-image file\(s\).*notes\.txt"):
        assert len(_load(root)) == 6


# ============================================================= hospital formats that cannot be read


def test_dicom_compressed_without_a_decoder(tmp_path):
    pydicom_or_skip()
    path = write_dicom(tmp_path / "jls.dcm", compressed=True)
    with pytest.raises(
        DataError,
        match=r"jls\.dcm is compressed \(JPEG-LS Lossless.*\) and no installed decoder.*"
        r"Fix: pip install pylibjpeg",
    ):
        read_gray(path)


def test_dicom_without_pixel_data(tmp_path):
    pydicom_or_skip()
    root = _tree(tmp_path / "k")
    write_dicom(root / "COVID" / "report.dcm", pixel_data=False)
    with pytest.raises(DataError, match=r"report\.dcm holds no pixel data.*Fix: remove it"):
        _load(root)


def test_dicom_multi_frame_is_refused(tmp_path):
    pydicom_or_skip()
    path = write_dicom(tmp_path / "cine.dcm", np.zeros((3, 4, 5), np.int16), frames=3)
    with pytest.raises(DataError, match=r"cine\.dcm is a multi-frame file \(3 frames\).*Fix: split it"):
        read_gray(path)


def test_a_file_named_dcm_that_is_not_dicom(tmp_path):
    pydicom_or_skip()
    root = _tree(tmp_path / "k")
    (root / "non-COVID" / "slice.dcm").write_bytes(b"DICM")
    with pytest.raises(DataError, match=r"cannot read DICOM .*slice\.dcm.*Fix"):
        _load(root)


def test_dicom_without_pydicom_says_how_to_install_it(tmp_path, monkeypatch):
    root = _tree(tmp_path / "k")
    (root / "COVID" / "x.dcm").write_bytes(b"\0" * 128 + b"DICM")
    monkeypatch.setitem(sys.modules, "pydicom", None)  # import pydicom now raises ImportError
    with pytest.raises(DataError, match=r"x\.dcm needs pydicom.*pip install 'robustmed-lite\[dicom\]'"):
        _load(root)


def test_nifti_4d_is_refused(tmp_path):
    nibabel_or_skip()
    root = _tree(tmp_path / "k")
    write_nifti(root / "COVID" / "fmri.nii.gz", np.zeros((4, 4, 3, 2), np.int16))
    with pytest.raises(DataError, match=r"fmri\.nii\.gz has shape \(4, 4, 3, 2\).*Fix: split it"):
        _load(root)


def test_nifti_slice_range_outside_the_volume(tmp_path):
    nibabel_or_skip()
    root = _tree(tmp_path / "k")
    write_nifti(root / "COVID" / "v.nii", np.zeros((4, 4, 3), np.int16))
    with pytest.raises(DataError, match=r"v\.nii has 3 axial slices.*choose none of them.*Fix"):
        _load(root, slice_range=(10, 20))


def test_nifti_with_nan_voxels(tmp_path):
    nibabel_or_skip()
    vol = np.full((4, 4, 2), -1000.0, np.float32)
    vol[1, 2, 1] = np.nan
    root = _tree(tmp_path / "k")
    write_nifti(root / "COVID" / "v.nii", vol)
    with pytest.raises(DataError, match=r"v\.nii slice 1 holds 1 NaN and 0 inf pixel\(s\)"):
        _load(root)


def test_bad_window(tmp_path):
    with pytest.raises(ValueError, match=r"window takes a finite width > 0"):
        _load(_tree(tmp_path / "k"), window=(0, -600))


# ============================================= 8. issue 34: data the loaders refuse, or load with a warning


@pytest.mark.parametrize(
    ("folders", "named"),
    [({"CAP": 4}, r"CAP/ \(4 images\)"), ({"pneumonia": 2, "docs": 0}, r"pneumonia/ \(2 images\)")],
)
def test_a_folder_that_is_no_class_is_refused_not_dropped(tmp_path, folders, named):
    root = _kaggle(tmp_path / "data", extra=folders)
    with pytest.raises(DataError, match=rf"no class of this task: {named}\. Fix: move them out"):
        load_images(root, 32, cache=False, progress=False)


def test_only_unknown_folders_beside_one_class_are_named(tmp_path):
    root = tmp_path / "data"
    for folder in ("pneumonia", "normal"):
        (root / folder).mkdir(parents=True)
        Image.fromarray(RAMP).save(root / folder / "0.png")
    with pytest.raises(DataError, match=r"class folders normal and folders that are no class .*pneumonia/"):
        load_images(root, 32, cache=False, progress=False)


def test_broken_links_and_link_loops_are_named(tmp_path):
    root = _kaggle(tmp_path / "data")
    dangling = root / "COVID" / "gone.png"
    os.symlink(tmp_path / "nowhere.png", dangling)
    with pytest.raises(
        DataError, match=r"gone.png is a broken symbolic link to .*nowhere.png, which does not exist\. Fix: point"
    ):
        load_images(root, 32, cache=False, progress=False)
    dangling.unlink()
    loop = root / "COVID" / "loop.png"
    os.symlink(loop, loop)
    with pytest.raises(
        DataError, match=r"loop.png is a symbolic link loop \(following it leads back to itself\)\. Fix"
    ):
        load_images(root, 32, cache=False, progress=False)
    loop.unlink()
    self_root = tmp_path / "self"
    os.symlink(self_root, self_root)
    with pytest.raises(DataError, match=r"self is a symbolic link loop"):
        load_images(self_root, 32, cache=False, progress=False)


def test_exif_orientation_is_applied(tmp_path):
    root = _kaggle(tmp_path / "data", n=1)
    turned = root / "COVID" / "turned.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the stored pixels are to be turned 90 degrees clockwise for display
    Image.fromarray(RAMP[:32]).save(turned, exif=exif, quality=100)  # 32 rows x 64 columns as stored
    data = load_images(root, 64, cache=False, progress=False)
    shown = data.images[data.paths.index(str(turned.resolve()))][0].numpy()
    # Displayed upright the ramp runs top to bottom: rows differ, columns do not.
    assert np.abs(np.diff(shown, axis=0)).mean() > 5 * np.abs(np.diff(shown, axis=1)).mean()


def test_an_elongated_image_is_squashed_with_a_warning(tmp_path):
    root = _kaggle(tmp_path / "data", n=2)
    Image.fromarray(np.full((10, 400), 128, np.uint8)).save(root / "COVID" / "strip.png")
    with pytest.warns(UserWarning, match=r"1 image\(s\) with sides more than 3:1 apart were squashed .*strip.png"):
        load_images(root, 32, cache=False, progress=False)


def test_a_semicolon_csv_is_named_as_such(tmp_path):
    _kaggle(tmp_path / "data", n=1)
    index = tmp_path / "data" / "index.csv"
    index.write_text("path;label\nCOVID/0.png;1\nnon-COVID/0.png;0\n")
    with pytest.raises(DataError, match=r"separated by ';', not by commas .*Fix: save it comma-separated"):
        load_images(index, 32, cache=False, progress=False)


def test_a_key_given_twice_in_a_yaml_config_is_refused(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("lr: 0.1\nepochs: 2\nlr: 0.2\n")
    with pytest.raises(
        ValueError, match=r"^config .*mine.yaml is not valid YAML: key 'lr' is given twice \(lines 1 and 3\)"
    ):
        load_config(path)


# ================================================= 9. issue 34: options said plainly, with the fix, exit 2


def _cli_or_argparse(capsys, *argv) -> tuple[int, str]:
    """Exit code and stderr, whether the CLI or argparse refuses."""
    try:
        return _cli(capsys, *argv)
    except SystemExit as exit_:
        return exit_.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, said",
    [
        (
            ["reproduce", "--data", "phantom", "--seeds", "5-2"],
            "--seeds range '5-2' is reversed (it would hold no seed). Fix: write it from low to high, 2-5",
        ),
        (["ablation", "--data", "phantom", "--seeds", "0,9-3"], "range '9-3' is reversed"),
        (
            ["reproduce", "--data", "phantom", "--methods", ""],
            "--methods '' gives no method. Fix: name one or more of erm, pgd_at,",
        ),
        (["sites", "--data", "phantom", "--methods", " , "], "--methods ' , ' gives no method"),
        (
            ["train", "--eps=-0.01"],
            "eps must be >= 0 (a radius on the [0,1] pixel scale), got '-0.01'. Fix: pass --eps with a number >= 0 "
            "or k/255, e.g. --eps 8/255",
        ),
        (["train", "--step_size=-2/255"], "step_size must be >= 0"),
        (["evaluate", "--checkpoint", "never.pt", "--eps=-0.01"], "eps must be >= 0"),  # before the checkpoint
    ],
    ids=["seeds-reversed", "seeds-reversed-in-a-list", "methods-empty", "methods-blank", "eps", "step", "evaluate"],
)
def test_option_mistakes_say_what_is_wrong_and_the_fix(tmp_path, capsys, monkeypatch, argv, said):
    monkeypatch.chdir(tmp_path)  # a study that started would write its folders here
    code, err = _cli_or_argparse(capsys, *argv, *(["--out_dir", "run"] if argv[0] == "train" else []))
    assert code == 2 and said in _one_error_line(err)
    assert not any(tmp_path.iterdir()), "refused before any folder was made"


def test_data_roots_that_are_broken_links_name_the_link_and_the_fix(tmp_path, capsys):
    dangling, loop = tmp_path / "dangling", tmp_path / "loop"
    os.symlink(tmp_path / "unmounted" / "sarscov2", dangling)
    os.symlink(loop, loop)
    out = tmp_path / "run"
    code, err = _cli(capsys, "train", "--data", str(dangling), "--out_dir", str(out), *TINY)
    assert code == 2 and f"--data {dangling} is a broken symbolic link to {tmp_path}/unmounted/sarscov2" in (
        line := _one_error_line(err)
    )
    assert "Fix: point the link at the data folder (or pass that folder itself)" in line
    code, err = _cli(capsys, "train", "--data", str(loop), "--out_dir", str(out), *TINY)
    assert code == 2 and f"--data {loop} is a symbolic link loop" in _one_error_line(err) and "Fix" in err
    code, err = _cli(capsys, "train", "--ood_data", f"{loop}:test", "--out_dir", str(out), *TINY)
    assert code == 2 and f"--ood_data {loop} is a symbolic link loop" in _one_error_line(err)
    assert not out.exists()


@pytest.mark.parametrize("below", ["", "sub"], ids=["the-file", "a-folder-below-it"])
def test_data_fetch_onto_a_file_names_it_and_the_fix(tmp_path, capsys, below):
    file = tmp_path / "notes.txt"
    file.write_text("not a folder")
    code, err = _cli(capsys, "data", "fetch", "ucsd", "--dest", str(file / below), "--url", "file:///nowhere.zip")
    line = _one_error_line(err)
    assert code == 2 and f"{file} is a file, not a folder. Fix: pass a folder as --dest" in line
    assert file.read_text() == "not a folder"


# ========================================== 10. issue 34: --n_train / --n_val / --n_test sample real data


def test_n_train_samples_real_data_by_class_and_the_run_records_it(tmp_path, capsys):
    data = _tree(tmp_path / "real", n_covid=20, n_non=20)  # splits of 28 (14 a class), 6 and 6
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match=r"stratified sample of each split: train 8 of 28 \(4 non-COVID, 4 COVID\)"):
        code, err = _cli(capsys, "train", "--data", str(data), "--n_train", "8", "--out_dir", str(out), *TINY_REAL)
    assert code == 0, err
    record = json.loads((out / "data.json").read_text())
    assert record["splits"]["train"] == {"n": 8, "per_class": [4, 4]}  # what it trained on
    assert record["splits"]["val"]["n"] == record["splits"]["test"]["n"] == 6  # the sizes not set: every image
    assert record["sampled"] == {"train": {"n": 8, "of": 28, "seed": 0}}
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert (config["n_train"], config["n_val"], config["n_test"]) == (8, None, None)
    assert load_config(out / "config.yaml").n_train == 8  # the record reads back as it ran


def test_the_training_sample_follows_the_seed_and_the_held_out_samples_do_not(tmp_path):
    data = _tree(tmp_path / "real", n_covid=20, n_non=20)
    sizes = {"data": str(data), "img_size": 16, "n_train": 8, "n_test": 4, "progress": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        seed0, seed1 = (build_data(load_config("cpu-demo", dict(sizes, seed=s))) for s in (0, 1))
    assert not torch.equal(seed0.train.images, seed1.train.images)  # another draw of training images
    assert torch.equal(seed0.test[0], seed1.test[0])  # every seed is scored on the same test images
    assert seed0.test[1].tolist().count(1) == 2


def test_without_sizes_real_data_keeps_every_image_whatever_the_preset_says(tmp_path):
    data = _tree(tmp_path / "real", n_covid=20, n_non=20)
    cfg = load_config("cpu-demo", {"data": str(data), "img_size": 16, "progress": False})  # the preset: 2000, ...
    assert (cfg.n_train, cfg.n_val, cfg.n_test) == (None, None, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the small validation and test splits
        splits = build_data(cfg)
    assert len(splits.train) == 28 and splits.sampled == {}


def test_demo_and_the_notebooks_sample_real_data_by_the_sizes_they_are_given(tmp_path):
    from robustmed_lite.book.runs import train_or_load  # demo's and the notebooks' way to train a run

    data = _tree(tmp_path / "real", n_covid=20, n_non=20)
    tiny = dict(data=str(data), epochs=1, model="small_cnn", img_size=16, batch_size=8, eval_n=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the small validation and test splits
        trainer = train_or_load("erm", root=str(tmp_path / "runs"), overrides={**tiny, "n_train": 8}, progress=False)
    record = json.loads((trainer.run_dir / "data.json").read_text())
    assert record["splits"]["train"]["n"] == 8 and record["sampled"]["train"]["of"] == 28
    assert yaml.safe_load((trainer.run_dir / "config.yaml").read_text())["n_train"] == 8


def test_a_size_larger_than_its_split_is_refused_with_the_split_count(tmp_path, capsys):
    data = _tree(tmp_path / "real", n_covid=20, n_non=20)
    out = tmp_path / "run"
    code, err = _cli(capsys, "train", "--data", str(data), "--n_val", "50", "--out_dir", str(out), *TINY_REAL)
    line = _one_error_line(err)
    assert code == 2 and f"--n_val 50 asks for more images than the val split of {data} holds (6)" in line
    assert "Fix: pass --n_val 6 or less, or leave --n_val out" in line and not out.exists()


def test_a_study_samples_real_data_by_the_sizes_the_user_passed(tmp_path):
    from robustmed_lite.studies.plan import PROFILES, build_plan

    data = _tree(tmp_path / "real", n_covid=20, n_non=20)
    runs = tmp_path / "runs"
    (cfg,) = (s.config() for s in build_plan(PROFILES["cpu"], str(data), ("erm",), (0,), runs, {"n_train": 8}))
    assert (cfg.n_train, cfg.n_val, cfg.n_test) == (8, None, None)


def test_a_real_data_run_recorded_before_the_sizes_applied_matches_only_a_run_without_them(tmp_path):
    data = _tree(tmp_path / "real")
    now = load_config("cpu-demo", {"data": str(data)})
    before = {**now.to_dict(), "n_train": 2000, "n_val": 400, "n_test": 600}  # the preset's, unread by then
    del before["subsample_real"]
    assert config_differences(before, now) == []
    sampled = load_config("cpu-demo", {"data": str(data), "n_train": 4})
    assert config_differences(before, sampled) == ["n_train", "subsample_real"]


def test_reproduce_names_a_broken_data_link_before_planning(tmp_path):
    from robustmed_lite.data.loaders import DataError
    from robustmed_lite.studies.reproduce import check_paths

    link = tmp_path / "sarscov2"
    link.symlink_to(tmp_path / "gone")
    with pytest.raises(DataError, match=r"--data .*sarscov2 is a broken symbolic link to .*gone.*Fix"):
        check_paths(str(link), [], None)
