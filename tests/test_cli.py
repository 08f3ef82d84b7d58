"""The command line: train, resume, evaluate, on the phantom, with tiny settings."""

import pandas as pd
import pytest

from robustmed_lite.cli import main

TINY = [
    "--img_size",
    "32",
    "--n_train",
    "64",
    "--n_val",
    "32",
    "--n_test",
    "32",
    "--batch_size",
    "32",
    "--eval_n",
    "16",
    "--attack_steps",
    "2",
    "--eval_attack_steps",
    "2",
    "--progress",
    "false",
]


def test_train_resume_and_evaluate(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", "--method", "trades", "--epochs", "1", "--out_dir", out, *TINY]) == 0
    capsys.readouterr()
    # A user's mistake is one line on stderr and exit code 2; --debug raises it with its traceback.
    assert main(["train", "--method", "trades", "--epochs", "1", "--out_dir", out, *TINY]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--resume" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(FileExistsError, match="--resume"):
        main(["train", "--method", "trades", "--epochs", "1", "--out_dir", out, *TINY, "--debug"])
    assert main(["train", "--resume", "--method", "trades", "--epochs", "1", "--out_dir", out, *TINY]) == 0
    capsys.readouterr()
    csv = tmp_path / "table.csv"
    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                f"{out}/best_robust.pt",
                "--attacks",
                "fgsm,pgd10",
                "--n",
                "16",
                "--out",
                str(csv),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "PGD-10" in printed and "worst case" in printed and "4/255" in printed  # cpu-demo trains at 4/255
    # The phantom's 32 test slices are 15 COVID and 17 non-COVID: a stratified 16 keeps that mix.
    assert "16 of 32 images of the run's test split, a stratified sample (seed 0): 7 COVID, 9 non-COVID" in printed
    table = pd.read_csv(csv)
    assert list(table["condition"]) == ["clean", "FGSM", "PGD-10", "worst case"]
    assert (table["n"] == 16).all() and (table["accuracy"] <= table["accuracy"][0]).all()
    assert (table["n_covid"] == 7).all() and (table["n_noncovid"] == 9).all()


def test_evaluate_ood_writes_tables_and_figures(tmp_path, capsys):
    runs = {}
    for method in ("erm", "trades"):
        runs[method] = str(tmp_path / method)
        assert main(["train", "--method", method, "--epochs", "1", "--out_dir", runs[method], *TINY]) == 0
    out = tmp_path / "ood"
    assert (
        main(
            [
                "evaluate",
                "--ood",
                "--checkpoint",
                f"{runs['erm']}/best_clean.pt",
                f"{runs['trades']}/best_robust.pt",
                "--n",
                "16",
                "--corruptions",
                "jpeg,low_dose",
                "--severities",
                "1,5",
                "--out_dir",
                str(out),
            ]
        )
        == 0
    )
    for name in ("corruptions.csv", "summary.csv", "shift.csv", "corruption_heatmap.png", "shift.png"):
        assert (out / name).stat().st_size > 0, name
    summary = pd.read_csv(out / "summary.csv").set_index("model")
    assert summary.loc["erm", "mCE"] == pytest.approx(1.0) and set(summary["reference"]) == {"erm"}
    shift = pd.read_csv(out / "shift.csv")
    assert set(shift["domain"]) == {"phantom test", "phantom site B"} and (shift["n"] == 16).all()
    assert len(pd.read_csv(out / "corruptions.csv")) == 2 * (1 + 2 * 2)
    # Models trained on other data cannot share the suite; severities outside 1..5 are refused.
    other = str(tmp_path / "other")
    assert main(["train", "--method", "erm", "--epochs", "1", "--out_dir", other, *TINY, "--n_test", "24"]) == 0
    capsys.readouterr()
    assert (
        main(
            [
                "evaluate",
                "--ood",
                "--checkpoint",
                f"{runs['erm']}/best_clean.pt",
                f"{other}/best_clean.pt",
                "--out_dir",
                str(out),
            ]
        )
        == 2
    )
    assert "different data (n_test)" in capsys.readouterr().err
    assert (
        main(
            [
                "evaluate",
                "--ood",
                "--checkpoint",
                f"{runs['erm']}/best_clean.pt",
                "--severities",
                "0,6",
                "--out_dir",
                str(out),
            ]
        )
        == 2
    )
    assert "1..5" in capsys.readouterr().err
