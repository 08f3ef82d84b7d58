"""The book's fast-profile runs, shipped with the package so that a notebook on a laptop starts from trained models.

Notebooks 04, 05, 06 and 09 compare models trained with the ``cpu-demo`` preset on the phantom (``runs/book``).
Training all four on a 2-core CPU takes longer than a workshop can wait for one notebook, so the package carries
them: each run's checkpoints as float16 weights, its config and its per-epoch log (``bookruns/*.pt``), and what
the restored weights measure on the phantom test split (``bookruns/manifest.json``).

``experiments.train_or_load(..., shipped=True)`` (what the notebooks call while ``SHIPPED = True``) restores a
shipped run when it is asked for exactly that config (same method, seed and every training setting) and the run
folder is empty; it says so in one printed line. Any other config trains, as before, and so does every command
(``demo``, ``reproduce``, ...), which never passes ``shipped``. A restored run cannot be continued (it carries no
optimizer state); it can be evaluated and looked at like any finished run.

Regenerate them (about 8 minutes on 2 cores), and check them against what was recorded::

    python -m robustmed_lite bookruns regenerate           # all of them; --runs NAME ... only those
    python -m robustmed_lite bookruns check                # the shipped weights give the recorded metrics
    python -m robustmed_lite bookruns check --retrain erm-seed0  # training again gives them too (TOLERANCE)

Float16 weights change the logits in their fourth significant digit: the manifest records the metrics of the
restored (float16) weights and of the float32 weights they came from, and both checks allow ``TOLERANCE``.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from pathlib import Path

import torch
import yaml

from ..checkpoints import CHECKPOINTS
from ..config import DATA_KEYS, TrainConfig, load_config
from ..runinfo import environment_info

SHIPPED_DIR = Path(__file__).resolve().parent / "bookruns"
PRESET = "cpu-demo"
SEED = 0
# Every shipped run: name -> (method, settings that differ from the preset). Chapters 04-06 and 09 compare the first
# four; chapter 03 sweeps TRADES' beta (3.0, the preset's, is trades-seed0).
RUNS = {
    "erm-seed0": ("erm", {}),
    "trades-seed0": ("trades", {}),
    "awp-seed0": ("awp", {}),
    "robustmed-seed0": ("robustmed", {}),
    "trades-beta1-seed0": ("trades", {"beta": 1.0}),
    "trades-beta6-seed0": ("trades", {"beta": 6.0}),
    # Chapter 03's robust overfitting: PGD-AT on 128 slices, the rate a tenth after epoch 20 (Rice et al.), long
    # enough that validation PGD accuracy peaks and falls while the training loss keeps falling.
    "pgd_at-overfit-seed0": (
        "pgd_at",
        {
            "n_train": 128,
            "n_val": 256,
            "eval_n": 256,
            "batch_size": 32,
            "epochs": 80,
            "attack_warmup_epochs": 5,
            "schedule": "step",
            "lr_step_epoch": 20,
        },
    ),
}
# Accuracy on the 600-slice phantom test split, absolute: 0.02 is 12 slices. The same code on the same torch
# reproduces the recorded numbers exactly; another BLAS or torch version moves a few slices.
TOLERANCE = 0.02
REGENERATE = "python -m robustmed_lite bookruns regenerate"


def _half(weights: dict) -> dict:
    return {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}


def _full(weights: dict) -> dict:
    return {k: v.float() if v.is_floating_point() else v for k, v in weights.items()}


def pack_run(run_dir: str | Path, out: str | Path) -> dict:
    """Packs a finished run folder into one file: float16 weights of its three checkpoints (one copy per epoch:
    the best checkpoints are often the last one), its config and its per-epoch log.

    Returns:
        The packed record (as written).
    """
    from ..checkpoints import load_checkpoint

    run_dir = Path(run_dir)
    states = {
        name: load_checkpoint(run_dir / name, required=("model", "config", "epoch", "history", "best"))
        for name in CHECKPOINTS
    }
    last = states["last.pt"]
    if last["epoch"] < last["config"]["epochs"]:
        raise ValueError(
            f"{run_dir} stopped at epoch {last['epoch']} of {last['config']['epochs']}: only a finished "
            "run can be shipped. Fix: resume it first"
        )
    record = {
        "config": last["config"],
        "history": last["history"],
        "best": last["best"],
        "epochs": {name: int(s["epoch"]) for name, s in states.items()},
        "weights": {int(s["epoch"]): _half(s["model"]) for s in states.values()},
    }
    torch.save(record, out)
    return record


def manifest_path(folder: str | Path | None = None) -> Path:
    return Path(folder or SHIPPED_DIR) / "manifest.json"


def is_restored(run_dir: str | Path) -> bool:
    """Whether a run folder was restored from a shipped run rather than trained on this machine."""
    env = Path(run_dir) / "env.json"
    return env.exists() and "restored_from" in json.loads(env.read_text())


def find_shipped(cfg: TrainConfig, folder: str | Path | None = None) -> Path | None:
    """The shipped file (in ``folder``, default ``SHIPPED_DIR``) whose config is ``cfg`` up to where it is
    written and how it is watched, or None."""
    from ..checkpoints import config_differences, load_checkpoint

    manifest = manifest_path(folder)
    if not manifest.exists():
        return None
    for entry in json.loads(manifest.read_text())["runs"].values():
        path = manifest.parent / entry["file"]
        if entry.get("method", cfg.method) != cfg.method:
            continue
        if not config_differences(load_checkpoint(path, required=("config",))["config"], cfg):
            return path
    return None


def unpack_run(path: str | Path, cfg: TrainConfig, record_note: dict) -> None:
    """Writes a packed run into ``cfg.run_dir()``: the three checkpoints in float32, config.yaml, env.json
    (``record_note``: where it came from and what trained it) and the per-epoch log. The last checkpoint is marked
    ``restored`` and carries no optimizer state."""
    from ..checkpoints import _append_log, load_checkpoint

    record = load_checkpoint(path, required=("config", "history", "best", "epochs", "weights"))
    run_dir = cfg.run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    config = cfg.to_dict()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (run_dir / "env.json").write_text(json.dumps({"seed": cfg.seed, **record_note}, indent=2))
    for name, epoch in record["epochs"].items():
        state = {
            "model": _full(record["weights"][epoch]),
            "config": config,
            "epoch": epoch,
            "history": record["history"][:epoch],
            "best": record["best"],
        }
        if name == "last.pt":
            state["restored"] = True  # no optimizer state: finished, not resumable
        torch.save(state, run_dir / name)
    for row in record["history"]:
        _append_log(run_dir, row)


def restore(cfg: TrainConfig, folder: str | Path | None = None) -> bool:
    """Writes the shipped run matching ``cfg`` into ``cfg.run_dir()``, unless that folder already holds a
    checkpoint (see ``unpack_run``).

    Returns:
        True if a shipped run matched and was written; False otherwise (nothing is written).
    """
    if not cfg._resolved:
        cfg.resolve()
    path = find_shipped(cfg, folder)
    if path is None or any((cfg.run_dir() / name).exists() for name in CHECKPOINTS):
        return False
    manifest = json.loads(manifest_path(folder).read_text())
    entry = next(e for e in manifest["runs"].values() if e["file"] == path.name)
    unpack_run(
        path,
        cfg,
        {
            "restored_from": f"robustmed_lite/book/bookruns/{path.name}",
            "regenerate": REGENERATE,
            "trained": entry.get("generated", manifest["generated"]),
            "environment": entry.get("environment", manifest["environment"]),
        },
    )
    return True


def test_split(cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The run's prepared test split (``build_data(cfg).test``), without building its training data."""
    from ..data.preprocess import prepare
    from ..data.splits import raw_test_split

    images, labels = raw_test_split(cfg)
    return prepare(images, cfg.img_size, cfg.lung_crop, cfg.intensity, cfg.lung_region)[0], labels


