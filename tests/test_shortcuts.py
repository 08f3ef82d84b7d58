"""evaluation/shortcuts.py: calibration error, per-domain report, lung-region tests, saliency outside the body,
and the diagnose command on real data."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from _small import SIZES, options

from robustmed_lite.data.phantom import make_phantom_dataset
from robustmed_lite.data.preprocess import lung_region, prepare
from robustmed_lite.evaluation.shortcuts import (
    body_mask,
    domain_report,
    expected_calibration_error,
    intensity_histograms,
    intensity_summary,
    saliency_outside,
)
from robustmed_lite.models import create_model


def test_ece_against_a_hand_computation():
    # Two bins of confidence: 0.9 (3 samples, 2 right: the third predicts class 1) and 0.6 (1 sample, right).
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.6, 0.4]])
    labels = np.array([0, 0, 0, 0])
    # bin of 0.9: confidence 0.9, accuracy 2/3 -> gap 0.2333, weight 3/4; bin of 0.6: confidence 0.6, accuracy 1,
    # gap 0.4, weight 1/4. ECE = 0.75 * 0.23333 + 0.25 * 0.4 = 0.275
    assert expected_calibration_error(probs, labels, bins=10) == pytest.approx(0.275)
    perfect = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(perfect, np.array([0, 1])) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="at least one"):
        expected_calibration_error(np.zeros((0, 2)), np.zeros(0))


@pytest.fixture(scope="module")
def slices():
    return make_phantom_dataset(8, 64, "A", seed=0)


def test_domain_report_and_histograms(slices):
    torch.manual_seed(0)
    model = create_model("small_cnn", img_size=64).eval()
    report = domain_report(model, {"a": (slices.images, slices.labels), "b": (slices.images * 0.5, slices.labels)})
    assert list(report["domain"]) == ["a", "b"] and (report["n"] == 8).all()
    assert list(report.columns) == REPORT_COLUMNS and len(report) == 2
    assert report["true_covid_share"].iloc[0] == pytest.approx(float(slices.labels.float().mean()))
    assert report[["predicted_covid_share", "ece", "balanced_accuracy"]].apply(lambda c: c.between(0, 1)).all().all()
    hist = intensity_histograms({"a": slices.images, "dark": slices.images * 0.5}, bins=16)
    assert set(hist["domain"]) == {"a", "dark"} and len(hist) == 32
    dark = hist[hist["domain"] == "dark"]
    assert dark[dark["intensity"] > 0.55]["density"].sum() == 0  # halved intensities stay at or below 0.5


def test_intensity_summary_counts_the_outside_air():
    # Half of each slice is air (0), the other half a ramp from 0.2 to 1: the near-black share is one half and
    # the percentiles follow the ramp.
    ramp = torch.linspace(0.2, 1.0, 32).repeat(32, 1)
    slices = torch.cat([torch.zeros(32, 32), ramp], dim=1).expand(4, 1, 32, 64)
    summary = intensity_summary({"framed": slices, "tight": ramp.expand(4, 1, 32, 32)}).set_index("domain")
    assert summary.loc["framed", "near_black_share"] == pytest.approx(0.5)
    assert summary.loc["tight", "near_black_share"] == 0
    assert summary.loc["tight", "grey_median"] == pytest.approx(0.6, abs=0.02)
    assert summary.loc["framed", "grey_p1"] == 0 and summary.loc["framed", "grey_p99"] == pytest.approx(1.0, abs=0.01)


def test_lung_region_tests_remove_or_keep_the_lungs(slices):
    from robustmed_lite.data.preprocess import lungs
    from robustmed_lite.method.prior import dice

    x = slices.images
    found = lungs(x)
    assert dice(found, slices.lung_masks).mean() > 0.85  # the estimated lungs are the phantom's lungs
    no_lungs, blanked = lung_region(x, "no_lungs")
    only, blanked_only = lung_region(x, "lungs_only")
    assert blanked == [] and blanked_only == []
    for i in range(len(x)):
        assert no_lungs[i][found[i]].std() < 1e-6, "the lungs are one flat fill"
        assert torch.equal(no_lungs[i][~found[i]], x[i][~found[i]]), "the rest is untouched"
        assert torch.equal(only[i][found[i]], x[i][found[i]]), "lungs_only keeps the lungs"
    assert (only[~found] == 0).all()
    assert torch.equal(prepare(x, 64, False, "none", "no_lungs")[0], no_lungs)
    flat = torch.full((1, 1, 32, 32), 0.6)
    out, blanked = lung_region(flat, "no_lungs")
    assert blanked == [0] and (out == 0).all()  # no lungs found: the slice shows nothing, and is counted
    with pytest.raises(ValueError, match="lung_region='heart'"):
        lung_region(x, "heart")


def test_body_mask_and_saliency_outside(slices):
    body = body_mask(slices.images)
    assert body.shape == slices.images.shape
    assert (body & slices.lung_masks).sum() >= 0.95 * slices.lung_masks.sum()  # the lungs lie inside the body
    assert not body[:, :, 0, 0].any()  # the phantom's corners are air outside the body
    torch.manual_seed(0)
    table = saliency_outside(create_model("small_cnn", img_size=64).eval(), slices.images[:4])
    assert list(table.columns) == ["outside_body", "body_area_outside", "outside_lungs", "lung_area_outside"]
    assert table.apply(lambda c: c.between(0, 1)).all().all()
    assert len(table) == 4  # one row per slice
    # the chance levels are the areas outside the masks: 1 - the body's (lungs') share of the slice
    expected_body = 1 - body[:4].flatten(1).float().mean(1)
    assert table["body_area_outside"].tolist() == pytest.approx(expected_body.tolist())
    from robustmed_lite.data.preprocess import lungs

    expected_lungs = 1 - lungs(slices.images[:4]).flatten(1).float().mean(1)
    assert table["lung_area_outside"].tolist() == pytest.approx(expected_lungs.tolist())
    assert (table["lung_area_outside"] > table["body_area_outside"]).all(), "the lungs lie inside the body"


REPORT_COLUMNS = [
    "domain",
    "n",
    "true_covid_share",
    "predicted_covid_share",
    "accuracy",
    "auc",
    "sensitivity",
    "specificity",
    "f1",
    "balanced_accuracy",
    "ece",
]


class _AlwaysCovid(torch.nn.Module):
    """Logits (0, log 3) for every slice: p(COVID) = 3/4, so it predicts COVID everywhere with confidence 3/4."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.zeros(()))  # a parameter, so the model has a device

    def forward(self, x):
        return torch.tensor([0.0, math.log(3)]).expand(len(x), 2) + self.scale


