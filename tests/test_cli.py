"""The command line: train, resume, evaluate, on the phantom, with tiny settings."""

import pandas as pd
import pytest

from robustmed_lite.__main__ import main

TINY = ["--img_size", "32", "--n_train", "64", "--n_val", "32", "--n_test", "32", "--batch_size", "32",
        "--eval_n", "16", "--attack_steps", "2", "--eval_attack_steps", "2", "--progress", "false"]


def test_train_resume_and_evaluate(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", "--method", "trades", "--epochs", "1", "--out_dir", out, *TINY]) == 0
    with pytest.raises(FileExistsError, match="--resume"):
        main(["train", "--method", "trades", "--epochs", "1", "--out_dir", out, *TINY])
    assert main(["train", "--resume", "--method", "trades", "--epochs", "1", "--out_dir", out, *TINY]) == 0
    capsys.readouterr()
    csv = tmp_path / "table.csv"
    assert main(["evaluate", "--checkpoint", f"{out}/best_robust.pt", "--attacks", "fgsm,pgd10", "--n", "16",
                 "--out", str(csv)]) == 0
    printed = capsys.readouterr().out
    assert "PGD-10" in printed and "worst case" in printed and "4/255" in printed  # cpu-demo trains at 4/255
    table = pd.read_csv(csv)
    assert list(table["condition"]) == ["clean", "FGSM", "PGD-10", "worst case"]
    assert (table["n"] == 16).all() and (table["accuracy"] <= table["accuracy"][0]).all()
