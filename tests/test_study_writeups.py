"""Each committed study folder's README.md is what its own result files give, and no result file holds a machine
path: the write-ups cannot drift from the numbers, and the folders read the same on every machine."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from robustmed_lite.cli import main
from robustmed_lite.studies.writeup import (
    MACHINE_PATH,
    STUDIES,
    portable_paths,
    study_folders,
    study_of,
    write_index,
    write_writeup,
    writeup,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
COMMITTED = study_folders(RESULTS)
TEXT_SUFFIXES = (".csv", ".json", ".md", ".txt")


def _copy(folder: Path, tmp_path: Path) -> Path:
    """The study folder copied to the same place under ``tmp_path`` (``results/<study>/<profile>``)."""
    copy = tmp_path / folder.relative_to(ROOT)
    shutil.copytree(folder, copy)
    return copy


def test_every_study_has_a_committed_folder():
    assert {study_of(f) for f in COMMITTED} == set(STUDIES)


@pytest.mark.parametrize("folder", COMMITTED, ids=lambda f: f"{f.parent.name}/{f.name}")
def test_the_committed_writeup_is_what_its_files_give(folder, tmp_path):
    copy = _copy(folder, tmp_path)
    (copy / "README.md").unlink()
    written = write_writeup(copy)
    assert written.read_bytes() == (folder / "README.md").read_bytes(), (
        f"{folder}/README.md is not what its files give: run python -m robustmed_lite results writeup "
        f"{folder.relative_to(ROOT)}"
    )


def test_the_results_index_is_what_the_folders_give(tmp_path):
    shutil.copytree(RESULTS, tmp_path / "results")
    assert write_index(tmp_path / "results").read_bytes() == (RESULTS / "README.md").read_bytes(), (
        "results/README.md is stale: run python -m robustmed_lite results writeup"
    )


def _edit_csv(path: Path, where: dict, column: str, value) -> None:
    frame = pd.read_csv(path)
    mask = pd.Series(True, index=frame.index)
    for key, wanted in where.items():
        mask &= frame[key] == wanted
    assert mask.sum() == 1, (path, where)
    frame.loc[mask, column] = value
    frame.to_csv(path, index=False)


@pytest.mark.parametrize(
    "folder, file, where, column, value, expected",
    [
        (
            "reproduction/cpu",
            "table.csv",
            {"name": "erm", "metric": "clean_accuracy"},
            "mean",
            0.1234,
            "| natural accuracy | 0.123 ±",
        ),
        (
            "reproduction/cpu",
            "verdicts.csv",
            {"comparator": "best prior method", "metric": "clean_accuracy"},
            "gain_mean",
            0.0456,
            "is +4.6 [",
        ),
        (
            "ablation/cpu-phantom",
            "effects.csv",
            {"row": "cap", "metric": "clean_accuracy"},
            "gain_mean",
            -0.777,
            "| without the prediction feedback (`cap`) | -0.777 [",
        ),
        (
            "fidelity/cpu",
            "effects.csv",
            {"row": "awp", "metric": "ensemble_train_eps"},
            "gain_ci_high",
            0.5,
            "2 of 40 intervals exclude zero",
        ),
        ("sites/cpu", "goal.csv", {"method": "erm"}, "mean", 0.7011, "ERM 0.701 ["),
    ],
    ids=["table", "verdict", "ablation-effect", "fidelity-count", "sites-goal"],
)
def test_the_writeup_numbers_come_from_the_files(folder, file, where, column, value, expected, tmp_path):
    copy = _copy(RESULTS / folder, tmp_path)
    assert expected not in writeup(copy)
    _edit_csv(copy / file, where, column, value)
    assert expected in writeup(copy)


def test_a_variant_row_is_shown_against_its_method_paired_by_seed(tmp_path):
    """A method at other settings (``reproduce --variant``) gets its paired difference with the method's own row."""
    copy = _copy(RESULTS / "reproduction" / "cpu", tmp_path)
    runs = pd.read_csv(copy / "runs.csv")
    runs = runs[runs["name"].isin(["erm", "trades", "awp", "cap", "robustmed"])]
    variant = runs[runs["name"] == "awp"].assign(name="awp+test")
    variant["clean_accuracy"] += 0.1
    pd.concat([runs, variant]).to_csv(copy / "runs.csv", index=False)
    text = writeup(copy)
    section = text.split("## Rows at other settings", 1)[1].split("\n## ", 1)[0]
    row = next(line for line in section.splitlines() if line.startswith("| `awp+test`"))
    assert row.startswith(f"| `awp+test` − AWP | {variant['seed'].nunique()} | +0.100 [+0.100, +0.100] | +0.000 ")


