"""Training one run over several processes (DDP, gloo on the CPU): the same run as one process, the same weight
noise on every rank, one writer, resume on the same or another number of ranks, the torchrun command line.

The distributed runs start once, in one group of two processes (``runs``), and the tests read what they wrote;
the torchrun test then continues one of them in new processes."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from _distributed_workers import all_runs, launch
from _small import SMALL
from filelock import FileLock

from robustmed_lite import distributed
from robustmed_lite.checkpoints import load_checkpoint
from robustmed_lite.components import WEIGHT_NOISE, register_weight_noise
from robustmed_lite.config import load_config
from robustmed_lite.data.dataset import PriorDataset
from robustmed_lite.trainer import Trainer

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[1]

# ERM against one process, weights within 1e-5:
# - deit_tiny has LayerNorm only: without SyncBatchNorm each rank's BatchNorm normalises with its own half of the
#   batch, which legitimately differs from one process normalising the whole batch;
# - SGD: Adam divides by sqrt(v), which turns rounding noise in gradients that are zero in exact arithmetic (the
#   attention's key bias) into steps of size lr, so with AdamW those weights differ by lr per step;
# - 69 training images make batches of 32, 32 and 5, the last split 3 + 2 over the ranks (weighted by share);
# - 300 validation images and eval_n 260 make two validation blocks, one per rank.
ERM = dict(
    SMALL,
    method="erm",
    model="deit_tiny",
    deterministic=True,
    optimizer="sgd",
    lr=0.05,
    n_train=69,
    n_val=300,
    eval_n=260,
    eval_attack_steps=1,
)
ROBUSTMED = dict(SMALL, method="robustmed", weight_noise_warmup=0)


def _weights_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name].float(), b[name].float(), atol=atol, rtol=0), name


def _log_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]


def _config(folder: Path, name: str, overrides: dict):
    return load_config("cpu-demo", dict(out_dir=str(folder / name)), defaults=overrides)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process: an ERM run (``erm-single``), also stopped after its first epoch (``erm-split``); then two
    ranks: every run of ``_distributed_workers.all_runs``. Under pytest-xdist the first worker to get here
    trains, and the others wait for it and read the same folder (the session's shared temporary folder)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return _train_runs(tmp_path_factory.mktemp("ddp"))
    folder = tmp_path_factory.getbasetemp().parent / "ddp"
    with FileLock(f"{folder}.lock"):
        if not (folder / "done").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            _train_runs(folder)
            (folder / "done").touch()
    return folder


def _train_runs(folder: Path) -> Path:
    try:
        Trainer(_config(folder, "erm-single", ERM)).fit(stop_after=1)
        shutil.copytree(folder / "erm-single", folder / "erm-split")
        Trainer(_config(folder, "erm-single", ERM), resume=True).fit()  # bitwise the uninterrupted run
    finally:
        torch.use_deterministic_algorithms(False)  # the ERM config's deterministic mode is process-wide
    launch(all_runs, 2, folder, ERM, ROBUSTMED)
    return folder


def test_two_ranks_train_as_one_process(runs):
    ddp = [torch.load(runs / f"erm-ddp-weights-{rank}.pt", weights_only=True) for rank in (0, 1)]
    _weights_close(ddp[0], ddp[1], atol=0)  # DDP keeps the ranks' weights identical
    single = load_checkpoint(runs / "erm-single" / "last.pt")
    _weights_close(ddp[0], single["model"], atol=1e-5)
    assert len(single["history"]) == 2 and single["scheduler"]["last_epoch"] == 6  # six optimizer steps


def test_validation_over_ranks_equals_one_process(runs):
    state = load_checkpoint(runs / "erm-ddp" / "last.pt")
    evaluator = Trainer(_config(runs, "evaluate", ERM))
    torch.use_deterministic_algorithms(False)
    evaluator.model.load_state_dict(state["model"])
    logged = state["history"][-1]
    assert logged["val_robust_n"] == 260
    assert evaluator.validate() == {k: logged[k] for k in ("val_clean", "val_robust", "val_robust_n")}


def test_resume_on_another_number_of_ranks(runs):
    split = runs / "erm-split"
    state = load_checkpoint(split / "last.pt")
    assert state["epoch"] == 2 and [row["epoch"] for row in _log_rows(split)] == [1, 2]
    # The same global batches in the same order on any number of ranks: begun in one process and finished on
    # two, the run ends where one process's whole run does (up to float rounding).
    _weights_close(state["model"], load_checkpoint(runs / "erm-single" / "last.pt")["model"], atol=1e-5)
    record = json.loads((split / "resumed.jsonl").read_text())
    assert record["from_epoch"] == 1 and record["world_size"] == 2
    assert json.loads((split / "env.json").read_text())["world_size"] == 1


def test_weight_noise_is_the_same_on_every_rank_and_the_loss_falls(runs):
    steps = [torch.load(runs / f"steps-{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert not torch.equal(steps[0]["images"], steps[1]["images"])  # each rank its own half of the batch
    assert len(steps[0]["directions"]) == 10
    for d0, d1 in zip(steps[0]["directions"], steps[1]["directions"]):
        assert d0 and d0.keys() == d1.keys()
        for name in d0:
            assert torch.equal(d0[name], d1[name]), name
    assert steps[0]["gamma_scale"] == steps[1]["gamma_scale"]  # weight feedback decided alike
    _weights_close(steps[0]["weights"], steps[1]["weights"], atol=0)
    losses = torch.tensor(steps[0]["losses"])
    assert torch.isfinite(losses).all() and losses[-3:].sum() < losses[:3].sum(), losses


def test_only_rank_zero_writes(runs):
    writes = [json.loads((runs / f"writes-{rank}.json").read_text()) for rank in (0, 1)]
    assert writes[1] == []
    # erm-ddp 2 epochs, erm-split 1, robustmed-full 2, robustmed-split 1
    assert writes[0].count("last.pt") == writes[0].count("log") == 6
    for run in ("erm-ddp", "robustmed-full"):
        assert [row["epoch"] for row in _log_rows(runs / run)] == [1, 2]


def test_torchrun_resumes_a_run_bitwise(runs):
    """``torchrun -m robustmed_lite train --resume``: new processes finish the interrupted run as the whole run
    ended (the same number of ranks: bitwise), with the AdamW proxy's moments carried over."""
    split = runs / "robustmed-split"
    assert load_checkpoint(split / "last.pt", required=("weight_noise",))["weight_noise"]["proxy_optim"]["state"]
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1"
    )
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "robustmed_lite",
        "train",
        "--config",
        "cpu-demo",
        "--resume",
        "--out_dir",
        str(split),
    ]
    command += [arg for key, value in ROBUSTMED.items() for arg in (f"--{key}", str(value))]
    result = subprocess.run(command, env=env, cwd=runs, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("run directory:") == 1, result.stdout  # printed by rank 0 only
    full = load_checkpoint(runs / "robustmed-full" / "last.pt")
    resumed = load_checkpoint(split / "last.pt")
    _weights_close(full["model"], resumed["model"], atol=0)
    assert [r["val_robust"] for r in full["history"]] == [r["val_robust"] for r in resumed["history"]]
    assert [r["train_loss"] for r in full["history"]] == [r["train_loss"] for r in resumed["history"]]
    assert [row["epoch"] for row in _log_rows(split)] == [1, 2]
    assert json.loads((split / "resumed.jsonl").read_text())["world_size"] == 2


# ------------------------------------------------------------------------------- in one process, no launch
def test_sharded_batches_make_up_the_global_batches():
    images, labels = torch.rand(21, 1, 8, 8), torch.arange(21) % 2
    data = PriorDataset(images, labels, prior=False, seed=3)
    whole = [y for _, _, y in data.batches(8, epoch=1)]
    shards = [[y for _, _, y in data.batches(8, epoch=1, rank=r, ranks=2)] for r in (0, 1)]
    assert data.batch_count(8) == 3 and data.batch_count(8, ranks=2) == 3
    for k, global_batch in enumerate(whole):
        assert sorted(torch.cat([shards[0][k], shards[1][k]]).tolist()) == sorted(global_batch.tolist())
    assert [len(y) for y in shards[0]] == [4, 4, 3] and [len(y) for y in shards[1]] == [4, 4, 2]
    # A last batch with fewer images than ranks would leave a rank without any: it is dropped.
    assert data.batch_count(10, ranks=2) == 2 and data.batch_count(10, ranks=3) == 2 and data.batch_count(9, 4) == 2
    assert len(list(data.batches(10, epoch=1, rank=0, ranks=2))) == 2


def test_bad_distributed_settings_are_clear_errors(tmp_path, monkeypatch):
    assert distributed.per_rank_batch(32, 4) == 8
    with pytest.raises(ValueError, match="--batch_size a multiple of 3"):
        distributed.per_rank_batch(32, 3)
    assert not distributed.launched() and distributed.world_size() == 1 and distributed.is_main()
    register_weight_noise("unsynced", lambda model, cfg: object())  # a noise that cannot average its gradients
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        cfg = load_config(
            "cpu-demo", dict(sync_batchnorm=True, device="cpu", out_dir=str(tmp_path / "r")), defaults=SMALL
        )
        with pytest.raises(ValueError, match="sync_batchnorm false"):
            Trainer(cfg)
        cfg = load_config("cpu-demo", dict(weight_noise="unsynced", out_dir=str(tmp_path / "r")), defaults=SMALL)
        with pytest.raises(ValueError, match="no gradient_sync attribute"):
            Trainer(cfg)
    finally:
        dist.destroy_process_group()
        WEIGHT_NOISE.unregister("unsynced")
    assert not (tmp_path / "r").exists()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="--nproc_per_node 1"):
        distributed.local_device(torch.device("cuda"))