def measure(run_dir: str | Path, cfg: TrainConfig, test=None) -> dict:
    """Clean and PGD accuracy of a run folder's selected checkpoint (``checkpoints.selected_checkpoint_name``)
    on its test split, PGD as the run validates (``trainer.validation_attack``)."""
    from ..checkpoints import model_from_checkpoint, selected_checkpoint_name
    from ..evaluation.metrics import accuracy, adversarial_examples
    from ..trainer import validation_attack

    name = selected_checkpoint_name(cfg.method)
    model, _ = model_from_checkpoint(Path(run_dir) / name, "cpu")
    x, y = test if test is not None else test_split(cfg)
    adv = adversarial_examples(model, validation_attack(cfg), x, y)
    return {
        "checkpoint": name,
        "test_clean": round(accuracy(model, x, y), 4),
        "test_pgd": round(accuracy(model, adv, y), 4),
        "n_test": len(y),
    }


def run_config(name: str, out_dir: str | Path) -> TrainConfig:
    """The config of shipped run ``name`` (``RUNS``), written to ``out_dir``."""
    method, overrides = RUNS[name]
    return load_config(PRESET, {**overrides, "method": method, "seed": SEED, "out_dir": str(out_dir)})


def train_run(name: str, out_dir: str | Path, progress: bool = False):
    """Trains shipped run ``name`` from scratch into ``out_dir``; returns its finished ``Trainer``."""
    from ..trainer import Trainer

    cfg = run_config(name, out_dir)
    cfg.progress = progress
    trainer = Trainer(cfg)
    trainer.fit()
    return trainer


