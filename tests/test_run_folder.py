"""Run folders: one writer at a time (a lock with the PID), checked before work, a full disk said as such, and
Ctrl-C that stops with the command to resume."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest
import torch
from _small import SIZES

from robustmed_lite import checkpoints
from robustmed_lite.checkpoints import (
    LOCK_NAME,
    DiskFullError,
    RunLockedError,
    check_writable,
    load_checkpoint,
)
from robustmed_lite.config import load_config
from robustmed_lite.data.splits import build_data
from robustmed_lite.trainer import Trainer, TrainingInterrupted

TINY = dict(SIZES, method="erm", epochs=2, eval_attack_steps=1, progress=False)


@pytest.fixture(scope="module")
def tiny_data():
    return build_data(load_config("cpu-demo", dict(TINY)))


def _config(tmp_path, **overrides):
    return load_config("cpu-demo", dict(TINY, out_dir=str(tmp_path / "run"), **overrides))


def _write_lock(run_dir, pid: int) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": os.uname().nodename, "since": "earlier"}))


def test_a_second_writer_is_refused_and_nothing_is_overwritten(tmp_path, tiny_data):
    cfg = _config(tmp_path)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(cfg.run_dir(), other.pid)
        (cfg.run_dir() / "config.yaml").write_text("seed: 0  # the other writer's\n")
        with pytest.raises(RunLockedError, match=rf"being written by process {other.pid}.*choose another --out_dir"):
            Trainer(cfg, data=tiny_data)
        assert (cfg.run_dir() / "config.yaml").read_text() == "seed: 0  # the other writer's\n"
    finally:
        other.kill()
        other.wait()


def test_a_stale_lock_is_taken_over_and_the_lock_is_gone_after_fit(tmp_path, tiny_data):
    cfg = _config(tmp_path)
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _write_lock(cfg.run_dir(), int(finished.stdout))  # a process that crashed: its PID is gone
    trainer = Trainer(cfg, data=tiny_data)
    assert json.loads((cfg.run_dir() / LOCK_NAME).read_text())["pid"] == os.getpid()
    trainer.fit()
    assert not (cfg.run_dir() / LOCK_NAME).exists()
    assert load_checkpoint(cfg.run_dir() / "last.pt")["epoch"] == 2


def test_a_full_disk_is_reported_and_the_previous_checkpoint_survives(tmp_path, tiny_data, monkeypatch):
    cfg = _config(tmp_path)
    trainer = Trainer(cfg, data=tiny_data)
    trainer.fit(stop_after=1)
    before = (cfg.run_dir() / "last.pt").read_bytes()

    def full_disk(obj, path, *args, **kwargs):
        open(path, "wb").write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc] . unexpected pos 1234 vs 1200")

    resumed = Trainer(cfg, data=tiny_data, resume=True)
    monkeypatch.setattr(checkpoints.torch, "save", full_disk)
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda p: _Usage(0))
    said = r"^no space left .* writing (best_clean|last).pt: the previous \1.pt is kept.*--resume"
    with pytest.raises(DiskFullError, match=said):
        resumed.fit()
    assert (cfg.run_dir() / "last.pt").read_bytes() == before
    assert not list(cfg.run_dir().glob("*.tmp"))
    assert not (cfg.run_dir() / LOCK_NAME).exists()


class _Usage:
    def __init__(self, free: int):
        self.total, self.used, self.free = 10 * 2**30, 10 * 2**30 - free, free


def test_output_folders_are_checked_before_work(tmp_path, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        check_writable(a_file, 1)

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(checkpoints.tempfile, "TemporaryFile", read_only)
    with pytest.raises(PermissionError, match=r"cannot write in .*Read-only file system.*writable disk"):
        check_writable(tmp_path / "new" / "run", 1)
    monkeypatch.undo()
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda p: _Usage(2**20))
    with pytest.raises(DiskFullError, match=r"^.* has 1 MB free; this run's checkpoints need about 2 MB"):
        check_writable(tmp_path / "new" / "run", 2 * 2**20)
    assert not (tmp_path / "new").exists()  # a refused start leaves no folder


def test_ctrl_c_stops_with_the_resume_command_and_resume_finishes(tmp_path, tiny_data, monkeypatch):
    cfg = _config(tmp_path)
    trainer = Trainer(cfg, data=tiny_data)
    step = Trainer.train_step

    def interrupted_in_epoch_two(self, *args, **kwargs):
        if args[3] == 1:  # epoch index 1: the second epoch
            raise KeyboardInterrupt
        return step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train_step", interrupted_in_epoch_two)
    with pytest.raises(TrainingInterrupted, match=r"epoch 2 of 2; .*last.pt holds epoch 1\. Continue with: .*--resume"):
        trainer.fit()
    assert not (cfg.run_dir() / LOCK_NAME).exists()
    monkeypatch.undo()
    history = Trainer(cfg, data=tiny_data, resume=True).fit()
    assert [row["epoch"] for row in history] == [1, 2]
    assert torch.isfinite(torch.tensor(history[-1]["train_loss"]))


@pytest.mark.parametrize(
    ("overrides", "said"),
    [
        ({"img_size": 7}, r"model 'tiny_visformer' cannot take 7 x 7 images .*Fix: use a larger --img_size"),
        ({"img_size": 100000}, r"img_size 100000 needs 37\.3 GiB per slice .*Fix: use at most 2048"),
        ({"device": "gpu"}, r"unknown device 'gpu'\. Fix: use auto, cpu, cuda"),
    ],
)
def test_sizes_and_devices_are_refused_before_any_folder_is_made(tmp_path, overrides, said):
    cfg = _config(tmp_path, **overrides)
    with pytest.raises(ValueError, match=said):
        Trainer(cfg)
    assert not cfg.run_dir().exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"device 'cuda' is not available here \(0 CUDA GPU\(s\) found"):
        Trainer(_config(tmp_path, device="cuda"))
    assert not (tmp_path / "run").exists()


def test_the_cli_says_ctrl_c_and_file_system_refusals_in_one_line(tmp_path, capsys, monkeypatch):
    from robustmed_lite import cli

    def interrupted(args):
        raise TrainingInterrupted("stopped by Ctrl-C in epoch 2 of 6; runs/x/last.pt holds epoch 1. Continue with: ...")

    monkeypatch.setattr(cli, "_train", interrupted)
    assert cli.main(["train", "--out_dir", str(tmp_path / "run")]) == 130
    assert capsys.readouterr().err.strip().startswith("interrupted: stopped by Ctrl-C in epoch 2 of 6")

    def read_only(args):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "run" / "log.csv"))

    monkeypatch.setattr(cli, "_train", read_only)
    assert cli.main(["train", "--out_dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "log.csv: Read-only file system. Fix:" in err[0]


def test_evaluate_out_onto_a_folder_is_refused_before_evaluating(tmp_path, capsys):
    from robustmed_lite import cli

    (tmp_path / "results").mkdir()
    code = cli.main(["evaluate", "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "results")])
    err = capsys.readouterr().err
    assert code == 2 and "--out" in err and "is a folder. Fix: name a file" in err
