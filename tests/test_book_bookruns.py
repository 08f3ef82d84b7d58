"""The shipped fast-profile runs: they pack and restore faithfully, are used only for exactly their config, cannot
be continued, match the current preset and reproduce their recorded metrics (restored, and trained again)."""

import json

import pytest
import torch
from _small import SMALL as SMALL_OF_EVERY_METHOD

from robustmed_lite.book import bookruns
from robustmed_lite.book.runs import train_or_load
from robustmed_lite.checkpoints import CheckpointError, load_checkpoint
from robustmed_lite.config import load_config
from robustmed_lite.trainer import Trainer

SMALL = {k: v for k, v in SMALL_OF_EVERY_METHOD.items() if k != "gamma"}  # trades and erm read no gamma


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """A small trained run, packed into a folder laid out as ``bookruns`` is (file + manifest)."""
    root = tmp_path_factory.mktemp("packed")
    trainer = train_or_load("trades", "cpu-demo", root=str(root / "trained"), overrides=SMALL, progress=False)
    folder = root / "shipped"
    folder.mkdir()
    bookruns.pack_run(trainer.run_dir, folder / "trades-seed0.pt")
    (folder / "manifest.json").write_text(
        json.dumps(
            {
                "generated": "test",
                "environment": {"torch": torch.__version__},
                "runs": {"trades-seed0": {"file": "trades-seed0.pt"}},
            }
        )
    )
    return trainer, folder


def _cfg(tmp_path, **overrides):
    return load_config("cpu-demo", dict(SMALL, method="trades", out_dir=str(tmp_path / "run"), **overrides))


def test_restored_run_is_the_trained_one_in_float16(packed, tmp_path):
    trainer, folder = packed
    cfg = _cfg(tmp_path)
    assert bookruns.restore(cfg, folder)
    for name in ("last.pt", "best_clean.pt", "best_robust.pt"):
        original = load_checkpoint(trainer.run_dir / name, required=("model", "epoch"))
        restored = load_checkpoint(cfg.run_dir() / name, required=("model", "epoch"))
        assert restored["epoch"] == original["epoch"]
        for key, value in original["model"].items():
            if value.is_floating_point():
                assert restored["model"][key].dtype == torch.float32
                torch.testing.assert_close(restored["model"][key], value.half().float(), rtol=0, atol=0)
            else:
                assert torch.equal(restored["model"][key], value)
    assert (cfg.run_dir() / "log.csv").read_text() == (trainer.run_dir / "log.csv").read_text()
    assert json.loads((cfg.run_dir() / "env.json").read_text())["restored_from"].endswith("trades-seed0.pt")

    # Loaded like any finished run: nothing trains, the history is the trained one.
    again = Trainer(cfg, resume=True)
    assert again.fit() == trainer.history
    assert again.start_epoch == cfg.epochs


def test_restore_only_for_exactly_that_config_and_an_empty_folder(packed, tmp_path):
    _, folder = packed
    assert not bookruns.restore(_cfg(tmp_path / "a", beta=6.0), folder)  # another setting
    assert not (tmp_path / "a" / "run").exists()
    assert not bookruns.restore(_cfg(tmp_path / "b", seed=1), folder)  # another seed: not shipped
    assert not bookruns.restore(load_config("cpu-demo", dict(SMALL, method="erm", out_dir=str(tmp_path / "c"))), folder)
    cfg = _cfg(tmp_path / "d")
    cfg.run_dir().mkdir(parents=True)
    (cfg.run_dir() / "best_clean.pt").write_bytes(b"mine")
    assert not bookruns.restore(cfg, folder)  # never overwrites a run
    assert (cfg.run_dir() / "best_clean.pt").read_bytes() == b"mine"
    assert bookruns.restore(_cfg(tmp_path / "e", progress=True, device="cpu"), folder)  # watching is not a setting


def test_restored_run_cannot_be_continued(packed, tmp_path):
    _, folder = packed
    cfg = _cfg(tmp_path)
    assert bookruns.restore(cfg, folder)
    state = load_checkpoint(cfg.run_dir() / "last.pt", required=("model",))
    state["epoch"] = 1  # as if it had stopped early
    torch.save(state, cfg.run_dir() / "last.pt")
    with pytest.raises(CheckpointError, match="cannot be continued"):
        Trainer(cfg, resume=True)


def test_pack_refuses_an_unfinished_run(tmp_path):
    trainer = Trainer(_cfg(tmp_path))
    trainer.fit(stop_after=1)
    with pytest.raises(ValueError, match="only a finished run"):
        bookruns.pack_run(trainer.run_dir, tmp_path / "x.pt")


def test_train_or_load_restores_only_when_asked_and_says_so(packed, tmp_path, monkeypatch, capsys):
    _, folder = packed
    monkeypatch.setattr(bookruns, "SHIPPED_DIR", folder)
    run = train_or_load("trades", "cpu-demo", root=str(tmp_path), overrides=SMALL, progress=False, shipped=True)
    assert "restored the shipped cpu-demo run" in capsys.readouterr().out
    assert run.history and run.start_epoch == SMALL["epochs"]
    fresh = train_or_load("trades", "cpu-demo", root=str(tmp_path / "own"), overrides=SMALL, progress=False)
    assert "restored" not in capsys.readouterr().out
    assert "restored_from" not in (fresh.run_dir / "env.json").read_text()


def test_shipped_runs_match_the_preset_and_their_recorded_metrics():
    """What the notebooks rely on: every shipped run is used by the current cpu-demo preset, its file is the one
    recorded, and its restored weights give the recorded test metrics (within bookruns.TOLERANCE)."""
    manifest = json.loads(bookruns.manifest_path().read_text())
    assert set(manifest["runs"]) == set(bookruns.RUNS)
    assert all(run["megabytes"] < 6 for run in manifest["runs"].values())  # three checkpoints of ~1.7 MB at most
    assert bookruns.check() == []


@pytest.mark.slow
def test_shipped_erm_is_reproduced_by_training_it_again():
    # The whole run: an epoch-by-epoch comparison of its first epochs was tried and drifts by more than the
    # tolerance with another thread count (early epochs sit near chance and amplify rounding); the end does not.
    # Only ERM's shipped weights are measured here (all four are, in the test above).
    assert bookruns.check(retrain=["erm-seed0"], names=["erm-seed0"]) == []


def test_a_drift_beyond_the_tolerance_is_reported():
    recorded = {"test_clean": 0.80, "test_pgd": 0.40}
    assert bookruns._compare("erm", {"test_clean": 0.81, "test_pgd": 0.39}, recorded) == []
    assert bookruns._compare("erm", {"test_clean": 0.80, "test_pgd": 0.43}, recorded) == [
        "erm: test_pgd 0.4300, recorded 0.4000 (tolerance 0.02)"
    ]
