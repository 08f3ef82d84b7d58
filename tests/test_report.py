"""The report command: its intervals, its threshold, its JSON schema, its HTML, and its refusals."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from robustmed_lite.checkpoints import CheckpointError
from robustmed_lite.cli import main
from robustmed_lite.config import load_config
from robustmed_lite.data.loaders import DataError
from robustmed_lite.evaluation import report as rep
from robustmed_lite.models import create_model

FAST = rep.ReportSettings(
    n_boot=50,
    corruption_n=16,
    corruption_severities=(1,),
    eps=("2/255",),
    attack_n=8,
    apgd_steps=2,
    saliency_n=8,
    failures=2,
)


def _checkpoint(path: Path, model_name: str = "small_cnn", **overrides) -> Path:
    """An untrained model with a phantom config, saved as the trainer saves a checkpoint."""
    values = {"model": model_name, "img_size": 64, "n_val": 64, "n_test": 64, "method": "erm", **overrides}
    cfg = load_config("cpu-demo", values)
    torch.manual_seed(0)
    model = create_model(cfg.model, num_classes=2, img_size=cfg.img_size)
    torch.save({"model": model.state_dict(), "config": cfg.to_dict(), "epoch": 1}, path)
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    folder = tmp_path_factory.mktemp("report")
    ckpt = _checkpoint(folder / "model.pt")
    report = rep.build_report(ckpt, folder / "out", settings=FAST, progress=False)
    return folder, ckpt, report


def test_wilson_interval_matches_hand_computed_values():
    # 8 of 10: centre (0.8 + 1.96^2/20) / (1 + 1.96^2/10) = 0.7167, half-width 0.2265 (Wilson 1927).
    low, high = rep.wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4)
    assert high == pytest.approx(0.9433, abs=1e-4)
    # 0 of 20: the lower end is 0 and the upper z^2 / (n + z^2) = 3.8415 / 23.8415.
    assert rep.wilson_interval(0, 20) == pytest.approx((0.0, 0.16113), abs=1e-4)
    assert all(math.isnan(v) for v in rep.wilson_interval(0, 0))


def test_auc_and_bootstrap_intervals_match_hand_computed_values():
    # Pairs (positive, negative) ordered right: (0.35 > 0.1), (0.8 > 0.1), (0.8 > 0.4); wrong: (0.35 < 0.4): 3/4.
    assert rep.auc_score([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert math.isnan(rep.auc_score([1, 1], [0.2, 0.3]))
    # A constant sample has a zero-width interval.
    assert rep.bootstrap_interval(np.mean, np.full(30, 3.0), n_boot=100) == (3.0, 3.0)
    # The mean of 200 fair coins: 0.5 +- 1.96 * sqrt(0.25 / 200) = [0.431, 0.569].
    coins = np.tile([0.0, 1.0], 100)
    low, high = rep.bootstrap_interval(np.mean, coins, n_boot=2000, seed=1)
    assert low == pytest.approx(0.431, abs=0.015)
    assert high == pytest.approx(0.569, abs=0.015)


def test_predictive_values_follow_bayes_rule():
    # sensitivity 0.9, specificity 0.8, prevalence 0.1: PPV 0.09 / (0.09 + 0.18) = 1/3, NPV 0.72 / 0.73.
    ppv, npv = rep.predictive_values(0.9, 0.8, 0.1)
    assert ppv == pytest.approx(1 / 3)
    assert npv == pytest.approx(0.72 / 0.73)


class _Unreachable:
    """Labels that fail on any use: the test split's labels while the threshold is being fixed."""

    def __getattr__(self, name):
        raise AssertionError(f"the test labels were read ({name}) while fixing the threshold")

    def __len__(self):
        raise AssertionError("the test labels were read (len) while fixing the threshold")


def test_threshold_is_fixed_from_validation_data_only(tmp_path):
    ckpt = _checkpoint(tmp_path / "model.pt")
    inp = rep.load_inputs(ckpt, settings=FAST, progress=False)
    expected = rep.choose_threshold(inp.val[1].numpy(), rep._probs(inp.model, inp.val[0]))
    for site in inp.sites:
        site.labels = _Unreachable()
        site.images = _Unreachable()
    fixed = rep.fix_threshold(inp)
    assert fixed["threshold"] == expected
    assert fixed["n_val"] == len(inp.val[1])


def test_choose_threshold_maximises_youden_on_the_given_scores():
    labels = np.array([0, 0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.25, 0.6, 0.7])
    t = rep.choose_threshold(labels, scores)
    pred = scores > t
    # The best split misses one of six (0.25 < 0.3): J = 2/3 + 1 - 1.
    assert pred[labels == 1].mean() + (~pred[labels == 0]).mean() - 1 == pytest.approx(2 / 3)


