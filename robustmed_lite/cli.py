"""Command line: ``python -m robustmed_lite COMMAND [options]``; ``python -m robustmed_lite COMMAND --help`` lists
a command's options.

Commands:
    demo          ERM vs the method on the phantom: trains both (CPU, minutes), prints a comparison table
    train         train one method: a preset or YAML file (--config) plus any TrainConfig field as --KEY VALUE
    evaluate      clean, attack and worst-case accuracy with clinical metrics of checkpoints (--attacks none:
                  clean metrics alone); --ood: the corruption and cross-site suite
    reproduce     the paper's comparison on real CT: every method x seed, intervals, verdicts (resumable)
    sweep         the weight-noise scale of robustmed and awp chosen on validation (published value and two others)
    sites         the cross-site study: Soares -> UCSD with and without each component against the shift
    fidelity      CAP's code against the former defaults, the abstract's readings, AWP against TRADES (paired)
    ablation      robustmed with one part switched off at a time: prior, feedback, weight noise, loss (paired)
    attention     where the reproduction's trained models look on real CT: lung-attention ratios, paired over seeds
    diagnose      is the model looking at the disease? per-site predictions, calibration, saliency outside the lungs
    report        one model's robustness and generalisation report (HTML + Model Card JSON) to file or print
    results writeup  write a study folder's README.md again from its result files, without training
    doctor        is this machine ready for the notebooks? a short pass/fail report to paste
    bookruns      the fast-profile runs shipped for the notebooks: regenerate them, or check them against their record
    data fetch    download a real CT set (sarscov2, ucsd), check its counts, say how to point ROBUSTMED_DATA at it
    data store    write a data set once as an on-disk uint8 slice store, for data larger than memory

Config overrides: every command that trains (train, demo, reproduce, sweep, sites, fidelity, ablation) takes any
TrainConfig field as ``--KEY VALUE`` (``--epochs 3 --beta 2 --eps 8/255``); a study applies it to every run. Where
a field's name is also a study's own option (--data, and --ood_data in reproduce), the study's option wins. A study
sets each run's method, seed, out_dir, init_from and progress itself: choose them with its rows (--methods,
--variant), --seeds, --runs and --quiet. bookruns trains the shipped runs exactly as recorded and takes no overrides.

Examples::

    python -m robustmed_lite demo                                   # ERM vs the method, CPU, minutes
    python -m robustmed_lite train --config cpu-demo --method trades --epochs 3
    python -m robustmed_lite train --config colab --method robustmed --data /content/sarscov2 --ood_data /content/ucsd
    python -m robustmed_lite train --config cpu-demo --method robustmed --resume     # continue runs/...
    torchrun --nproc_per_node 4 -m robustmed_lite train --config paper --method robustmed --data DIR  # one run, 4 GPUs
    python -m robustmed_lite evaluate --checkpoint runs/robustmed-tiny_visformer-64px-seed0/best_robust.pt
    python -m robustmed_lite evaluate --attacks none --checkpoint runs/erm-*/best_clean.pt   # clean metrics alone
    python -m robustmed_lite evaluate --ood --checkpoint runs/erm-*/best_clean.pt runs/robustmed-*/best_robust.pt
    python -m robustmed_lite reproduce --profile cpu --data D/sarscov2 --ood_data D/ucsd_covidct   # the paper's table
    python -m robustmed_lite reproduce --data phantom --methods erm,cap --epochs 2 --beta 2   # overrides, every run
    python -m robustmed_lite ablation --data phantom --seeds 0,1 --epochs 3
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import warnings
from pathlib import Path

import pandas as pd

from .checkpoints import DiskFullError
from .config import CHOICES, METHOD_FIELDS, METHODS, PRESETS, TrainConfig, coerce, field_kinds
from .data.loaders import DownloadError

# Errors a user causes with a wrong argument, file or folder: one line on stderr and exit code 2 (as argparse does
# for a bad option); anything else is a bug and keeps its traceback. --debug shows the traceback of these too.
USER_ERRORS = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    DownloadError,
    DiskFullError,
)
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # the shell's code for Ctrl-C

# An override --KEY VALUE is stored as OVERRIDE_PREFIX + KEY, apart from a command's own option of the same name.
OVERRIDE_PREFIX = "override_"

# The usage line of a command with the overrides (argparse's would list all the fields, in every error message).
OVERRIDES_USAGE = "%(prog)s [options] [--KEY VALUE ...] (see --help)"

# TrainConfig fields that a study sets for each of its runs, and the study option that chooses them instead.
SET_BY_STUDY = {
    "method": "a study trains its own rows: choose them with --methods (reproduce, sites) or --variant (reproduce)",
    "seed": "a study sets each run's seed: use --seeds (e.g. --seeds 0-4)",
    "out_dir": "a study names each run's folder: use --runs for the folder that holds them",
    "init_from": "a study chooses where each run starts (profile paper: from its own clean run)",
    "progress": "a study sets the runs' bars itself: use --quiet for none",
}

# Folders of the studies (shown in --help): results, runs.
STUDY_FOLDERS = {
    "reproduce": ("results/reproduction/<profile>", "runs/reproduction/<profile>"),
    "sweep": ("results/sweep/<profile>", "the reproduction's, runs/reproduction/<profile>"),
    "sites": ("results/sites/<profile>", "the reproduction's, runs/reproduction/<profile>"),
    "fidelity": ("results/fidelity/<profile>[-phantom]", "runs/fidelity/<profile>[-phantom], shared with ablation"),
    "ablation": ("results/ablation/<profile>[-phantom]", "runs/fidelity/<profile>[-phantom], shared with fidelity"),
}


class _Refused(argparse.Action):
    """An option that is refused with its reason and fix: argparse's error, the usage and exit code 2."""

    def __init__(self, option_strings, dest, fix, **kwargs):
        self.fix = fix
        kwargs.setdefault("help", argparse.SUPPRESS)
        super().__init__(option_strings, dest, nargs="?", default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"argument {option_string}: {self.fix(values) if callable(self.fix) else self.fix}")