def test_a_registry_method_beyond_the_five_is_no_variant(tmp_path):
    """A GPU study trains all nine methods: ``pgd_at`` is a method of its own, not a row at other settings."""
    copy = _copy(RESULTS / "reproduction" / "cpu", tmp_path)
    runs = pd.read_csv(copy / "runs.csv")
    runs = runs[runs["name"].isin(["erm", "trades", "awp", "cap", "robustmed"])]
    pgd_at = runs[runs["name"] == "trades"].assign(name="pgd_at", method="pgd_at")
    pd.concat([runs, pgd_at]).to_csv(copy / "runs.csv", index=False)
    assert "## Rows at other settings" not in writeup(copy)


def test_the_verdicts_never_take_a_variant_as_comparator():
    from robustmed_lite.studies.summary import summarise

    runs = pd.read_csv(RESULTS / "reproduction" / "cpu" / "runs.csv")
    runs = runs[runs["name"].isin(["erm", "trades", "awp", "cap", "robustmed"])]
    best = runs[runs["name"] == "erm"].assign(name="erm+best")
    for column in ("val_clean", "val_robust", "clean_accuracy"):
        best[column] = 1.0
    verdicts = summarise(pd.concat([runs, best]))["verdicts"]
    assert len(verdicts) and "erm+best" not in set(verdicts["comparator_method"])


def test_the_writeup_says_how_to_write_it_again():
    text = (RESULTS / "reproduction" / "cpu" / "README.md").read_text()
    assert "python -m robustmed_lite results writeup results/reproduction/cpu" in text


def test_machine_paths_become_relative_to_the_study_folder(tmp_path):
    folder = tmp_path / "results" / "reproduction" / "cpu"
    folder.mkdir(parents=True)
    machine = "/srv/someone/repo"
    pd.DataFrame({"name": ["erm"], "run_dir": [f"{machine}/runs/reproduction/cpu/erm-seed0"]}).to_csv(
        folder / "runs.csv", index=False
    )
    (folder / "profile.json").write_text(
        '{"base_config": {"data": "/srv/someone/shared/data/sarscov2", "eps_text": "8/255"}, '
        '"url": "https://example.org/a/b"}'
    )
    (folder / "commands.txt").write_text(
        f"2026-01-01T00:00:00+0000  shard 1/1  jobs 2  python -m robustmed_lite reproduce --runs {machine}/runs/x\n"
    )
    portable_paths(folder, study="reproduction")
    assert pd.read_csv(folder / "runs.csv")["run_dir"].tolist() == ["../../../runs/reproduction/cpu/erm-seed0"]
    profile = (folder / "profile.json").read_text()
    assert '"data": "../../../../shared/data/sarscov2"' in profile
    assert '"eps_text": "8/255"' in profile and "https://example.org/a/b" in profile, "not paths: left alone"
    assert (folder / "commands.txt").read_text().endswith("--runs runs/x\n"), "commands run from the repository root"


def test_a_study_run_here_writes_paths_relative_to_its_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "runs.csv").write_text(f"name,run_dir\nerm,{tmp_path}/runs/erm-seed0\n")
    portable_paths(folder, machine_folder=folder, study="reproduction")
    assert (folder / "runs.csv").read_text() == "name,run_dir\nerm,../runs/erm-seed0\n"


def test_no_committed_result_file_holds_a_machine_path():
    found = []
    for path in RESULTS.rglob("*"):
        if path.suffix in TEXT_SUFFIXES:
            text = path.read_text()
            found += [f"{path.relative_to(ROOT)}: {m.group(0)}" for m in MACHINE_PATH.finditer(text)]
            found += [f"{path.relative_to(ROOT)}: {p}" for p in ("/work/", "/root/", "/home/") if p in text]
    assert not found, f"machine paths in committed results (fix: python -m robustmed_lite results writeup): {found}"


def test_the_writeup_command_writes_a_folder_and_refuses_a_missing_one(tmp_path, capsys):
    copy = _copy(RESULTS / "ablation" / "cpu", tmp_path)
    (copy / "README.md").unlink()
    assert main(["results", "writeup", str(copy)]) == 0
    assert (copy / "README.md").read_bytes() == (RESULTS / "ablation" / "cpu" / "README.md").read_bytes()
    assert main(["results", "writeup", str(tmp_path / "nothing")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_a_folder_without_results_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no study's result files"):
        study_of(tmp_path)
