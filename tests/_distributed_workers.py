"""What the processes of ``tests/test_distributed.py`` run: each function is one rank of a gloo group that
``launch`` starts with ``torch.multiprocessing.spawn``; results come back as files in the test's folder."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from robustmed_lite import checkpoints, distributed
from robustmed_lite.config import load_config
from robustmed_lite.data import splits
from robustmed_lite.trainer import Trainer


def launch(worker, ranks: int, folder: Path, *args) -> None:
    """Runs ``worker(rank, folder, *args)`` in ``ranks`` new processes joined by a file-based gloo group."""
    init = folder / f"group-{worker.__name__}-{len(list(folder.glob('group-*')))}"
    mp.spawn(_entry, args=(ranks, str(init), worker, folder, args), nprocs=ranks, join=True)


def _entry(rank: int, ranks: int, init: str, worker, folder: Path, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=ranks)
    try:
        worker(rank, folder, *args)
    finally:
        dist.destroy_process_group()


def _config(folder: Path, name: str, overrides: dict):
    return load_config("cpu-demo", dict(out_dir=str(folder / name)), defaults=overrides)


def _record_writes(folder: Path, rank: int):
    """Makes every checkpoint and log write of this process append its file name to writes-RANK.json."""
    path = folder / f"writes-{rank}.json"
    path.write_text("[]")
    save, append = checkpoints._atomic_save, checkpoints._append_log

    def note(name: str) -> None:
        path.write_text(json.dumps([*json.loads(path.read_text()), name]))

    def recorded_save(obj, target):
        note(Path(target).name)
        save(obj, target)

    def recorded_append(run_dir, row):
        note("log")
        append(run_dir, row)

    checkpoints._atomic_save, checkpoints._append_log = recorded_save, recorded_append


def all_runs(rank: int, folder: Path, erm: dict, robustmed: dict) -> None:
    """Every distributed run of the tests in one group (a launch costs seconds of imports), each write recorded:

    * ERM: a whole run (``erm-ddp``), and the continuation of ``erm-split``, which one process began;
    * the method: ten steps on one batch (losses, weight noise directions, parameters: BatchNorm's running
      statistics are each rank's own until validation), a whole run
      (``robustmed-full``) and its first epoch (``robustmed-split``, continued by the torchrun test).
    """
    _record_writes(folder, rank)
    trainer = Trainer(_config(folder, "erm-ddp", erm))
    trainer.fit()
    torch.save(trainer.model.state_dict(), folder / f"erm-ddp-weights-{rank}.pt")
    Trainer(_config(folder, "erm-split", erm), resume=True).fit()

    steps = Trainer(_config(folder, "steps", dict(robustmed, weight_feedback=True)))
    directions, compute = [], steps.weight_noise.compute_batch

    def recording(batch):
        direction = compute(batch)
        directions.append({k: v.clone() for k, v in direction.items()})
        return direction

    steps.weight_noise.compute_batch = recording
    cfg = steps.cfg
    x, x_aug, y = next(steps.data.train.batches(cfg.batch_size, epoch=0, shuffle=False, rank=rank, ranks=2))[:3]
    attack, losses, gammas = steps.sample_attack(0), [], []
    for _ in range(10):
        stats = steps.train_step(x, x_aug, y, epoch=0, attack=attack)
        losses.append(distributed.sum_over_ranks([stats["loss"] / 2])[0])
        gammas.append(stats["gamma_scale"])
    torch.save(
        {
            "losses": losses,
            "gamma_scale": gammas,
            "directions": directions,
            "images": x,
            "weights": dict(steps.model.named_parameters()),
        },
        folder / f"steps-{rank}.pt",
    )

    Trainer(_config(folder, "robustmed-full", robustmed)).fit()
    Trainer(_config(folder, "robustmed-split", robustmed)).fit(stop_after=1)


def store_batches(rank: int, folder: Path, overrides: dict) -> None:
    """Builds the data as a rank of ``train`` does (opening the slice store itself) and saves its share of every
    batch of epoch 0 as store-batches-RANK.pt."""
    data = splits.build_data(_config(folder, f"store-{rank}", overrides))
    shares = data.train.batches(overrides["batch_size"], epoch=0, rank=rank, ranks=distributed.world_size())
    torch.save([{"x": x, "x_aug": x_aug, "y": y} for x, x_aug, y in shares], folder / f"store-batches-{rank}.pt")