def _removed_set(value: str | None) -> str:
    """The error of the former ``--set KEY=VALUE``, with the new form of the value given."""
    key, eq, field_value = (value or "").partition("=")
    example = f"--{key.strip()} {field_value.strip()}" if eq and key.strip() else "--beta 2"
    return (
        "the form --set KEY=VALUE was removed: pass any TrainConfig field as its own option, --KEY VALUE "
        f"(here: {example}); it applies to every run"
    )


def _field_help(name: str, kind: str, default) -> str:
    """What an override takes, with the choices of the component options listed."""
    from .models import MODEL_NAMES

    if name == "method":
        what = f"one of {', '.join(METHODS)} (see the README's table)"
    elif name in METHOD_FIELDS:  # a component or switch: its default comes from the method
        if kind == "float":
            return "a number (default: the method's)"
        choices = CHOICES.get(name, ("true", "false"))
        return f"one of {', '.join(choices)} (default: the method's)"
    elif name in CHOICES:
        what = f"one of {', '.join(CHOICES[name])}"
    elif name == "model":
        what = f"one of {', '.join(MODEL_NAMES)} or any timm architecture"
    else:
        what = {
            "bool": "true/false",
            "int": "an integer",
            "float": "a number",
            "eps": "a number or k/255",
            "threshold": "a number or otsu",
            "str": "text",
        }[kind]
    return what if default is dataclasses.MISSING else f"{what} (default {default!r} unless the preset sets it)"


def _add_overrides(parser: argparse.ArgumentParser, own=(), set_by_command=None, note: str = "") -> None:
    """Declares ``--KEY VALUE`` for every TrainConfig field: the one override syntax of every command that trains.

    Args:
        parser: The command's parser.
        own: Field names the command declares as its own options (they win; the group's note says so).
        set_by_command: Field name -> why it is refused and what to pass instead (the command sets that field).
        note: Said under the group's title in ``--help``.
    """
    set_by_command = set_by_command or {}
    group = parser.add_argument_group("config overrides: --KEY VALUE for any TrainConfig field", note or None)
    kinds = field_kinds()
    for f in dataclasses.fields(TrainConfig):
        if f.name.startswith("_") or f.name in own:
            continue
        if f.name in set_by_command:
            group.add_argument(f"--{f.name}", action=_Refused, fix=set_by_command[f.name])
            continue
        group.add_argument(
            f"--{f.name}",
            dest=OVERRIDE_PREFIX + f.name,
            default=None,
            metavar=f.name.upper(),
            help=_field_help(f.name, kinds[f.name][0], f.default),
        )
    parser.add_argument("--set", action=_Refused, fix=_removed_set)


def _overrides(args: argparse.Namespace) -> dict:
    """The ``--KEY VALUE`` overrides given, each read by its field's kind (a bad value names its option)."""
    given = {k[len(OVERRIDE_PREFIX) :]: v for k, v in vars(args).items() if k.startswith(OVERRIDE_PREFIX)}
    return {key: coerce(key, value) for key, value in given.items() if value is not None}


def _train(args: argparse.Namespace) -> int:
    from . import distributed
    from .config import load_config
    from .trainer import Trainer

    cfg = load_config(args.config, _overrides(args))
    if Path(str(args.config)).stem == "paper" and cfg.attack != "none" and not cfg.init_from:
        warnings.warn(
            "CAP's protocol starts robust training from a clean model trained on the same data: train "
            "--method erm first and pass --init_from <its run>/best_clean.pt (reproduce --profile paper "
            "does both stages)",
            stacklevel=1,
        )
    try:  # under torchrun the Trainer joins the launched processes' group; leave it however training ends
        trainer = Trainer(cfg, resume=args.resume)
        trainer.fit()
        if distributed.is_main():
            print(
                f"run directory: {trainer.run_dir} (config.yaml, env.json, log.csv, last.pt, best_clean.pt, "
                "best_robust.pt)"
            )
    finally:
        distributed.teardown()
    return 0