def test_report_json_has_every_section_and_model_card_metric_fields(built):
    folder, _, report = built
    data = json.loads((folder / "out" / "report.json").read_text())
    assert list(data["sections"]) == list(rep.SECTIONS)
    for name, section in data["sections"].items():
        assert section["title"] == rep.SECTIONS[name]
        assert section["status"] in ("measured", "stated", "generated", rep.NOT_MEASURED), name
    metrics = rep.all_metrics(data)
    assert len(metrics) > 20
    for entry in metrics:
        assert {"type", "value", "slice", "threshold", "n"} <= set(entry), entry
        assert entry["value"] is None or isinstance(entry["value"], float)
        if "confidence_interval" in entry:
            assert set(entry["confidence_interval"]) == {"lower_bound", "upper_bound"}
    clinical = data["sections"]["clinical_summary"]
    assert clinical["main"]["tp"] + clinical["main"]["fn"] + clinical["main"]["tn"] + clinical["main"]["fp"] == 64
    assert [pv["prevalence"] for pv in clinical["predictive_values"]] == list(FAST.prevalences)
    assert data["sections"]["generalisation"]["status"] == "measured"  # phantom site B is the run's own shift


def test_html_is_self_contained_and_holds_every_section(built):
    folder, _, _ = built
    page = (folder / "out" / "report.html").read_text()
    for name in rep.SECTIONS:
        assert f'<section id="{name}"' in page
    assert "<script" not in page.lower()
    links = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page)
    outside = [link for link in links if not link.startswith(("data:", "#"))]
    assert not outside, outside
    assert "RESEARCH USE ONLY" in page
    assert (folder / "out" / "report.html").stat().st_size < 5_000_000


def test_second_report_reuses_the_cached_evaluations(built, tmp_path):
    folder, ckpt, _ = built
    out = tmp_path / "again"
    shutil.copytree(folder / "out", out)
    again = rep.build_report(ckpt, out, settings=FAST, overwrite=True, progress=False)
    assert set(again["reused_from_cache"]) == set(rep.MEASURED)


def test_report_without_batchnorm_sites_or_reference_marks_those_sections_not_measured(tmp_path):
    ckpt = _checkpoint(tmp_path / "deit.pt", model_name="deit_tiny")
    report = rep.build_report(ckpt, tmp_path / "out", settings=FAST, own_shift=False, progress=False)
    sections = report["sections"]
    assert sections["generalisation"]["status"] == rep.NOT_MEASURED
    assert "--site" in sections["generalisation"]["reason"]
    assert sections["generalisation"]["adabn"].startswith(rep.NOT_MEASURED)
    assert sections["corruptions"]["reference"].startswith(rep.NOT_MEASURED)
    assert list(sections) == list(rep.SECTIONS)
    page = (tmp_path / "out" / "report.html").read_text()
    assert "Not measured: no external site" in page


def test_checkpoint_without_config_is_refused(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"model": create_model("small_cnn").state_dict()}, path)
    with pytest.raises(CheckpointError, match="missing keys config"):
        rep.build_report(path, tmp_path / "out", settings=FAST, progress=False)


def test_site_with_one_class_is_refused_with_the_option_named(tmp_path):
    ckpt = _checkpoint(tmp_path / "model.pt")
    root = tmp_path / "site" / "COVID"
    root.mkdir(parents=True)
    for i in range(3):
        from PIL import Image

        Image.fromarray(np.full((32, 32), 60 * i, dtype=np.uint8)).save(root / f"{i}.png")
    with pytest.raises(DataError, match=r"--site one=.*both"):
        rep.build_report(ckpt, tmp_path / "out", sites=[("one", str(tmp_path / "site"))], settings=FAST)


def test_existing_output_folder_is_refused_without_overwrite(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "model.pt")
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.html").write_text("an earlier report")
    assert main(["report", str(ckpt), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "report.html").read_text() == "an earlier report"


def test_bad_site_option_names_the_expected_form():
    with pytest.raises(ValueError, match="NAME=ROOT"):
        rep.parse_site("just-a-folder")


def _chromium() -> str | None:
    return next(
        (shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)), None
    )


@pytest.mark.skipif(_chromium() is None, reason="no chromium binary (apt-get install chromium) to render the HTML")
def test_html_renders_in_headless_chromium_without_console_errors(built, tmp_path):
    folder, _, _ = built
    shot = tmp_path / "shot.png"
    result = subprocess.run(
        [
            _chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--enable-logging=stderr",
            "--v=0",
            f"--screenshot={shot}",
            "--window-size=1000,1400",
            (folder / "out" / "report.html").resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shot.exists() and shot.stat().st_size > 10_000, result.stderr[-2000:]
    console = [line for line in result.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console
