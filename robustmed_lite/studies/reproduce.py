"""The paper's comparison on real CT in one command: every method x seed trained and evaluated the same way,
summarised with t-intervals over seeds, paired gains over the best prior method, and verdicts on the claims.

    python -m robustmed_lite reproduce --profile cpu --data ../shared/data/sarscov2 \\
        --ood_data ../shared/data/ucsd_covidct

Stages, each resumable (a second call after a kill redoes nothing that finished):

1. **plan** (``runplan.py``): every (method, seed) run under ``--runs``, CAP's two stages (a clean ERM model first,
   every robust run of the same seed starting from its validation-chosen checkpoint), optional shards;
2. **train** (here): a finished run is reused, an interrupted one resumes from its ``last.pt``, a run folder with
   other settings is refused; ``--jobs`` runs at once, one progress bar over all of them;
3. **score** (``runeval.py``) each run's validation-chosen checkpoint: the whole test split, PGD-10 and the attack
   ensemble (``ensemble.py``) at the training eps and at 8/255, every other-site domain, the corruptions (made once
   and shared by all runs);
4. **summarise** (``summary.py``) in ``--out``: ``runs.csv``, ``table.csv`` (mean and 95% t-interval per row and
   metric), ``gains.csv``, ``verdicts.csv``, ``table.md``, two figures, ``ensemble_check.csv`` and the provenance
   (``environment.json``, ``profile.json``, ``commands.txt``).

Checkpoints are chosen on the validation split, never on test. Where cost forces a subset (the ensemble in the
``cpu`` profile) it is a seeded, stratified sample, and its size is in the tables.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
import sys
import threading
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path

import pandas as pd
import torch
import yaml
from tqdm.auto import tqdm

from ..checkpoints import completed_epochs, config_differences, lock_holder
from ..common import format_eps
from ..data.loaders import DataError, check_link, find_shared_data, load_images
from ..data.preprocess import resolve_spec, split_spec
from ..data.slicestore import SliceStore, is_slice_store
from ..runinfo import environment_info, flush_denormal, progress_options
from ..trainer import Trainer
from .plan import (
    DEFAULT_SEEDS,
    PROFILES,
    Profile,
    RunSpec,
    build_plan,
    parse_methods,
    parse_seeds,
    parse_shard,
    shard_of,
)
from .run_evaluation import (
    EIGHT,
    EvalSettings,
    corruption_stage,
    ensemble_check,
    evaluate_run,
    logged_epochs,
    read_json,
    write_json,
)
from .summary import THE_METHOD, collect_rows, write_summary
from .writeup import portable_paths, relative_paths_in, write_writeup


def check_existing(spec: RunSpec) -> None:
    """A run directory that already holds a run of other settings is an error, not something to reuse."""
    saved = spec.run_dir / "config.yaml"
    if saved.exists():
        changed = config_differences(yaml.safe_load(saved.read_text()), spec.config())
        if changed:
            raise ValueError(
                f"{spec.run_dir} holds a run with other settings ({', '.join(changed)}): it is not "
                "reused. Fix: pass another --runs folder, or delete that run to retrain it"
            )


TRAINED = "trained.json"  # written when a run has finished training: what other shards wait for


def train_run(spec: RunSpec, wait_poll: float = 5.0, wait_timeout: float = 48 * 3600) -> None:
    """Trains a run, or resumes it, or does nothing if it finished (``trained.json``); waits for its clean run if
    another process (a shard) trains it.

    A run killed during its first epoch may leave ``best_*.pt`` without ``last.pt``: no epoch finished, so those
    files are removed (with a warning) and the run starts afresh.
    """
    cfg = spec.config()
    check_existing(spec)
    marker = spec.run_dir / TRAINED
    _wait_for(marker, lambda: lock_holder(spec.run_dir) is not None, wait_poll, wait_timeout, spec.run_dir)
    if marker.exists():
        return
    if spec.init_from is not None:  # another shard trains the clean model of this seed
        _wait_for(spec.init_from.parent / TRAINED, lambda: True, wait_poll, wait_timeout, spec.init_from.parent)
    if not (spec.run_dir / "last.pt").exists():
        orphans = [p for p in (spec.run_dir / "best_clean.pt", spec.run_dir / "best_robust.pt") if p.exists()]
        if orphans:
            warnings.warn(
                f"{spec.run_dir}: {', '.join(p.name for p in orphans)} without last.pt (killed in its first "
                "epoch): removed, the run starts afresh",
                stacklevel=2,
            )
            for path in orphans:
                path.unlink()
    trainer = Trainer(cfg, resume=(spec.run_dir / "last.pt").exists())
    trainer.fit()
    write_json(marker, {"epochs": completed_epochs(spec.run_dir), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def _wait_for(marker: Path, waiting, poll: float, timeout: float, run_dir: Path) -> None:
    """Waits while ``marker`` is missing and ``waiting()`` holds: another process (a shard, or another study
    sharing the run folder) trains that run."""
    waited = 0.0
    while not marker.exists() and waiting():
        if waited > timeout:
            raise TimeoutError(
                f"{run_dir} did not finish training within {timeout / 3600:g} h: start the shard or study that "
                "trains it, or remove its run.lock if no process holds it"
            )
        time.sleep(poll)
        waited += poll


def _task(spec: RunSpec, settings: EvalSettings | None, threads: int | None) -> str:
    """Train (or reuse) and evaluate one run (train only where ``settings`` is None); the unit of work of a
    worker process."""
    if threads:
        torch.set_num_threads(threads)
    train_run(spec)
    if settings is None:
        return spec.name
    eval_file = settings.eval_file(spec.run_dir)
    record = read_json(eval_file)
    if record is None or record.get("settings") != settings.to_dict():
        with flush_denormal():
            row = evaluate_run(spec, settings)
        write_json(eval_file, {"settings": settings.to_dict(), "row": row})
    return spec.name


def _git_state() -> tuple[str | None, bool | None]:
    """The checkout's commit, and whether the package's own files differ from it (None outside a checkout)."""
    here = Path(__file__).parent
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=here
            ).stdout.strip()
            or None
        )
        status = subprocess.run(
            ["git", "status", "--porcelain", "--", "."], capture_output=True, text=True, timeout=5, cwd=here
        )
        return commit, (bool(status.stdout.strip()) if commit and status.returncode == 0 else None)
    except (OSError, subprocess.SubprocessError):
        return None, None


def default_data() -> tuple[str, list[str]]:
    """The Soares folder and the UCSD folder beside it, from ``ROBUSTMED_DATA`` or ``../shared/data``."""
    root = find_shared_data()
    if root is None or not (root / "sarscov2").is_dir():
        raise DataError(
            "no --data given and no real CT found (ROBUSTMED_DATA or ../shared/data/sarscov2). Fix: "
            "pass --data with the SARS-CoV-2 folder (COVID/, non-COVID/; download it with "
            "robustmed_lite.data.loaders.download_sarscov2) and --ood_data with other sites"
        )
    ood = [str(root / "ucsd_covidct")] if (root / "ucsd_covidct").is_dir() else []
    return str(root / "sarscov2"), ood


def check_paths(data: str, ood_data, covid19c: str | None) -> None:
    """Clear errors for folders that do not exist, before anything is planned or trained."""
    if data != "phantom":
        check_link(Path(data), "the folder of training slices", "--data")
    if data != "phantom" and not Path(data).exists():
        raise FileNotFoundError(
            f"--data {data} does not exist. Fix: pass the folder holding the training slices "
            "(e.g. the Kaggle COVID/ and non-COVID/ folders)"
        )
    for spec in ood_data:
        if not Path(split_spec(spec)[0]).exists():
            raise FileNotFoundError(
                f"--ood_data {spec} does not exist. Fix: pass existing folders of other sites "
                "(e.g. UCSD COVID-CT; folder:test for one split of it), or leave --ood_data out"
            )
    if covid19c and not Path(covid19c).is_dir():
        raise FileNotFoundError(f"--covid19c {covid19c} is not a folder. Fix: pass the COVID19-C root or leave it out")


def check_classes(data: str, img_size: int) -> None:
    """Training data must hold both classes (misnamed folders would otherwise train a one-class model)."""
    if data == "phantom":
        return
    if is_slice_store(data):  # a store records its labels: no pixel needs reading
        labels = SliceStore(data).labels
    else:
        labels = load_images(data, img_size, progress=False).labels
    present = sorted(set(labels.tolist()))
    if present != [0, 1]:
        names = {0: "non-COVID", 1: "COVID"}
        raise DataError(
            f"--data {data} holds only {', '.join(names[p] for p in present)} images ({len(labels)}): "
            "a reproduction trains COVID vs non-COVID and needs both classes. Fix: check the class "
            "folder names (COVID/, non-COVID/ or the aliases in the README)"
        )


class ProgressPoller:
    """One bar over all runs, fed by a thread that reads the run directories (epochs logged, evaluations
    written). Epochs are weighted by their cost in forward-backward passes (an ERM epoch 1, a robust epoch with
    k attack steps k + 3) and an evaluation by a few robust epochs, so that the ETA means something."""

    EVAL_WEIGHT = 6

    def __init__(self, specs: list[RunSpec], settings: EvalSettings | None, enabled: bool, desc="reproduction"):
        self.items, self.settings = [], settings
        for spec in specs:
            cfg = spec.config()
            self.items.append((spec, cfg.epochs, 1 if cfg.attack == "none" else cfg.attack_steps + 3))
        total = sum(e * w + self.EVAL_WEIGHT for _, e, w in self.items)
        self.bar = tqdm(
            total=total,
            initial=self._done()[0],
            desc=desc,
            unit="work",
            bar_format="{l_bar}{bar}| {percentage:3.0f}% [{elapsed}<{remaining}] {postfix}",
            **progress_options(enabled),
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _done(self) -> tuple[int, int, int]:
        work = epochs = runs = 0
        for spec, n_epochs, weight in self.items:
            e = min(logged_epochs(spec.run_dir), n_epochs)
            finished = self.settings.eval_file(spec.run_dir) if self.settings else spec.run_dir / TRAINED
            evaluated = finished.exists()
            work += e * weight + self.EVAL_WEIGHT * evaluated
            epochs, runs = epochs + e, runs + evaluated
        return work, epochs, runs

    def refresh(self) -> None:
        work, epochs, runs = self._done()
        self.bar.set_postfix_str(
            f"runs {runs}/{len(self.items)}, epochs {epochs}/{sum(e for _, e, _ in self.items)}", refresh=False
        )
        self.bar.update(max(0, work - self.bar.n))

    def _loop(self) -> None:
        while not self._stop.wait(2.0):
            self.refresh()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.refresh()
        self.bar.close()


def execute(specs: list[RunSpec], settings: EvalSettings, jobs: int) -> list[tuple[str, BaseException]]:
    """Runs the tasks, ``jobs`` at a time; a robust run starts once its clean run finished (within a shard).
    Returns the failures (name, error); runs already started finish, no new run starts after a failure."""
    failures = []
    if jobs <= 1:
        for spec in specs:
            try:
                _task(spec, settings, None)
            except Exception as err:  # noqa: BLE001 - reported with the run's name, then re-raised by the caller
                failures.append((f"{spec.name}-seed{spec.seed}", err))
                break
        return failures
    threads = max(1, torch.get_num_threads() // jobs)
    pending, running = list(specs), {}
    own = {s.run_dir / "best_clean.pt": s for s in specs if s.init_from is None}
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
        while pending or running:
            ready = [
                s
                for s in pending
                if s.init_from is None
                or s.init_from not in own
                or own[s.init_from] not in pending
                and own[s.init_from] not in running.values()
            ]
            while ready and len(running) < jobs and not failures:
                spec = ready.pop(0)
                pending.remove(spec)
                running[pool.submit(_task, spec, settings, threads)] = spec
            if not running:
                break
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in done:
                spec = running.pop(future)
                try:
                    future.result()
                except Exception as err:  # noqa: BLE001
                    failures.append((f"{spec.name}-seed{spec.seed}", err))
            if failures:
                pending.clear()
    return failures


def reproduce(
    profile: str | Profile = "cpu",
    data: str | None = None,
    ood_data=None,
    covid19c: str | None = None,
    methods=None,
    seeds=DEFAULT_SEEDS,
    out: str | Path | None = None,
    runs: str | Path | None = None,
    shard: str | None = None,
    jobs: int | None = None,
    overrides: dict | None = None,
    variants: dict[str, dict] | None = None,
    ensemble_n: int | None | str = "profile",
    adapt_methods=(),
    corruption_n: int | None | str = "profile",
    progress: bool = True,
    command: list[str] | None = None,
    writeup: bool = True,
) -> dict[str, pd.DataFrame]:
    """Trains, evaluates and summarises a reproduction (see the module docstring).

    With ``jobs > 1`` the runs train in spawned processes: a script that calls this needs the usual
    ``if __name__ == "__main__":`` guard (the command line has it).

    Args:
        profile: ``cpu``, ``gpu``, ``paper`` or a ``Profile``.
        data: Training set root (default: ``default_data()``), or ``"phantom"`` (for tests and demos).
        ood_data: Other-site roots, each its own domain (default with ``data=None``: UCSD beside the Soares set).
        covid19c: A COVID19-C root, its subsets added as domains.
        methods: Names (default all nine of ``config.METHODS``).
        seeds: Training seeds, e.g. ``(0, 1, 2)`` or ``"0,1,2"``.
        out: Results folder (default ``results/reproduction/<profile>``).
        runs: Run directories (default ``runs/reproduction/<profile>``).
        shard: ``"i/n"``: train only this shard's runs; the summary merges whatever has finished.
        jobs: Runs at once (default: the profile's).
        overrides: TrainConfig overrides for every run (e.g. ``{"epochs": 2}``).
        variants: Extra rows, name -> overrides with a ``method`` (see ``parse_variant``).
        ensemble_n: Images attacked by the ensemble (None: all; 0: none; default: the profile's).
        adapt_methods: Test-time adaptations (``adabn``, ``tent``) also evaluated on every other-site domain.
        corruption_n: Test images scored under the corruptions (None: all; default: the profile's).
        progress: Progress bars.
        command: The command line to record (default ``sys.argv``).
        writeup: Write ``out/README.md`` from the result files (``writeup.py``); the studies built on this one
            write their own page instead. Paths in the result files are made relative either way.

    Returns:
        ``{"runs", "table", "gains", "verdicts"}`` DataFrames (the same as the CSVs written).
    """
    if isinstance(profile, str) and profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}: choose one of {', '.join(PROFILES)}")
    prof = PROFILES[profile] if isinstance(profile, str) else profile
    methods = parse_methods(methods)
    seeds = parse_seeds(seeds)
    shard_i_n = parse_shard(shard)
    if data is None:
        data, found_ood = default_data()
        ood_data = found_ood if ood_data is None else ood_data
    # Absolute paths: a run's config records them, and the same data named two ways must stay one run.
    ood_data = [resolve_spec(p) for p in (ood_data or [])]
    data = data if data == "phantom" else resolve_spec(data)
    out = Path(out or f"results/reproduction/{prof.name}")
    runs_root = Path(runs or f"runs/reproduction/{prof.name}").resolve()
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    check_paths(data, ood_data, covid19c)
    plan = build_plan(prof, data, methods, seeds, runs_root, overrides, variants)
    base_cfg = plan[0].config()
    for spec in plan:
        check_existing(spec)
    check_classes(data, base_cfg.img_size)
    n_ens = prof.ensemble_n if ensemble_n == "profile" else ensemble_n
    n_corr = prof.corruption_n if corruption_n == "profile" else corruption_n
    unknown = [m for m in adapt_methods if m not in ("adabn", "tent")]
    if unknown:
        raise ValueError(f"unknown test-time adaptation {unknown}: choose adabn or tent")
    settings = EvalSettings(
        tuple(sorted({base_cfg.eps, EIGHT})),
        n_ens,
        prof.apgd_steps,
        prof.fab_steps,
        prof.square_queries,
        tuple(ood_data),
        covid19c,
        tuple(adapt_methods),
        n_corr,
    )
    mine = shard_of(plan, shard_i_n)
    jobs = prof.jobs if jobs is None else int(jobs)
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    if not torch.cuda.is_available():
        jobs = min(jobs, os.cpu_count() or 1)  # on a CPU a process per core at most
    out.mkdir(parents=True, exist_ok=True)
    record_provenance(out, prof, plan, settings, command, shard_i_n, jobs)

    clock = {"start": time.time()}
    with ProgressPoller(mine, settings, progress):
        failures = execute(mine, settings, jobs)
    clock["trained"] = time.time()
    finished = [s for s in mine if settings.eval_file(s.run_dir).exists()]
    corruption_stage(finished, settings, progress=progress)
    clock["corrupted"] = time.time()
    try:
        results = _finish(plan, settings, out, prof, ood_data, covid19c)
    except Exception as summary_error:
        if failures:  # say first that a run failed: that is what stopped the other runs
            name, err = failures[0]
            raise RuntimeError(
                f"run {name} failed ({type(err).__name__}: {err}); then the summary of the runs "
                "that finished failed too (its error is below)"
            ) from summary_error
        raise
    record_timing(out, clock, shard_i_n, jobs, len(mine), len(finished))
    if writeup and len(results["runs"]):
        write_writeup(out, "reproduction", machine_folder=out.resolve())
    else:
        portable_paths(out, out.resolve(), "reproduction")
    if failures:
        name, err = failures[0]
        raise RuntimeError(
            f"run {name} failed ({type(err).__name__}: {err}); the summary holds the "
            f"{len(results['runs'])} runs that finished. Fix the cause and call again: finished "
            "runs are reused"
        ) from err
    return results


def record_timing(out: Path, clock: dict, shard, jobs: int, n_runs: int, n_finished: int) -> None:
    """Appends this call's wall times per stage to ``timings.json`` (the wall time each study's README.md quotes)."""
    now = time.time()
    record = {
        "recorded": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "shard": f"{shard[0]}/{shard[1]}",
        "jobs": jobs,
        "runs": n_runs,
        "runs_evaluated": n_finished,
        "cpu_count": os.cpu_count(),
        "train_and_evaluate_minutes": (clock["trained"] - clock["start"]) / 60,
        "corruptions_minutes": (clock["corrupted"] - clock["trained"]) / 60,
        "ensemble_check_and_summary_minutes": (now - clock["corrupted"]) / 60,
        "total_minutes": (now - clock["start"]) / 60,
    }
    previous = read_json(out / "timings.json") or []
    write_json(out / "timings.json", [*previous, record])


def record_provenance(
    out: Path, prof: Profile, plan: list[RunSpec], settings: EvalSettings, command, shard, jobs: int
) -> None:
    command = command if command is not None else [Path(sys.executable).name, "-m", "robustmed_lite", *sys.argv[1:]]
    with open(out / "commands.txt", "a") as f:
        f.write(
            f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}  shard {shard[0]}/{shard[1]}  jobs {jobs}  "
            f"{shlex.join(str(c) for c in command)}\n"
        )
    commit, dirty = _git_state()
    env = {
        "environment": environment_info(),
        "git_commit": commit,
        "package_changed_since_commit": dirty,
        "cpu_count": os.cpu_count(),
        "recorded": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json(out / "environment.json", env)
    base = plan[0].config().to_dict()
    write_json(
        out / "profile.json",
        {
            "profile": dataclasses.asdict(prof),
            "evaluation": settings.to_dict() if settings else None,
            "base_config": base,
            "runs": [
                {
                    "name": s.name,
                    "seed": s.seed,
                    "run_dir": str(s.run_dir),
                    "init_from": str(s.init_from) if s.init_from else None,
                }
                for s in plan
            ],
        },
    )


def _finish(plan, settings, out: Path, prof: Profile, ood_data, covid19c) -> dict[str, pd.DataFrame]:
    runs = collect_rows(plan, settings)
    if runs.empty:
        return {"runs": runs, "table": pd.DataFrame(), "gains": pd.DataFrame(), "verdicts": pd.DataFrame()}
    check = out / "ensemble_check.csv"
    done = [s for s in plan if settings.eval_file(s.run_dir).exists()]
    chosen = next((s for s in done if s.name == THE_METHOD), next((s for s in done if s.method != "erm"), None))
    if chosen is not None and settings.ensemble_n != 0:
        previous = pd.read_csv(check) if check.exists() else None
        # as the folder keeps it: machine paths relative to the folder (writeup.portable_paths)
        wanted = relative_paths_in(json.dumps(settings.to_dict()), out.resolve())
        if previous is None or previous["settings"].iloc[0] != wanted:
            ensemble_check(chosen, settings).assign(settings=wanted).to_csv(check, index=False)
    cfg = plan[0].config()
    header = {
        "profile": prof.name,
        "data": cfg.data,
        "other sites": ", ".join(ood_data) or "none",
        "COVID19-C": covid19c or "none",
        "model": f"{cfg.model}, {cfg.img_size} px, {cfg.epochs} epochs",
        "training eps": format_eps(cfg.eps)
        + ("" if abs(cfg.eps * 255 - round(cfg.eps * 255)) < 1e-4 else f" (= {cfg.eps:g})"),
        "two stages (robust runs start from the clean run)": prof.two_stage,
        "runs summarised": f"{len(runs)} of {len(plan)}",
        "seeds": ", ".join(str(s) for s in sorted(runs["seed"].unique())),
        "test images": int(runs["test_n"].iloc[0]),
        "ensemble": (
            f"{runs['ensemble'].iloc[0]}, on {int(runs['ensemble_n'].iloc[0])} test images (seeded, stratified)"
        )
        if settings.ensemble_n != 0
        else "not run",
        "corruptions": "every test image"
        if settings.corruption_n is None
        else f"{settings.corruption_n} test images (seeded, stratified)",
        "test-time adaptation": ", ".join(settings.adapt) or "none",
        "checkpoints": "chosen on validation (ERM: best clean, others: best PGD)",
    }
    summary = write_summary(runs, out, header)
    return {"runs": runs, **summary}