# The columns of a clean-only evaluation (no attack: its eps, steps and seconds say nothing).
CLEAN_COLUMNS = ("condition", "n", "n_covid", "n_noncovid", "accuracy", "auc", "sensitivity", "specificity", "f1")


def _attack_names(text: str) -> list[str]:
    """``--attacks``: comma-separated names, or ``none`` for clean metrics alone (an empty list)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if names == ["none"]:
        return []
    if not names or "none" in names:
        raise ValueError(
            f"--attacks takes comma-separated attack names or 'none' (clean metrics alone), got {text!r}. Fix: "
            "pass e.g. --attacks fgsm,pgd10, or --attacks none"
        )
    return names


def _check_output_file(path: Path) -> None:
    """Refuses an output file path that is a folder or cannot be written, before any work."""
    from .checkpoints import check_writable

    if path.is_dir():
        raise IsADirectoryError(f"--out {path} is a folder. Fix: name a file, e.g. {path / 'evaluation.csv'}")
    check_writable(path.parent, 2**20)


def _evaluate(args: argparse.Namespace) -> int:
    if args.ood:
        from .evaluation.checkpoint_eval import run_ood

        results = run_ood(
            args.checkpoint,
            out_dir=args.out_dir,
            n=args.n,
            covid19c=args.covid19c,
            corruptions=args.corruptions.split(",") if args.corruptions else None,
            severities=_severities(args.severities),
            seed=args.seed,
        )
        for key in ("summary", "shift"):
            table = results[key]
            if "note" in table and not table["note"].astype(bool).any():
                table = table.drop(columns="note")
            print(f"\n{key}:\n{table.round(3).to_string(index=False)}")
        print(f"\nwrote corruptions.csv, summary.csv, shift.csv, corruption_heatmap.png, shift.png to {args.out_dir}")
        return 0
    from .evaluation.checkpoint_eval import evaluate_checkpoint

    attacks = _attack_names(args.attacks)
    eps = None if args.eps is None else coerce("eps", args.eps)  # read as train reads it: before any loading
    if not attacks and eps is not None:
        raise ValueError("--eps is an attack radius and --attacks none runs no attack. Fix: drop one of them")
    if args.out:  # before the evaluation, not after it
        _check_output_file(Path(args.out))
    tables = []
    for path in args.checkpoint:
        table = evaluate_checkpoint(
            path,
            split=args.split,
            attacks=attacks,
            eps=eps,
            n=args.n,
            data=args.data,
            adapt=args.adapt,
            seed=args.seed,
        )
        first = table.iloc[0]
        print(f"{path}: {table.attrs['sample']}: {first['n_covid']} COVID, {first['n_noncovid']} non-COVID")
        tables.append(table.assign(checkpoint=path))
    table = pd.concat(tables, ignore_index=True)
    with_note = table["note"].astype(bool).any()
    if attacks:
        shown = table if with_note else table.drop(columns="note")
    else:
        print("clean metrics alone (--attacks none): no attack was run")
        shown = table[[*CLEAN_COLUMNS, *(("note",) if with_note else ()), "checkpoint"]]
    print(shown.to_string(index=False))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        (table if attacks else shown).to_csv(args.out, index=False)
        print(f"saved {args.out}")
    return 0


def _severities(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise ValueError(f"--severities takes comma-separated integers 1..5, got {text!r}") from None


def _positive_int(text: str) -> int:
    """argparse type for image counts: '0' and '-3' are refused with the option's name."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"takes an integer >= 1, got {text!r}")
    return value


def _count_or_all(option: str, text: str | None):
    """``--ensemble_n`` / ``--corruption_n``: not given -> the profile's, 'all' -> None (every image), else a count."""
    if text is None:
        return "profile"
    if text.strip().lower() == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{option} takes 'all' or a number of images, got {text!r}") from None


def _study_options(args: argparse.Namespace) -> dict:
    """The options every study takes (``_study_parser``), as the study functions name them."""
    return dict(
        data=args.data,
        out=args.out,
        runs=args.runs,
        jobs=args.jobs,
        overrides=_overrides(args),
        progress=not args.quiet,
    )


def _reproduce(args: argparse.Namespace) -> int:
    from .studies.plan import parse_variant
    from .studies.reproduce import reproduce

    variants = dict(parse_variant(v) for v in args.variant or [])
    adapt_methods = [m for m in (args.adapt or "").split(",") if m]
    if args.sites_best:  # the cross-site study's best combination as one more row of the method
        from .studies.sites import best_settings

        settings, adaptation = best_settings(args.sites_best)
        variants["robustmed+sites"] = {"method": "robustmed", **settings}
        adapt_methods += [adaptation] if adaptation != "none" and adaptation not in adapt_methods else []
    as_given = {key: getattr(args, key) for key in ("ood_data", "covid19c", "methods", "seeds", "shard")}
    results = reproduce(
        args.profile,
        **_study_options(args),
        **as_given,
        variants=variants,
        ensemble_n=_count_or_all("--ensemble_n", args.ensemble_n),
        adapt_methods=adapt_methods,
        corruption_n=_count_or_all("--corruption_n", args.corruption_n),
    )
    out = Path(args.out or f"results/reproduction/{args.profile}")
    if len(results["verdicts"]):
        shown = results["verdicts"].drop(columns=["metric", "claimed_gain", "rule", "primary"])  # the claim names both
        print(shown.round(3).to_string(index=False))
    print(
        f"\n{len(results['runs'])} runs summarised; see {out / 'table.md'} (and runs.csv, table.csv, gains.csv, "
        "verdicts.csv, metrics.png, robust_vs_clean.png)"
    )
    return 0


