"""The command line: train, resume, evaluate, on the phantom, with tiny settings; its list of commands and the one
override syntax of every command that trains."""

import argparse
import re

import pandas as pd
import pytest
from _small import TINY_OPTIONS

from robustmed_lite import cli
from robustmed_lite.cli import main

TINY = TINY_OPTIONS


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
    # --attacks none: clean metrics alone, and the output says so.
    assert main(["evaluate", "--checkpoint", f"{out}/best_robust.pt", "--attacks", "none", "--out", str(csv)]) == 0
    printed = capsys.readouterr().out
    assert "clean metrics alone (--attacks none)" in printed and "PGD" not in printed
    table = pd.read_csv(csv)
    assert list(table["condition"]) == ["clean"] and table.loc[0, "n"] == 32
    assert {"accuracy", "auc", "sensitivity", "specificity", "f1", "n"} <= set(table.columns)
    assert not {"eps", "steps", "seconds"} & set(table.columns)
    for attacks, extra, message in (
        ("none,fgsm", [], "--attacks takes comma-separated attack names or 'none'"),
        ("none", ["--eps", "8/255"], "--eps is an attack radius and --attacks none runs no attack"),
    ):
        assert main(["evaluate", "--checkpoint", f"{out}/best_robust.pt", "--attacks", attacks, *extra]) == 2
        assert message in capsys.readouterr().err


def test_evaluate_ood_writes_tables_and_figures(tmp_path, capsys):
    runs = {}
    for method in ("erm", "trades"):
        runs[method] = str(tmp_path / method)
        assert main(["train", "--method", method, "--epochs", "1", "--out_dir", runs[method], *TINY]) == 0
    out = tmp_path / "ood"

    def ood(*checkpoints, options=()) -> int:
        return main(["evaluate", "--ood", "--checkpoint", *checkpoints, *options, "--out_dir", str(out)])

    options = ["--n", "16", "--corruptions", "jpeg,low_dose", "--severities", "1,5"]
    assert ood(f"{runs['erm']}/best_clean.pt", f"{runs['trades']}/best_robust.pt", options=options) == 0
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
    assert ood(f"{runs['erm']}/best_clean.pt", f"{other}/best_clean.pt") == 2
    assert "different data (n_test)" in capsys.readouterr().err
    assert ood(f"{runs['erm']}/best_clean.pt", options=["--severities", "0,6"]) == 2
    assert "1..5" in capsys.readouterr().err


def _commands(parser: argparse.ArgumentParser, prefix: str = "") -> list[str]:
    """Every subcommand of ``parser``, nested ones as ``data fetch``."""
    names = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                nested = _commands(sub, f"{prefix}{name} ")
                names += nested or [f"{prefix}{name}"]
    return names


def test_the_docstring_and_help_list_every_command(capsys):
    commands = _commands(cli._parser())
    assert {"train", "evaluate", "reproduce", "sites", "fidelity", "ablation", "data fetch"} <= set(commands)
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    listed = re.findall(r"^    ([a-z]+(?: [a-z]+)?)  +\S", cli.__doc__, flags=re.M)  # "    name   one line"
    assert sorted(listed) == sorted(commands)  # each once
    # The top-level help shows that list (argparse's own list of the commands follows it).
    assert set(commands) <= set(re.findall(r"^    ([a-z]+(?: [a-z]+)?)  +\S", help_text, flags=re.M))
    assert "    data fetch    download a real CT set" in help_text


TRAINING_COMMANDS = ["train", "demo", "reproduce", "sites", "fidelity", "ablation"]


@pytest.mark.parametrize("command", TRAINING_COMMANDS)
def test_every_command_that_trains_takes_fields_as_key_value(command):
    args = cli._parser().parse_args([command, "--epochs", "3", "--beta", "2", "--eps", "8/255", "--data", "phantom"])
    overrides = cli._overrides(args)
    # A study's --data is its own option (the training set of every run), not an override.
    study = command not in ("train", "demo")
    expected = {"epochs": 3, "beta": 2.0, "eps": "8/255", **({} if study else {"data": "phantom"})}
    assert overrides == expected
    assert not study or args.data == "phantom"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["reproduce", "--set", "beta=2"], "--set KEY=VALUE was removed: pass any TrainConfig field as its own option"),
        (["reproduce", "--set", "beta=2"], "(here: --beta 2)"),
        (["fidelity", "--seed", "3"], "argument --seed: a study sets each run's seed: use --seeds"),
        (["ablation", "--method", "erm"], "argument --method: a study trains its own rows"),
        (["sites", "--ood_data", "x"], "(--target)"),
        (["demo", "--out_dir", "x"], "demo's runs go to --out_root"),
    ],
)
def test_removed_and_clashing_options_say_what_to_pass(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err
    assert len(err.splitlines()) <= 3  # the short usage line, not every field


def test_a_bad_override_value_names_its_option(capsys):
    assert main(["ablation", "--data", "phantom", "--epochs", "x"]) == 2
    assert "Fix: pass --epochs with an integer" in capsys.readouterr().err


def test_study_overrides_reach_every_run(monkeypatch, tmp_path, reproduce_calls):
    assert (
        main(["ablation", "--data", "phantom", "--seeds", "0", "--epochs", "2", "--lung_crop", "true", "--quiet"]) == 0
    )
    assert reproduce_calls["overrides"] == {"epochs": 2, "lung_crop": True}
    from robustmed_lite.studies import sites

    seen = {}

    def fake_run_sites(profile, **kwargs):
        seen.update(kwargs)
        (tmp_path / "table.md").write_text("table")
        return {"runs": pd.DataFrame()}

    monkeypatch.setattr(sites, "run_sites", fake_run_sites)
    assert main(["sites", "--out", str(tmp_path), "--batch_size", "16", "--quiet"]) == 0
    assert seen["overrides"] == {"batch_size": 16} and seen["data"] is None