def regenerate(names=tuple(RUNS), out_dir: str | Path = SHIPPED_DIR, progress: bool = True) -> dict:
    """Trains shipped runs from scratch, packs them and records what their restored weights measure.

    Args:
        names: The runs to train (``RUNS``); the manifest keeps the entries of the others as they were. Each entry
            records when and where it was trained.
        out_dir: Where the files and ``manifest.json`` go.
        progress: Progress bars.

    Returns:
        The manifest written to ``out_dir/manifest.json``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs, start = {}, time.time()
    with tempfile.TemporaryDirectory() as work:
        for name in names:
            began = time.time()
            trainer = train_run(name, f"{work}/trained/{name}", progress)
            cfg = trainer.cfg
            file = out_dir / f"{name}.pt"
            pack_run(trainer.run_dir, file)
            restored = run_config(name, f"{work}/restored/{name}")
            unpack_run(file, restored, {"packed_from": str(trainer.run_dir)})
            runs[name] = {
                "file": file.name,
                "method": cfg.method,
                "overrides": RUNS[name][1],
                "generated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "environment": environment_info(),
                "sha256": hashlib.sha256(file.read_bytes()).hexdigest(),
                "megabytes": round(file.stat().st_size / 2**20, 2),
                "train_minutes": round((time.time() - began) / 60, 2),
                "float32": measure(trainer.run_dir, trainer.cfg, trainer.data.test),
                "float16": measure(restored.run_dir(), trainer.cfg, trainer.data.test),
            }
    kept = {}
    if (out_dir / "manifest.json").exists():
        previous = json.loads((out_dir / "manifest.json").read_text())
        kept = {
            name: {"generated": previous["generated"], "environment": previous["environment"], **entry}
            for name, entry in previous["runs"].items()
            if name in RUNS and name not in runs
        }
    manifest = {
        "preset": PRESET,
        "seed": SEED,
        "command": REGENERATE,
        "tolerance": TOLERANCE,
        "generated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "minutes": round((time.time() - start) / 60, 2),
        "environment": environment_info(),
        "runs": {**kept, **runs},
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def check(retrain=(), names=tuple(RUNS), progress: bool = False) -> list[str]:
    """Compares the shipped runs with their manifest: each file's hash, its config against the current preset
    (a stale run would silently stop being used), the metrics of its restored weights, and, for the runs in
    ``retrain``, those of the run trained again from scratch.

    Args:
        retrain: Run names (``RUNS``) to train again; their test metrics are compared with the float32 record.
        names: The shipped runs to check.
        progress: Progress bars while retraining.

    Returns:
        One line per problem (empty when everything agrees within ``TOLERANCE``).
    """
    if not manifest_path().exists():
        return [f"{manifest_path()} does not exist. Fix: {REGENERATE}"]
    manifest = json.loads(manifest_path().read_text())
    problems, tests = [], {}
    with tempfile.TemporaryDirectory() as work:
        for name in names:
            entry = manifest["runs"].get(name)
            if entry is None:
                problems.append(f"{name}: not in {manifest_path()}. Fix: {REGENERATE}")
                continue
            file = manifest_path().parent / entry["file"]
            if hashlib.sha256(file.read_bytes()).hexdigest() != entry["sha256"]:
                problems.append(f"{name}: {file} does not match the hash in the manifest. Fix: {REGENERATE}")
                continue
            cfg = run_config(name, f"{work}/restored/{name}")
            if not restore(cfg):
                problems.append(
                    f"{name}: its config differs from the current {PRESET!r} preset, so the notebooks "
                    f"would train instead of restoring it. Fix: {REGENERATE}"
                )
                continue
            split = tuple(getattr(cfg, k) for k in (*DATA_KEYS, "n_train", "n_val", "seed"))
            test = tests[split] = tests.get(split) or test_split(cfg)
            problems += _compare(f"{name} (shipped weights)", measure(cfg.run_dir(), cfg, test), entry["float16"])
            if name in retrain:
                trainer = train_run(name, f"{work}/trained/{name}", progress)
                problems += _compare(
                    f"{name} (trained again)", measure(trainer.run_dir, trainer.cfg, test), entry["float32"]
                )
    return problems


def _compare(what: str, measured: dict, recorded: dict) -> list[str]:
    return [
        f"{what}: {key} {measured[key]:.4f}, recorded {recorded[key]:.4f} (tolerance {TOLERANCE})"
        for key in ("test_clean", "test_pgd")
        if abs(measured[key] - recorded[key]) > TOLERANCE
    ]