def _sites(args: argparse.Namespace) -> int:
    from .studies.plan import parse_methods
    from .studies.sites import run_sites

    tables = run_sites(
        args.profile,
        **_study_options(args),
        target=args.target,
        methods=parse_methods(args.methods),
        seeds=args.seeds,
        screen=parse_methods(args.screen, "--screen") if args.screen is not None else None,
    )
    out = Path(args.out or f"results/sites/{args.profile}")
    print((out / "table.md").read_text())
    print(f"{len(tables['runs'])} runs; tables in {out}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from .studies.sweep import run_sweep

    choice = run_sweep(args.profile, methods=args.methods, seeds=args.seeds, **_study_options(args))
    print(choice.round(4).to_string(index=False))
    return 0


def _paired_study(args: argparse.Namespace) -> int:
    from .studies.ablation import run_ablation
    from .studies.fidelity import run_fidelity
    from .studies.plan import parse_seeds

    run = {"fidelity": run_fidelity, "ablation": run_ablation}[args.study]
    only = {"only": [r for r in args.rows.split(",") if r]} if getattr(args, "rows", None) is not None else {}
    result = run(args.profile, **_study_options(args), seeds=parse_seeds(args.seeds), **only)
    print(result["effects"].round(4).to_string(index=False))
    return 0


def _attention(args: argparse.Namespace) -> int:
    from .studies.attention import run_attention

    result = run_attention(
        args.profile, args.methods, args.seeds, args.runs, args.out, args.batch_size, progress=not args.quiet
    )
    print(result["paired"].round(4).to_string(index=False))
    print(f"see {Path(args.out or f'results/attention/{args.profile}') / 'README.md'}")
    return 0


def _diagnose(args: argparse.Namespace) -> int:
    from .checkpoints import model_from_checkpoint
    from .data.loaders import stratified_subset
    from .data.preprocess import domain_label, load_domain
    from .evaluation.shortcuts import domain_report, intensity_histograms, intensity_summary, saliency_outside

    model, cfg = model_from_checkpoint(args.checkpoint)
    domains = {}
    for spec in args.data:
        images, labels, _ = load_domain(
            spec, cfg.img_size, cfg.lung_crop, cfg.intensity, cfg.lung_region, progress=not args.quiet
        )
        domains[domain_label(spec)] = (images, labels)
    report = domain_report(model, domains)
    rows = []
    for name, (x, y) in domains.items():
        pick = stratified_subset(y.numpy(), args.n, seed=args.seed)
        rows.append({"domain": name, "saliency_n": len(pick), **saliency_outside(model, x[pick]).mean().to_dict()})
    report = report.merge(pd.DataFrame(rows), on="domain")
    grey = {name: x for name, (x, _) in domains.items()}
    report = report.merge(intensity_summary(grey), on="domain")
    print(report.round(3).to_string(index=False))
    print(
        "\npredicted_covid_share far from true_covid_share at a new site means the model reads the site, not the "
        "disease; outside_lungs above lung_area_outside means its input gradients favour what lies outside the "
        "lungs (an even map would match the area); grey levels and the near-black share (outside air) show how "
        "the sites differ before any model sees them, as the model sees them (after its crop and standardisation)."
    )
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        report.to_csv(out, index=False)
        hist_path = out.with_name(f"{out.stem}_histograms.csv")
        intensity_histograms(grey).to_csv(hist_path, index=False)
        print(f"saved {out} and the grey-level histograms {hist_path}")
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from .book.doctor import report, run_checks

    checks = run_checks()
    print(report(checks))
    return 1 if any(c.status == "FAIL" for c in checks) else 0


def _results_writeup(args: argparse.Namespace) -> int:
    from .studies.writeup import study_folders, write_index, write_writeup

    folders = [Path(f) for f in args.folders] or study_folders(args.root)
    if not folders:
        raise FileNotFoundError(f"no study folder under {args.root}: pass FOLDER, e.g. results/reproduction/cpu")
    for folder in folders:
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is not a folder: pass a study folder, e.g. results/reproduction/cpu")
        print(f"wrote {write_writeup(folder)}")
    if not args.folders:
        print(f"wrote {write_index(args.root)}")
    return 0


def _data_fetch(args: argparse.Namespace) -> int:
    from .data.fetch import UCSD_ARCHIVE_URL, check_counts, fetch

    root = fetch(args.name, args.dest, url=args.url or UCSD_ARCHIVE_URL)
    counts = check_counts(args.name, root)
    held = ", ".join(f"{n} {cls}" for cls, n in counts.items())
    print(f"{args.name}: {root} holds {held} (the published counts)")
    print("Point the notebooks and commands at it (in a notebook: os.environ['ROBUSTMED_DATA'] = ...):")
    print(f"export ROBUSTMED_DATA={root.parent}")
    return 0


def _data_store(args: argparse.Namespace) -> int:
    from .data.slicestore import write_folder_store, write_phantom_store

    if args.data == "phantom":
        store = write_phantom_store(
            args.out, args.size, args.n_train, args.n_val, args.n_test, site=args.site, progress=not args.quiet
        )
    else:
        store = write_folder_store(args.data, args.out, args.size, progress=not args.quiet)
    print(f"{store.root}: {len(store)} slices of {store.size} px, {store.megabytes_on_disk:.0f} MiB on disk (uint8)")
    print(f"Train on it with: python -m robustmed_lite train --data {store.root} --img_size {store.size}")
    return 0


def _bookruns(args: argparse.Namespace) -> int:
    from .book import bookruns

    if args.action == "regenerate":
        manifest = bookruns.regenerate(args.runs or tuple(bookruns.RUNS), progress=not args.quiet)
        for name, run in manifest["runs"].items():
            print(
                f"{name}: {run['megabytes']} MB, trained in {run['train_minutes']} min; test clean "
                f"{run['float16']['test_clean']:.3f}, PGD {run['float16']['test_pgd']:.3f} (float16 weights)"
            )
        print(f"wrote {bookruns.manifest_path()}")
        return 0
    problems = bookruns.check(retrain=args.retrain, progress=not args.quiet)
    for line in problems:
        print(f"FAIL {line}")
    retrained = f"; retrained: {', '.join(args.retrain)}" if args.retrain else ""
    print(
        f"{len(bookruns.RUNS)} shipped runs checked{retrained}: "
        f"{'all within tolerance' if not problems else f'{len(problems)} problems'}"
    )
    return 1 if problems else 0


def _demo(args: argparse.Namespace) -> int:
    from .book.runs import compare_methods

    start = time.time()
    table = compare_methods(
        ["erm", "robustmed"],
        preset=args.config,
        out_root=args.out_root,
        seed=args.seed,
        overrides=_overrides(args),
        progress=not args.quiet,
    )
    print(f"\nERM vs the method ({args.config} preset, seed {args.seed}), {time.time() - start:.0f} s in all")
    print(table.to_string(index=False))
    print(
        "\nCheckpoints were chosen on the validation split (ERM: best clean, robust methods: best PGD accuracy); "
        "accuracy is on the held-out test split (site A) and on the same patients seen by another scanner "
        "(site B). Attacks run in eval mode on inputs in [0,1]; eps is on the pixel scale."
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit code.

    A mistake the user can fix (``USER_ERRORS``: a bad value, a missing or unusable file, an existing run) is
    printed as one line, ``error: <message>``, on stderr, and the exit code is 2; ``--debug`` raises it with its
    traceback instead. Bad options exit through argparse (``SystemExit(2)`` with the usage).
    """
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt as err:  # Ctrl-C: what was saved and how to go on, not a traceback
        if args.debug:
            raise
        print(f"interrupted: {err}" if str(err) else "interrupted (Ctrl-C)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (*USER_ERRORS, OSError) as err:
        # Any other OSError is the file system saying no (read-only, full, a link loop): the file and the fix.
        if args.debug:
            raise
        if isinstance(err, USER_ERRORS):
            message = " ".join(str(err).split()) or type(err).__name__  # one line, even for multi-line messages
        else:
            message = (
                f"{err.filename or 'a file'}: {err.strerror or err}. Fix: check that the path exists and can be "
                "written, and that its disk has space"
            )
        print(f"error: {message} (--debug shows the traceback)", file=sys.stderr)
        return EXIT_USER_ERROR


def _study_parser(sub, name: str, help_text: str, parents, run, methods: str | None = "") -> argparse._ArgumentGroup:
    """A study's subcommand with the options every study shares, declared here once, and the config overrides.

    Args:
        sub: The subparsers to add to.
        name: The command (a key of ``STUDY_FOLDERS``).
        help_text: Its one line in the top-level ``--help``.
        parents: Parsers whose options it takes too (``--debug``).
        run: The function that runs it.
        methods: The default of ``--methods`` (None: all); ``""``: the study has no ``--methods``.

    Returns:
        The group of the study options, for the study's own options.
    """
    results, runs = STUDY_FOLDERS[name]
    study = sub.add_parser(name, parents=parents, help=help_text, description=help_text, usage=OVERRIDES_USAGE)
    options = study.add_argument_group("study options")
    options.add_argument(
        "--profile",
        default="cpu",
        choices=("cpu", "gpu", "paper"),
        help="cpu: 64 px, minutes per run; gpu: 128 px, several runs per GPU; paper: CAP's protocol",
    )
    options.add_argument(
        "--data",
        default=None,
        help="training set, the study's option, not the TrainConfig field (default: sarscov2 in ROBUSTMED_DATA "
        "or ../shared/data; 'phantom' for a quick check)",
    )
    if methods != "":
        default = "all" if methods is None else methods
        options.add_argument(
            "--methods", default=methods, help=f"comma-separated, from: {', '.join(METHODS)} (default {default})"
        )
    options.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds, or a range such as 0-4")
    options.add_argument("--out", default=None, help=f"results folder (default {results})")
    options.add_argument("--runs", default=None, help=f"run directories (default {runs})")
    options.add_argument("--jobs", type=int, default=None, help="runs at once (default: the profile's)")
    options.add_argument("--quiet", action="store_true", help="no progress bars")
    own = ("data", "ood_data") if name == "reproduce" else ("data",)
    refused = dict(SET_BY_STUDY)
    if "ood_data" not in own:
        where = "--target" if name == "sites" else "the default data's other site"
        refused["ood_data"] = f"this study chooses its other-site domains ({where}); reproduce takes --ood_data"
    clashes = " and ".join(f"--{k}" for k in own)
    _add_overrides(
        study,
        own=own,
        set_by_command=refused,
        note=f"Each applies to every run of the study (e.g. --epochs 3 --beta 2). {clashes}: the study's options "
        "above win over the TrainConfig fields of the same name. The study sets each run's method, seed, "
        "out_dir, init_from and progress itself (its rows, --seeds, --runs, --quiet).",
    )
    study.set_defaults(run=run, study=name)
    return options


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m robustmed_lite", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--debug", action="store_true", default=False, help="show the traceback of an error instead of one line"
    )
    # Each command takes --debug too; SUPPRESS keeps a subcommand from resetting the top-level value.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the traceback of an error instead of one line",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        parents=[common],
        help="the main job: ERM vs the method on the phantom, a comparison table",
        usage=OVERRIDES_USAGE,
    )
    demo.add_argument("--config", default="cpu-demo", help=f"preset ({', '.join(PRESETS)}) or a YAML file")
    demo.add_argument("--seed", type=int, default=0, help="the training seed of both runs")
    demo.add_argument("--out_root", default="runs/demo", help="reused on a second run (delete it to retrain)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_overrides(
        demo,
        own=("seed",),
        set_by_command={
            "method": "demo trains erm and robustmed: use train --method for another method",
            "out_dir": "demo's runs go to --out_root",
            "progress": "use --quiet for no progress bars",
        },
        note="Each applies to both runs (e.g. --epochs 2).",
    )
    demo.set_defaults(run=_demo)

    train = sub.add_parser(
        "train", parents=[common], help="train one method (see --method and the presets)", usage=OVERRIDES_USAGE
    )
    train.add_argument("--resume", action="store_true", help="continue from the run directory's last.pt")
    train.add_argument("--config", default="cpu-demo", help=f"preset ({', '.join(PRESETS)}) or a YAML file")
    _add_overrides(train)
    train.set_defaults(run=_train)

    ev = sub.add_parser(
        "evaluate", parents=[common], help="clean / attack / worst-case accuracy and clinical metrics of a checkpoint"
    )
    ev.add_argument("--checkpoint", required=True, nargs="+", help="one or more checkpoints")
    ev.add_argument("--split", default="test", choices=("val", "test", "shift"))
    ev.add_argument(
        "--attacks",
        default="fgsm,pgd10,pgd50,apgd,cw",
        help="comma-separated, from: fgsm, rfgsm, pgd10, pgd50, pgd_l2, mim, cw, apgd; or none: clean metrics "
        "alone (accuracy, AUC, sensitivity, specificity, F1, n)",
    )
    ev.add_argument("--eps", default=None, help="attack radius, e.g. 8/255 (default: the training eps)")
    ev.add_argument(
        "--n",
        type=_positive_int,
        default=None,
        help="evaluate a seeded stratified sample of n images (both classes in proportion)",
    )
    ev.add_argument("--seed", type=int, default=0, help="seed of the --n sample (and, with --ood, the corruptions)")
    ev.add_argument("--data", default=None, help="evaluate on another data root instead of the run's split")
    ev.add_argument(
        "--adapt",
        default="none",
        choices=("none", "adabn", "tent"),
        help="test-time adaptation to the evaluated images first (labels never used; checkpoint kept)",
    )
    ev.add_argument("--out", default=None, help="write the table as CSV")
    ev.add_argument(
        "--ood",
        action="store_true",
        help="the OOD suite instead: corruptions x severities, mCE against ERM, cross-site shift",
    )
    ev.add_argument("--out_dir", default="results/ood", help="with --ood: where the CSVs and PNGs go")
    from .evaluation.corruptions import CORRUPTIONS

    ev.add_argument(
        "--corruptions", default=None, help=f"with --ood: comma-separated, from: {', '.join(CORRUPTIONS)} (default all)"
    )
    ev.add_argument("--severities", default="1,2,3,4,5", help="with --ood: comma-separated severities")
    ev.add_argument("--covid19c", default=None, help="with --ood: a COVID19-C root to add as shift domains")
    ev.set_defaults(run=_evaluate)

    rep = _study_parser(
        sub,
        "reproduce",
        "the paper's comparison on real CT: every method x seed, intervals, verdicts (resumable)",
        [common],
        _reproduce,
        methods=None,
    )
    rep.add_argument(
        "--ood_data",
        nargs="*",
        default=None,
        help="other-site roots, each its own domain (default: ucsd_covidct beside the default data); the study's "
        "option, not the TrainConfig field",
    )
    rep.add_argument("--covid19c", default=None, help="a COVID19-C root: its subsets become domains")
    rep.add_argument(
        "--shard", default=None, help="i/n: train this shard's runs only; the summary merges all finished runs"
    )
    rep.add_argument(
        "--ensemble_n",
        default=None,
        help="test images for the attack ensemble ('all', or a number; default: the profile's)",
    )
    rep.add_argument(
        "--corruption_n",
        default=None,
        help="test images scored under the corruptions ('all', or a number; default: the profile's)",
    )
    rep.add_argument(
        "--adapt",
        default=None,
        help="test-time adaptations also evaluated on the other sites: adabn, tent (comma-separated)",
    )
    rep.add_argument(
        "--variant",
        action="append",
        metavar="NAME=METHOD,KEY=VALUE,...",
        help="an extra row, named NAME: METHOD with other settings (e.g. robustmed+crop=robustmed,lung_crop=true); "
        "repeat for more rows",
    )
    rep.add_argument(
        "--sites_best",
        default=None,
        metavar="DIR",
        help="add the cross-site study's best combination (its best.json in DIR, e.g. results/sites/cpu) "
        "as a row robustmed+sites, and its test-time adaptation to the evaluation",
    )

    _study_parser(
        sub,
        "sweep",
        "the weight-noise scale of robustmed and awp chosen on validation: the published value and two others",
        [common],
        _sweep,
        methods="robustmed,awp",
    )

    sites = _study_parser(
        sub,
        "sites",
        "the cross-site study: Soares -> UCSD with and without every component against the shift, shortcut tests, "
        "the best combination",
        [common],
        _sites,
        methods="erm,trades,robustmed",
    )
    sites.add_argument(
        "--target",
        default=None,
        help="the other site, with an official val/test split (default: ucsd_covidct beside the shared data)",
    )
    sites.add_argument(
        "--screen",
        default=None,
        help="methods trained with each single component, whose validation "
        "gains choose the combination (default: every method)",
    )

    fidelity = _study_parser(
        sub,
        "fidelity",
        "CAP's code against the former defaults, the abstract's readings, AWP against TRADES (paired, seeds)",
        [common],
        _paired_study,
    )
    fidelity.add_argument(
        "--rows",
        default=None,
        help="only these comparisons' rows, comma-separated (e.g. awp,awp+warmup), into a folder of their own "
        "(--out); their references train too",
    )
    _study_parser(
        sub,
        "ablation",
        "robustmed with one part switched off at a time (prior, feedback, weight noise, loss; paired, seeds)",
        [common],
        _paired_study,
    )

    # attention: reads the reproduction's trained runs, trains nothing (no config overrides)
    att = sub.add_parser(
        "attention",
        parents=[common],
        help="where the reproduction's trained models look on real CT: lung-attention ratios, paired over seeds",
    )
    att.add_argument("--profile", default="cpu", choices=("cpu", "gpu", "paper"), help="the reproduction's profile")
    att.add_argument(
        "--methods",
        default="erm,trades,awp,cap,robustmed",
        help=f"comma-separated, from: {', '.join(METHODS)} (default erm,trades,awp,cap,robustmed)",
    )
    att.add_argument(
        "--seeds", default=None, help="comma-separated or a range such as 0-9 (default: every seed finished for all)"
    )
    att.add_argument("--runs", default=None, help="the reproduction's run folder (default runs/reproduction/<profile>)")
    att.add_argument("--out", default=None, help="results folder (default results/attention/<profile>)")
    att.add_argument("--batch_size", type=_positive_int, default=64, help="images per forward pass")
    att.add_argument("--quiet", action="store_true", help="no progress bar")
    att.set_defaults(run=_attention)

    diag = sub.add_parser(
        "diagnose",
        parents=[common],
        help="is the model looking at the disease? per-site predictions, calibration and saliency outside the lungs",
    )
    diag.add_argument("--checkpoint", required=True, help="a checkpoint written by the trainer")
    diag.add_argument("--data", required=True, nargs="+", help="one or more data roots (root:test for one split)")
    diag.add_argument(
        "--n", type=int, default=128, help="slices per domain for the saliency measurement (seeded, stratified)"
    )
    diag.add_argument("--seed", type=int, default=0)
    diag.add_argument("--out", default=None, help="write the table as CSV")
    diag.add_argument("--quiet", action="store_true")
    diag.set_defaults(run=_diagnose)

    # report: one model's robustness and generalisation report (evaluation/report.py)
    def _report(args: argparse.Namespace) -> int:
        from .evaluation.report import ReportSettings, build_report, parse_site

        settings = ReportSettings(reference=args.reference, seed=args.seed)
        if args.n_boot is not None:
            settings.n_boot = args.n_boot
        sites = [parse_site(text) for text in args.site]
        report = build_report(
            args.checkpoint, args.out, sites, settings, not args.no_own_shift, args.overwrite, not args.quiet, args.data
        )
        print(f"wrote {Path(args.out) / 'report.html'} and report.json in {report['seconds']:.0f} s")
        return 0

    rep_cmd = sub.add_parser(
        "report",
        parents=[common],
        help="a robustness and generalisation report of one model (report.html + report.json) to file",
    )
    rep_cmd.add_argument(
        "checkpoint", metavar="RUN_OR_CHECKPOINT", help="a .pt file, a run folder, or a shipped run (robustmed-seed0)"
    )
    rep_cmd.add_argument("--data", default=None, help="where the run's own data is (default: its config's data)")
    rep_cmd.add_argument(
        "--site", action="append", default=[], metavar="NAME=ROOT", help="an external site (repeat); phantom:C works"
    )
    rep_cmd.add_argument("--reference", default=None, help="an ERM checkpoint to compare corruption accuracy with")
    rep_cmd.add_argument("--no_own_shift", action="store_true", help="leave out the run's own shifted test set")
    rep_cmd.add_argument("--out", default="report", help="the report folder (refused if it exists)")
    rep_cmd.add_argument("--overwrite", action="store_true", help="rewrite an existing --out, reusing its cache")
    rep_cmd.add_argument("--n_boot", type=int, default=None, help="bootstrap resamples (default 1000)")
    rep_cmd.add_argument("--seed", type=int, default=0)
    rep_cmd.add_argument("--quiet", action="store_true")
    rep_cmd.set_defaults(run=_report)

    doctor = sub.add_parser(
        "doctor", parents=[common], help="is this machine ready for the notebooks? a short pass/fail report to paste"
    )
    doctor.set_defaults(run=_doctor)

    from .book.bookruns import RUNS as SHIPPED_RUNS

    book = sub.add_parser(
        "bookruns",
        parents=[common],
        help="the fast-profile runs shipped for the notebooks: regenerate them, or check them against their record",
    )
    book.add_argument("action", choices=("regenerate", "check"))
    book.add_argument(
        "--retrain",
        nargs="*",
        default=[],
        metavar="RUN",
        help="check: also train these shipped runs again and compare (e.g. --retrain erm-seed0)",
    )
    book.add_argument(
        "--runs",
        nargs="*",
        default=[],
        metavar="RUN",
        choices=tuple(SHIPPED_RUNS),
        help="regenerate: only these shipped runs (default: all); the manifest keeps the others",
    )
    book.add_argument("--quiet", action="store_true")
    book.set_defaults(run=_bookruns)

    data = sub.add_parser(
        "data",
        help="get the real CT sets (data fetch sarscov2|ucsd --dest DIR), or write one "
        "as an on-disk store for data larger than memory (data store)",
    )
    data_sub = data.add_subparsers(dest="action", required=True)
    fetch = data_sub.add_parser(
        "fetch",
        parents=[common],
        help="download a real CT set, check its counts and say how to point ROBUSTMED_DATA at it",
    )
    fetch.add_argument(
        "name",
        choices=("sarscov2", "ucsd"),
        help="sarscov2: the Soares set from Kaggle (needs Kaggle credentials); ucsd: UCSD COVID-CT "
        "from its GitHub repository, with the official split",
    )
    fetch.add_argument(
        "--dest", default="~/robustmed-data", help="the data root: the set lands in DEST/sarscov2 or DEST/ucsd_covidct"
    )
    fetch.add_argument("--url", default=None, help="another address of UCSD's archive (a mirror, or file://)")
    fetch.set_defaults(run=_data_fetch)
    store = data_sub.add_parser(
        "store",
        parents=[common],
        help="write a data set once as an on-disk uint8 slice store, for training on data larger than memory",
    )
    store.add_argument("--data", required=True, help="phantom, or a data set's folder (any layout train reads)")
    store.add_argument("--size", type=int, required=True, help="side of the stored slices in pixels")
    store.add_argument("--out", required=True, help="the store folder to create (an unfinished one resumes)")
    store.add_argument("--n_train", type=int, default=50_000, help="phantom: training slices")
    store.add_argument("--n_val", type=int, default=256, help="phantom: validation slices")
    store.add_argument("--n_test", type=int, default=256, help="phantom: test slices")
    store.add_argument("--site", default="A", help="phantom: scanner site")
    store.add_argument("--quiet", action="store_true")
    store.set_defaults(run=_data_store)

    results = sub.add_parser("results", help="the committed study folders: results writeup [FOLDER ...]")
    results_sub = results.add_subparsers(dest="action", required=True)
    writeup = results_sub.add_parser(
        "writeup",
        parents=[common],
        help="write each study folder's README.md again from its result files (machine paths made relative); "
        "no training",
    )
    writeup.add_argument("folders", nargs="*", help="study folders (default: every one under --root, and its index)")
    writeup.add_argument("--root", default="results", help="where the study folders are (default results)")
    writeup.set_defaults(run=_results_writeup)

    return parser


if __name__ == "__main__":
    sys.exit(main())
