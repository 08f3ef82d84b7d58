"""Checkpoints and run folders: loading with ``weights_only=True`` and clear errors, atomic saves, the per-epoch
log, the run record, and which settings a saved run differs in.
"""

from __future__ import annotations

import csv
import dataclasses
import errno
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import torch
import yaml
from torch import nn

from . import distributed
from .config import ADDED_FIELDS, TrainConfig, ignored_settings, upgrade_record
from .data.preprocess import resolve_spec
from .models import create_model
from .runinfo import environment_info

CHECKPOINTS = ("last.pt", "best_clean.pt", "best_robust.pt")


# What each use of a checkpoint reads from it.
MODEL_KEYS = ("model", "config")
RESUME_KEYS = ("model", "config", "optimizer", "scheduler", "rng_cpu", "epoch", "history", "best")
# A finished run restored from a shipped one (``bookruns``) has no optimizer state: it can be loaded, not continued.
RESTORED_KEYS = ("model", "config", "epoch", "history", "best")


class CheckpointError(ValueError):
    """A file that cannot be used as a robustmed_lite checkpoint; the message names it and the cause."""


def config_differences(saved: dict, cfg: TrainConfig) -> list[str]:
    """The settings in which a saved run's config differs from ``cfg``, ignoring how and where a run is looked at
    (progress bars, device, output folder).

    A setting that ``cfg`` has and the saved config lacks (a run saved before the field existed) is a difference
    unless ``config.ADDED_FIELDS`` says that its current value trains as the older code did, or has no effect.
    """
    mine, saved = cfg.to_dict(), upgrade_record(saved)
    # Also the settings that cfg's method, loss and switches never read (config.ignored_settings): a saved run with
    # the same method trained alike whatever they held (e.g. gamma of an ERM run, recorded before it was None).
    ignored = ("progress", "device", "out_dir", *ignored_settings(cfg))

    def same(key, a, b):  # paths compare as the files they name, however they were written
        if key in PATH_KEYS and isinstance(a, str) and isinstance(b, str) and a != "phantom":
            return resolve_spec(a) == resolve_spec(b)
        return a == b

    def as_before(key):
        if key not in ADDED_FIELDS:
            return False
        former, no_effect = ADDED_FIELDS[key]
        return mine[key] == former or no_effect(cfg)

    changed = {k for k, v in saved.items() if k not in ignored and not same(k, mine.get(k), v)}
    changed |= {k for k in mine if k not in saved and k not in ignored and not as_before(k)}
    return sorted(changed)


PATH_KEYS = ("data", "ood_data", "extra_data", "init_from")


def _run_record(cfg: TrainConfig) -> dict:
    # The world size is recorded here, not in the config: a run may resume on another number of ranks.
    return {
        "seed": cfg.seed,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "world_size": distributed.world_size(),
        "environment": environment_info(),
    }


class DiskFullError(OSError):
    """A checkpoint or log could not be written for lack of space; the previous file is kept."""

    def __init__(self, message: str):
        super().__init__(message)
        self.errno = errno.ENOSPC


class RunLockedError(FileExistsError):
    """Another live process is writing the run folder."""


LOCK_NAME = "run.lock"