def test_domain_report_of_a_constant_model_by_hand():
    """The diagnose table, one row per domain, against values derived by hand for a model that always says COVID
    with p = 3/4: accuracy = the COVID share, sensitivity 1, specificity 0, balanced accuracy 1/2, AUC 1/2 (one
    score for all) and ECE = |COVID share - 3/4| (one confidence bin)."""
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    domains = {"mostly covid": (x, torch.tensor([1, 1, 1, 0])), "mostly not": (x, torch.tensor([1, 0, 0, 0]))}
    report = domain_report(_AlwaysCovid(), domains)
    assert list(report.columns) == REPORT_COLUMNS and len(report) == 2
    assert list(report["domain"]) == list(domains) and list(report["n"]) == [4, 4]
    assert report["true_covid_share"].tolist() == [0.75, 0.25]
    assert report["predicted_covid_share"].tolist() == [1.0, 1.0]
    assert report["accuracy"].tolist() == pytest.approx([0.75, 0.25])
    assert report["sensitivity"].tolist() == [1.0, 1.0] and report["specificity"].tolist() == [0.0, 0.0]
    assert report["balanced_accuracy"].tolist() == [0.5, 0.5] and report["auc"].tolist() == [0.5, 0.5]
    assert report["ece"].tolist() == pytest.approx([0.0, 0.5], abs=1e-6)  # p = 3/4 in float32
    numeric = report.drop(columns=["domain", "n"])
    assert numeric.apply(lambda c: c.between(0, 1)).all().all()


def test_the_diagnose_command_reports_every_site(tmp_path, shared_data, capsys):
    from robustmed_lite.cli import main

    run = str(tmp_path / "run")
    trained = main(["train", "--method", "erm", "--out_dir", run, *options(**SIZES, epochs=1, progress=False)])
    assert trained == 0
    out = tmp_path / "diagnosis.csv"
    assert (
        main(
            [
                "diagnose",
                "--checkpoint",
                f"{run}/best_clean.pt",
                "--data",
                f"{shared_data}/ucsd_covidct:test",
                f"{shared_data}/ucsd_covidct:val",
                "--n",
                "16",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    table = pd.read_csv(out)
    assert list(table["domain"]) == ["ucsd_covidct (test)", "ucsd_covidct (val)"]
    assert list(table["n"]) == [203, 118] and (table["saliency_n"] == 16).all()
    assert {"predicted_covid_share", "ece", "outside_lungs", "lung_area_outside"} <= set(table.columns)
    assert (table["grey_p1"] <= table["grey_median"]).all() and (table["grey_median"] <= table["grey_p99"]).all()
    assert table["near_black_share"].between(0, 1).all()
    hist = pd.read_csv(tmp_path / "diagnosis_histograms.csv")
    assert set(hist["domain"]) == set(table["domain"])
    for _, part in hist.groupby("domain"):  # densities over [0, 1] integrate to one
        assert (part["density"].sum() / len(part)) == pytest.approx(1.0, rel=1e-6)
    assert "reads the site" in capsys.readouterr().out