def _atomic_save(obj, path: Path) -> None:
    """Saves through a temporary file, so that a failed write (a full disk, a kill) leaves the previous file."""
    tmp = path.with_suffix(".tmp")
    try:
        torch.save(obj, tmp)
    except (OSError, RuntimeError) as err:  # torch reports a full disk as "RuntimeError ... unexpected pos"
        tmp.unlink(missing_ok=True)
        free = shutil.disk_usage(path.parent).free
        if isinstance(err, OSError) and err.errno != errno.ENOSPC and free > 64 * 2**20:
            raise
        kept = f"the previous {path.name} is kept" if path.exists() else f"no {path.name} was written"
        raise DiskFullError(
            f"no space left on the device of {path.parent} ({free / 2**20:.0f} MB free) writing {path.name}: "
            f"{kept}. Fix: free space (or choose another --out_dir), then continue with --resume",
        ) from err
    tmp.replace(path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def lock_holder(run_dir: Path) -> dict | None:
    """The live process holding the run folder's lock (other than this one), or None; a stale lock (its process
    is gone: a crash or a kill) counts as none."""
    try:
        holder = json.loads((run_dir / LOCK_NAME).read_text())
    except (OSError, ValueError):
        return None
    same_host = holder.get("host") == socket.gethostname()
    if holder.get("pid") == os.getpid() and same_host:
        return None
    if same_host and not _pid_alive(int(holder.get("pid", -1))):
        return None
    return holder


def check_unlocked(run_dir: Path) -> None:
    """Refuses a run folder that another live process is writing.

    Raises:
        RunLockedError: The lock names a live process (on another host: any lock, as its liveness is unknown).
    """
    holder = lock_holder(run_dir)
    if holder is not None:
        raise RunLockedError(
            f"{run_dir} is being written by process {holder.get('pid')} on {holder.get('host')} (since "
            f"{holder.get('since')}). Fix: wait for it to finish or stop it, or choose another --out_dir; if that "
            f"process is gone, delete {run_dir / LOCK_NAME}"
        )


def acquire_lock(run_dir: Path) -> None:
    """Takes the run folder's lock for this process (replacing a stale one)."""
    check_unlocked(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    tmp = run_dir / f"{LOCK_NAME}.{os.getpid()}"
    tmp.write_text(json.dumps(record))
    tmp.replace(run_dir / LOCK_NAME)
    check_unlocked(run_dir)  # two starting at once: the later replace wins, the other one stops here


def release_lock(run_dir: Path) -> None:
    """Removes the run folder's lock if this process holds it."""
    path = run_dir / LOCK_NAME
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)


def check_writable(run_dir: Path, needed_bytes: int) -> None:
    """Refuses an output folder that cannot be written, or whose device lacks ``needed_bytes``, before any work.

    Raises:
        FileExistsError: The path is a file.
        PermissionError: The folder (or the nearest existing folder above it) cannot be written.
        DiskFullError: Not enough free space.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise FileExistsError(f"--out_dir {run_dir} is a file. Fix: choose another --out_dir")
    existing = next(p for p in (run_dir, *run_dir.parents) if p.exists())
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise PermissionError(
            f"cannot write in {existing} ({err.strerror or err}), so the run folder {run_dir} cannot be made. "
            "Fix: choose an --out_dir on a writable disk"
        ) from None
    free = shutil.disk_usage(existing).free
    if free < needed_bytes:
        raise DiskFullError(
            f"{existing} has {free / 2**20:.0f} MB free; this run's checkpoints need about "
            f"{needed_bytes / 2**20:.0f} MB. Fix: free space or choose another --out_dir",
        )


def checkpoint_bytes(model: nn.Module) -> int:
    """Room a run's checkpoint files take: last.pt (weights and two optimizer moments) and two best_*.pt, plus
    one temporary copy while writing, with a margin."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return int(1.25 * weights * (3 + 2 + 3))


def repair_log(run_dir: Path, history: list[dict]) -> None:
    """Rewrites the per-epoch log from a resumed checkpoint's history when they disagree (a run killed between
    writing ``last.pt`` and appending to the log): the checkpoint is the truth."""
    log = run_dir / "log.jsonl"
    logged = [line for line in log.read_text().splitlines() if line.strip()] if log.exists() else []
    if len(logged) == len(history):
        return
    for name in ("log.jsonl", "log.csv"):
        (run_dir / name).unlink(missing_ok=True)
    for row in history:
        _append_log(run_dir, row)


def completed_epochs(run_dir: str | Path) -> int:
    """The epochs a run has finished, read from its ``last.pt`` (0 without one)."""
    path = Path(run_dir) / "last.pt"
    return int(load_checkpoint(path, required=("epoch",))["epoch"]) if path.exists() else 0


def _append_log(run_dir: Path, row: dict) -> None:
    with open(run_dir / "log.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    path = run_dir / "log.csv"
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def load_checkpoint(path: str | Path, map_location="cpu", required: tuple[str, ...] = MODEL_KEYS) -> dict:
    """Loads a checkpoint with ``weights_only=True`` (no arbitrary code from pickles).

    Args:
        path: A file written by the trainer.
        map_location: Where tensors go.
        required: Keys the caller reads (``MODEL_KEYS``; ``RESUME_KEYS`` to resume; ``("model",)`` for weights).

    Raises:
        FileNotFoundError: No such file.
        CheckpointError: A folder, an empty file, a file torch cannot read (text, random bytes, a truncated
            download, a pickle with code in it), or one without the required keys: "X is not a robustmed_lite
            checkpoint (<why>): <cause>".
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist. Fix: pass a .pt file a training run wrote "
            "(runs/<name>/best_clean.pt, best_robust.pt or last.pt)"
        )

    def refuse(why: str, cause: str, fix: str = "pass a .pt file a training run wrote") -> CheckpointError:
        return CheckpointError(f"{path} is not a robustmed_lite checkpoint ({why}): {cause}. Fix: {fix}")

    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.pt"))
        raise refuse(
            "a folder",
            f"it holds {found or 'no .pt files'}",
            f"pass a file inside it, e.g. {path / (found[0] if found else 'best_robust.pt')}",
        )
    if path.stat().st_size == 0:
        raise refuse("empty", "the file has 0 bytes (an interrupted copy or save?)", "copy or train it again")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001
        # torch.load reports a foreign file with whatever its parsers trip over (EOFError, IndexError,
        # UnpicklingError, zipfile errors, RuntimeError), so every failure here means "not a torch file".
        raise refuse("not a torch file", f"{type(err).__name__}: {_first_line(err)}") from err
    if not isinstance(state, dict):
        raise refuse("not a dict of model and config", f"it holds a {type(state).__name__}")
    missing = [k for k in required if k not in state]
    if missing:
        raise refuse(
            f"missing keys {', '.join(missing)}",
            f"it has keys {sorted(map(str, state))[:10]}",
            "pass a checkpoint the trainer wrote (last.pt to resume: best_*.pt hold no optimizer state)",
        )
    return state


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "(no message)"


def load_weights(model: nn.Module, state: dict, path) -> None:
    """``model.load_state_dict`` with an error that names the checkpoint and the model."""
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, TypeError, AttributeError) as err:
        config = state.get("config") if isinstance(state.get("config"), dict) else {}
        trained = f" (it was trained as {config.get('model')!r} at {config.get('img_size')} px)" if config else ""
        raise CheckpointError(
            f"the weights in {path} do not fit this model{trained}: {_first_line(err)}. Fix: "
            "use the same --model and --img_size as the checkpoint"
        ) from err


def model_from_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, TrainConfig]:
    """The model of a checkpoint, in eval mode, and the config it was trained with.

    Raises:
        FileNotFoundError, CheckpointError: See ``load_checkpoint``; also a config with unknown keys or weights
            that do not fit the model it names.
    """
    state = load_checkpoint(path)
    if not isinstance(state["config"], dict):
        raise CheckpointError(
            f"{path} is not a robustmed_lite checkpoint (its config is a "
            f"{type(state['config']).__name__}, not a dict). Fix: pass a .pt file a training run "
            "wrote"
        )
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    values = upgrade_record({k: v for k, v in state["config"].items() if k != "eps_text"})
    unknown = sorted(set(values) - known)
    if unknown:
        raise CheckpointError(
            f"{path} has config keys this version does not know ({', '.join(unknown)}): it was "
            "written by another version of robustmed_lite. Fix: load it with that version"
        )
    cfg = TrainConfig(**values)
    model = create_model(cfg.model, num_classes=2, img_size=cfg.img_size)
    load_weights(model, state, path)
    return model.to(device).eval(), cfg


def selected_checkpoint_name(method: str) -> str:
    """The checkpoint a comparison uses, chosen on validation: best clean accuracy for ERM, best PGD accuracy
    for the robust methods."""
    return "best_clean.pt" if method == "erm" else "best_robust.pt"


def check_run_dir(run_dir: Path, cfg, resume: bool) -> dict | None:
    """Refuses to overwrite a run, or to resume one that is missing or has other settings (before any data
    is built); returns the last checkpoint when resuming."""
    if run_dir.exists() and not run_dir.is_dir():
        raise FileExistsError(f"--out_dir {run_dir} is a file. Fix: choose another --out_dir")
    check_unlocked(run_dir)
    existing = [c for c in CHECKPOINTS if (run_dir / c).exists()]
    if resume and "last.pt" not in existing:
        raise FileNotFoundError(
            f"cannot resume: {run_dir / 'last.pt'} does not exist. Fix: drop --resume "
            "to start the run, or pass the --out_dir of the run to continue"
        )
    if existing and not resume:
        raise FileExistsError(
            f"{run_dir} already holds {existing}: pass --resume to continue that run, or choose another --out_dir"
        )
    if not resume:
        return None
    state = load_checkpoint(run_dir / "last.pt", required=RESTORED_KEYS)
    changed = config_differences(state["config"], cfg)
    if changed:
        raise ValueError(
            f"{run_dir} holds a run with other settings ({', '.join(changed)}): resuming would "
            "mix two configs; choose another --out_dir"
        )
    if not state.get("restored"):
        load_checkpoint(run_dir / "last.pt", required=RESUME_KEYS)  # says which keys are missing
    elif state["epoch"] < cfg.epochs:
        raise CheckpointError(
            f"{run_dir / 'last.pt'} is a restored run without optimizer state, stopped "
            f"at epoch {state['epoch']} of {cfg.epochs}: it cannot be continued. Fix: "
            "train the run from scratch in another --out_dir"
        )
    return state


def write_run_record(run_dir: Path, cfg, data: dict | None = None) -> None:
    """A new run's folder with its config, its record (seed, time, world size, library versions) and what it
    recorded of its data (``data.json``: split sizes, the duplicate check); a resumed run keeps its own
    (``note_resumed`` adds each resumption)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    (run_dir / "env.json").write_text(json.dumps(_run_record(cfg), indent=2))
    if data is not None:
        (run_dir / "data.json").write_text(json.dumps(data, indent=2))


def note_resumed(run_dir: Path, cfg, from_epoch: int, history: list[dict]) -> None:
    """Records a resumption and repairs the per-epoch log from the checkpoint's history."""
    with open(run_dir / "resumed.jsonl", "a") as f:
        f.write(json.dumps({"from_epoch": from_epoch, **_run_record(cfg)}) + "\n")
    repair_log(run_dir, history)


def save_epoch(run_dir: Path, row: dict, state: dict, improved: list[str], training_state: dict) -> None:
    """Writes one epoch's files atomically: ``best_<key>.pt`` for each improved key, ``last.pt`` (the state plus
    ``training_state``: optimizer, scheduler, RNG and weight-noise states) and the log row."""
    for key in improved:
        _atomic_save(state, run_dir / f"best_{key}.pt")
    _atomic_save({**state, **training_state}, run_dir / "last.pt")
    _append_log(run_dir, row)
