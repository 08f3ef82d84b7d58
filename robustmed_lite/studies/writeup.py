"""Each study folder's ``README.md``, written from the folder's own result files so it cannot drift from them.

    python -m robustmed_lite results writeup results/reproduction/cpu    # one folder
    python -m robustmed_lite results writeup                             # every study folder under results/

Every study command calls ``write_writeup`` at its end; the ``results writeup`` command regenerates a committed
folder's page without training anything. Both first make the folder portable (``portable_paths``): a machine
path in a result file becomes a path relative to the study folder (relative to the repository root in
``commands.txt``, whose commands run from there).

The pages hold no hand-written number: every number, and every sentence that depends on one, is read from the
folder's CSV and JSON files here.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pandas as pd

from ..common import format_eps
from ..config import METHODS
from ..evaluation.stats import paired_gain

STUDIES = ("reproduction", "sweep", "sites", "fidelity", "ablation", "attention")
GENERATED = (
    "<!-- Written by `python -m robustmed_lite results writeup {folder}` from this folder's files; do not edit. -->"
)
TEXT_SUFFIXES = (".csv", ".json", ".md", ".txt")

# An absolute machine path: a slash at the start of a field (line start, space, quote, =, comma, bracket) followed
# by at least two path components. "8/255" or "and/or" do not start a field; URLs ("https://...") are excluded.
MACHINE_PATH = re.compile(r"(?:^|(?<=[\s\"'=,(\[]))/(?:[\w.+@-]+/)+[\w.+@-]*", re.MULTILINE)

# What the study is, one paragraph per study: no numbers here (those come from the files).
ABOUT = {
    "reproduction": (
        "The paper's comparison: every method trained with every seed on the training set named below (the "
        "Soares SARS-CoV-2 set for the committed study), evaluated on its validation-chosen checkpoint (whole"
        " test split, PGD-10 and the attack ensemble at the training eps and at 8/255, CAP's 15 ImageNet-C "
        "corruption types and the CT-physics ones, and the other hospital's data), summarised as mean and 95%"
        " t-interval over seeds, with the method's paired gain over the best prior method and a verdict on "
        "each claim of the paper. Chapter 08 of the book reads these files."
    ),
    "sweep": (
        "The weight-noise scale `gamma` of the methods with weight noise, chosen on the validation split: each "
        "method trained at CAP's published 1e-4, TRADES-AWP's 5e-3 and 1e-3 between them, every run's checkpoint "
        "chosen on validation (best PGD accuracy), and the value with the highest mean validation PGD accuracy "
        "over seeds chosen (a tie goes to the published value). No test image is read here: the reproduction "
        "evaluates the chosen value as an extra row beside the published one."
    ),
    "sites": (
        "Why models trained on one hospital fail on another: the methods trained on one site (the Soares set "
        "for the committed studies) with each single fix against the shift (lung crop, intensity "
        "standardisation, acquisition augmentation, multi-source training with the target's own train labels,"
        " as a reference) and scored on the target site's official validation and test splits (UCSD "
        "COVID-CT), without and with test-time adaptation (AdaBN, TENT); the best label-free combination "
        "chosen on the target's validation split (never its test split) and trained for every method; and the"
        " shortcut tests (ERM on slices without their lungs, and with nothing but their lungs). Chapter 09 of"
        " the book reads these files."
    ),
    "fidelity": (
        "Does following CAP's public code change the results? `cap` and `robustmed` as CAP's code trains them"
        " (CAP's fast guided filter, one stateful AdamW proxy, the gradient through the soft target) against "
        "the package's former defaults (`*_v0`), each change reverted alone, the two readings of the paper's "
        "abstract (weight-level feedback, training on prior views), and AWP against TRADES. Each effect is a "
        "paired per-seed difference, row minus reference, with its 95% t-interval, on the in-domain test "
        "split. Chapter 04 of the book reads these files."
    ),
    "ablation": (
        "What each part of the method adds: `robustmed` with one part switched off at a time (the prediction "
        "feedback, which leaves `cap`; the lung-prior view; the proxy attention noise; the square loss, "
        "replaced by TRADES' CE + KL). Each effect is a paired per-seed difference, row minus `robustmed`, "
        "with its 95% t-interval: a positive number means the metric is higher *without* the part. Chapter 07"
        " of the book reads these files."
    ),
    "attention": (
        "Where the reproduction's models look on real CT. Nothing is trained: every run of the reproduction is opened"
        " at its validation-chosen checkpoint, its own held-out test split is rebuilt from its config, and its "
        "saliency maps (the attention each position receives and Grad-CAM at Visformer's stages 2 and 3, and the "
        "input gradient; Grad-CAM and the input gradient explain the predicted class) are scored by the share of "
        "their mass inside the lungs. Real CT has no lung masks: the mask is an **estimate** "
        "(`prior.lung_mask`, the dark region inside the body), and a slice where it finds nothing is counted, not "
        "averaged. Baselines: the mask's area (what a uniform map scores) and an untrained model of the same "
        "architecture. Chapter 05 of the book reads these files."
    ),
}

METHOD_LABELS = {"erm": "ERM", "trades": "TRADES", "awp": "AWP", "cap": "CAP", "robustmed": "the method"}
COMPONENT_LABELS = {
    "baseline": "",
    "crop": " + lung crop",
    "intensity": " + intensity (`anchor`)",
    "acq": " + acquisition augmentation",
    "multi": " + multi-source (uses the target's train labels)",
}
FIDELITY_LABELS = {
    "robustmed-prior_view": "`robustmed`, earlier prior view",
    "robustmed-proxy_optimizer": "`robustmed`, SGD proxy",
    "robustmed-target_grad": "`robustmed`, stop-gradient soft target",
    "robustmed+weight_feedback": "`robustmed` + weight-level feedback",
    "robustmed+prior_samples": "`robustmed` + training on prior views",
    "awp+warmup": "`awp` with warm-up - `trades`",
    "awp+gamma1e-3": "`awp` with gamma 1e-3 - `trades`",
}
ABLATION_LABELS = {
    "cap": "without the prediction feedback (`cap`)",
    "robustmed-prior": "without the lung-prior view",
    "robustmed-weight_noise": "without the proxy attention noise",
    "robustmed-square_loss": "TRADES' loss instead of the square loss",
}


# ---------------------------------------------------------------------------------------------------------------
# Machine paths


def relative_paths_in(text: str, start: str | Path) -> str:
    """``text`` with every absolute path written relative to ``start`` (an absolute folder)."""
    return MACHINE_PATH.sub(lambda m: os.path.relpath(m.group(0), str(start)), text)


def _machine_root(texts: list[str]) -> str | None:
    """The repository root of the machine that wrote ``texts``: the folder that held its ``runs/``."""
    for text in texts:
        for match in MACHINE_PATH.finditer(text):
            path = match.group(0)
            if "/runs/" in path:
                return path[: path.rindex("/runs/")]
    return None


def _repository_location(folder: Path, study: str) -> Path:
    """Where ``folder`` lies inside the repository, e.g. ``results/sites/cpu/all_runs``."""
    parts = folder.resolve().parts
    if "results" in parts:
        return Path(*parts[len(parts) - 1 - parts[::-1].index("results") :])
    if folder.name == "all_runs":
        return Path("results", study, folder.parent.name, "all_runs")
    return Path("results", study, folder.name)


def portable_paths(folder: str | Path, machine_folder: str | Path | None = None, study: str | None = None) -> list:
    """Rewrites the machine paths in a study folder's text result files (``all_runs/`` included).

    In ``commands.txt`` a path becomes relative to the repository root (the commands run from there); everywhere
    else relative to the folder that holds the file.

    Args:
        folder: The study folder.
        machine_folder: The absolute path the folder had where the study ran (default: a folder that exists here
            is its own; for files copied from another machine, the repository root is found as the folder that
            held ``runs/``, and the folder's place in the repository, ``results/<study>/<profile>``, is kept).
        study: The study (default: found from the files).

    Returns:
        The files rewritten.
    """
    folder = Path(folder)
    study = study or study_of(folder)
    files = [p for p in sorted(folder.rglob("*")) if p.suffix in TEXT_SUFFIXES and p.name != "README.md"]
    texts = {p: p.read_text() for p in files}
    root = None
    if machine_folder is None:
        root = _machine_root(list(texts.values()))
    changed = []
    for path, text in texts.items():
        if not MACHINE_PATH.search(text):
            continue
        location = _repository_location(path.parent, study)
        if machine_folder is not None:
            here = Path(machine_folder).resolve() / path.parent.relative_to(folder)
            repo_root = Path.cwd().resolve()
        elif root is not None:
            here, repo_root = Path(root) / location, Path(root)
        else:
            here = path.parent.resolve()
            repo_root = Path.cwd().resolve()
        start = repo_root if path.name == "commands.txt" else here
        new = relative_paths_in(text, start)
        if new != text:
            path.write_text(new)
            changed.append(path)
    return changed


# ---------------------------------------------------------------------------------------------------------------
# Reading a folder


def study_of(folder: str | Path) -> str:
    """Which study wrote ``folder``, from its files.

    Raises:
        FileNotFoundError: The folder holds no study's result files.
    """
    folder = Path(folder)
    if (folder / "paired.csv").exists() and (folder / "untrained.csv").exists():
        return "attention"
    if (folder / "sites_table.csv").exists():
        return "sites"
    if (folder / "choice.csv").exists():
        return "sweep"
    if (folder / "effects.csv").exists():
        groups = set(_read_csv(folder / "effects.csv")["group"])
        return "fidelity" if groups & {"before -> after", "one change reverted", "AWP vs TRADES"} else "ablation"
    if (folder / "verdicts.csv").exists():
        return "reproduction"
    raise FileNotFoundError(
        f"{folder} holds no study's result files (verdicts.csv, sites_table.csv, effects.csv or paired.csv): pass a "
        "folder written by reproduce, sites, fidelity, ablation or attention, e.g. results/reproduction/cpu"
    )


def _json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def _details(folder: Path) -> Path:
    """The folder of the per-run files: ``all_runs/`` for the studies built on the reproduction's, else itself."""
    return folder / "all_runs" if (folder / "all_runs" / "runs.csv").exists() else folder


def _iv(mean: float, low: float, high: float, scale: float = 1.0, digits: int = 3) -> str:
    return f"{mean * scale:+.{digits}f} [{low * scale:+.{digits}f}, {high * scale:+.{digits}f}]"


def _pm(mean: float, low: float, high: float) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.3f}" if math.isnan(low) else f"{mean:.3f} ± {(high - low) / 2:.3f}"


def _clear_of_zero(low: float, high: float) -> bool:
    return low > 0 or high < 0


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _eps_text(details: Path) -> str:
    profile = _json(details / "profile.json") or {}
    eps = profile.get("base_config", {}).get("eps")
    return format_eps(eps) if eps else "the training eps"


def _metric_labels(details: Path) -> dict[str, str]:
    eps = _eps_text(details)
    return {
        "clean_accuracy": "natural accuracy",
        "pgd10_train_eps": f"PGD-10 @ {eps}",
        "pgd10_8_255": "PGD-10 @ 8/255",
        "ensemble_train_eps": f"ensemble @ {eps}",
        "ensemble_8_255": "ensemble @ 8/255",
        "ood_mean_accuracy": "OOD mean (other site + CAP's 15 corruptions)",
        "corruption_all": "corruptions, all types",
        "corruption_cap15": "corruptions, CAP's 15 types",
        "corruption_ct": "corruptions, CT physics",
    }


def _setup(folder: Path, details: Path) -> list[str]:
    """The setting in a few bullets: data, model, seeds, n, from profile.json and runs.csv."""
    profile = _json(details / "profile.json") or {}
    base = profile.get("base_config", {})
    runs = _read_csv(details / "runs.csv")
    seeds = sorted(runs["seed"].unique().tolist())
    lines = ["## Setting", ""]

    def here(path: str) -> str:  # a path of profile.json (relative to its folder) as seen from this page's folder
        inner = details.relative_to(folder)
        return path if path == "phantom" or Path(path).is_absolute() else os.path.normpath(inner / path)

    data = here(base.get("data", "?"))
    lines.append(f"- data: `{data}`" + (" (relative to this folder)" if data != "phantom" else ""))
    other = [here(d) for d in profile.get("evaluation", {}).get("ood_data") or []]
    if other:
        lines.append("- other site: " + ", ".join(f"`{d}`" for d in other))
    lines.append(
        f"- model: `{base.get('model', '?')}`, {base.get('img_size', '?')} px, {base.get('epochs', '?')} epochs, "
        f"profile `{profile.get('profile', {}).get('name', '?')}`, training eps {_eps_text(details)}"
    )
    lines.append(
        f"- {len(runs)} runs: {runs['name'].nunique()} rows x seeds {', '.join(map(str, seeds))}; test split "
        f"n = {int(runs['test_n'].iloc[0])}"
        + (
            f", attack ensemble on n = {int(runs['ensemble_n'].iloc[0])} of them"
            if "ensemble_n" in runs and runs["ensemble_n"].iloc[0] > 0
            else ""
        )
    )
    lines.append("- checkpoints chosen on the validation split, never on test")
    return lines + [""]


def _provenance(folder: Path, details: Path, study: str) -> list[str]:
    """The commands that produced the folder, the environment and the wall time, from the recorded files."""
    lines = ["## How it was made", ""]
    commands_file = details / "commands.txt"
    if commands_file.exists():
        commands = [line.split("  ")[-1] for line in commands_file.read_text().splitlines() if line.strip()]
        distinct = list(dict.fromkeys(commands))
        lines += [
            f"{len(commands)} call{'s' if len(commands) > 1 else ''} of the study command (a later call reuses "
            "finished runs and resumes interrupted ones), from the repository root:",
            "",
            "```bash",
            *distinct,
            "```",
            "",
        ]
    env = _json(details / "environment.json")
    if env:
        e = env.get("environment", {})
        packages = e.get("packages", {})
        cpu = e.get("cpu_model") or f"{env.get('cpu_count', '?')} CPU cores"
        commit = env.get("git_commit") or "unknown"
        lines.append(
            f"Environment of the last call (`environment.json`): commit {commit[:7]}"
            + (" with uncommitted changes" if env.get("package_changed_since_commit") else "")
            + f", Python {e.get('python', '?')}, torch {packages.get('torch', '?')}, timm {packages.get('timm', '?')}, "
            f"device {e.get('device_name', '?')} ({cpu}, {e.get('torch_threads', '?')} threads), "
            f"recorded {str(env.get('recorded', '?'))[:10]}."
        )
    timings = _json(details / "timings.json")
    if timings:
        minutes = [t["total_minutes"] for t in timings]
        lines.append(
            f"Wall time (`timings.json`): {sum(minutes):.1f} minutes"
            + (f" over {len(minutes)} calls ({', '.join(f'{m:.1f}' for m in minutes)})." if len(minutes) > 1 else ".")
        )
    lines += [
        "",
        "This page is generated from the files beside it. After a study call the command rewrites it; "
        "to write it again from the committed files alone:",
        "",
        "```bash",
        f"python -m robustmed_lite results writeup {_repository_location(folder, study).as_posix()}",
        "```",
        "",
    ]
    return lines


def _read_csv(path, **kwargs) -> pd.DataFrame:
    """A result table; an empty file (no row to write, e.g. no gain in an ERM-only study) is an empty table."""
    try:
        return pd.read_csv(path, **kwargs)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


def _files(folder: Path) -> list[str]:
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != "README.md")
    return ["## Files", "", ", ".join(f"[`{n}`]({n})" for n in names), ""]


# ---------------------------------------------------------------------------------------------------------------
# One page per study


def _sweep(folder: Path) -> list[str]:
    runs, choice = _read_csv(folder / "runs.csv"), _read_csv(folder / "choice.csv")
    profile = _json(folder / "profile.json") or {}
    base = profile.get("base_config", {})
    seeds = ", ".join(str(s) for s in sorted(runs["seed"].unique()))
    lines = [
        "## Setting",
        "",
        f"- data: `{base.get('data', '?')}`" + (" (relative to this folder)" if base.get("data") != "phantom" else ""),
        f"- model: `{base.get('model', '?')}`, {base.get('img_size', '?')} px, {base.get('epochs', '?')} epochs, "
        f"profile `{profile.get('profile', {}).get('name', '?')}`, training eps {_eps_text(folder)}",
        f"- {len(runs)} runs: {runs['method'].nunique()} methods x {runs['gamma'].nunique()} values x seeds {seeds}",
        "- every number below is on the validation split; the test split chooses nothing",
        "",
        "## Validation accuracy per value",
        "",
        "Mean [95% t-interval] over seeds, at each run's validation-chosen checkpoint.",
        "",
    ]
    rows = []
    for _, r in choice.iterrows():
        rows.append(
            [
                f"`{r['method']}`",
                f"{r['gamma']:g}" + (" (published)" if r["published"] else ""),
                f"{r['val_robust_mean']:.3f} [{r['val_robust_ci_low']:.3f}, {r['val_robust_ci_high']:.3f}]",
                f"{r['val_clean_mean']:.3f} [{r['val_clean_ci_low']:.3f}, {r['val_clean_ci_high']:.3f}]",
                "**chosen**" if r["chosen"] else "",
            ]
        )
    lines += _table(["method", "gamma", "validation PGD accuracy", "validation clean accuracy", ""], rows)
    lines += ["", "## What the numbers say", ""]
    for method, group in choice.groupby("method", sort=False):
        chosen = group[group["chosen"]].iloc[0]
        published = group[group["published"]].iloc[0]
        others = group[~group["chosen"]]
        if chosen[["val_robust_ci_low", "val_robust_ci_high"]].isna().any():
            noise = "one seed gives no interval, so the choice cannot be told from seed noise."
        elif all(
            o["val_robust_ci_low"] <= chosen["val_robust_ci_high"]
            and chosen["val_robust_ci_low"] <= o["val_robust_ci_high"]
            for _, o in others.iterrows()
        ):
            noise = "its interval overlaps every other value's, so the choice is not clear of seed noise."
        else:
            noise = "its interval is clear of at least one other value's."
        lines.append(
            f"- `{method}`: validation chose gamma {chosen['gamma']:g}"
            + (" (its published value)" if chosen["published"] else f" (published: {published['gamma']:g})")
            + f"; {noise}"
        )
    return lines + [""]


def _reproduction(folder: Path) -> list[str]:
    table = _read_csv(folder / "table.csv")
    verdicts = _read_csv(folder / "verdicts.csv")
    gains = _read_csv(folder / "gains.csv")
    runs = _read_csv(folder / "runs.csv")
    labels = _metric_labels(folder)
    names = list(dict.fromkeys(table["name"]))
    domains = [d for d in str(runs["domains"].iloc[0]).split(",") if d and d != "nan"]
    metrics = ["clean_accuracy", "ensemble_train_eps", "ensemble_8_255", "corruption_cap15", "corruption_ct"]
    metrics += [f"{d}_balanced_accuracy" for d in domains]
    for d in domains:
        labels[f"{d}_balanced_accuracy"] = f"{d} (n = {int(runs[f'{d}_n'].iloc[0])}), balanced accuracy"
    lines = [
        "## The main table",
        "",
        "Mean ± half-width of the 95% t-interval over seeds (every metric and row: [`table.md`](table.md)).",
        "",
    ]
    rows = []
    for metric in metrics:
        cells = []
        for name in names:
            r = table[(table["name"] == name) & (table["metric"] == metric)]
            cells.append("n/a" if r.empty else _pm(r["mean"].iloc[0], r["ci_low"].iloc[0], r["ci_high"].iloc[0]))
        rows.append([labels.get(metric, metric), *cells])
    lines += _table(["", *(METHOD_LABELS.get(n, f"`{n}`") for n in names)], rows) + [""]
    if verdicts.empty:  # no row of the method beside a prior one: nothing to judge
        lines += ["## The paper's claims", "", "Not judged: the study has no row of the method beside a prior one.", ""]
    else:
        lines += ["## The paper's claims", "", verdicts["rule"].iloc[0], ""]
        power = "mde" in verdicts  # studies before the minimum detectable effect have no such column
        rows = [
            [
                v["claim"],
                f"{v['comparator']} ({METHOD_LABELS.get(v['comparator_method'], v['comparator_method'])})"
                + (f", chosen on {v['chosen_on']}" if power else ""),
                _iv(v["gain_mean"], v["gain_ci_low"], v["gain_ci_high"]),
                str(int(v["n_pairs"])),
                *([f"{v['mde'] * 100:.1f} points"] if power else []),
                f"**{v['verdict']}**",
            ]
            for _, v in verdicts.iterrows()
        ]
        header = ["claim", "comparator", "paired gain (95% CI)", "seed pairs"]
        header += ["smallest gain it could detect (80% power)"] if power else []
        lines += _table([*header, "verdict"], rows) + [""]
        lines += ["## What the numbers say", ""]
        for _, v in verdicts[verdicts["primary"]].iterrows():
            lines.append(
                f"- {v['claim']}: the method's paired gain over the {v['comparator']} "
                f"({METHOD_LABELS.get(v['comparator_method'], v['comparator_method'])}) is "
                f"{_iv(v['gain_mean'], v['gain_ci_low'], v['gain_ci_high'], 100, 1)} points over "
                f"{int(v['n_pairs'])} seeds: **{v['verdict']}**."
            )
        clear = gains[
            gains["metric"].isin(metrics)
            & (gains["comparator"] == "best prior defence")
            & ((gains["gain_ci_low"] > 0) | (gains["gain_ci_high"] < 0))
        ]
        for _, g in clear.iterrows():
            direction = "better" if g["gain_mean"] > 0 else "worse"
            lines.append(
                f"- On {labels.get(g['metric'], g['metric'])} the method is {direction} than the best prior defence "
                f"({METHOD_LABELS.get(g['best_prior'], g['best_prior'])}): "
                f"{_iv(g['gain_mean'], g['gain_ci_low'], g['gain_ci_high'])}."
            )
    lines += ["## What the data say", ""] if verdicts.empty else []
    for d in domains:
        ba = runs.groupby("name")[f"{d}_balanced_accuracy"].mean()
        auc = runs.groupby("name")[f"{d}_auc"].mean()
        chance = "below" if ba.max() < 0.5 else ("at most near" if ba.max() < 0.55 else "above")
        lines.append(
            f"- On {d} the rows' mean balanced accuracy lies between {ba.min():.3f} and {ba.max():.3f} "
            f"({chance} chance, 0.5) and their AUC between {auc.min():.3f} and {auc.max():.3f}."
        )
    check = folder / "ensemble_check.csv"
    if check.exists():
        c = _read_csv(check)
        ok = bool(c["ensemble_at_least_as_strong"].all())
        lines.append(
            f"- The attack ensemble on {c['run'].iloc[0]} (`ensemble_check.csv`, n = {int(c['n'].iloc[0])}) is "
            + ("at least as strong as each of its members alone." if ok else "weaker than one of its members.")
        )
    return lines + [""] + _variant_rows(runs, labels, [*metrics[:3], "ood_mean_accuracy"])


def _variant_rows(runs: pd.DataFrame, labels: dict, metrics: list[str]) -> list[str]:
    """Each variant row (a method at other settings, ``reproduce --variant``) against its method at the published
    settings, paired by seed. The verdicts above never read a variant: the comparators are the methods."""
    variants = [n for n in dict.fromkeys(runs["name"]) if n not in METHODS]
    if not variants:
        return []
    lines = [
        "## Rows at other settings",
        "",
        "A row named `<method>+<suffix>` is that method with the settings the study command's `--variant` gave it "
        "(see the commands below), for example the value a validation sweep chose. The comparators and verdicts "
        "above read only the methods at their published settings. Each variant against its method, paired by "
        "seed (variant minus method, 95% t-interval):",
        "",
    ]
    rows = []
    for name in variants:
        method = str(runs.loc[runs["name"] == name, "method"].iloc[0])
        gains = [paired_gain(runs, name, method, metric) for metric in metrics]
        cells = [_iv(g["gain_mean"], g["gain_ci_low"], g["gain_ci_high"]) if g else "n/a" for g in gains]
        pairs = max((g["n_pairs"] for g in gains if g), default=0)
        rows.append([f"`{name}` − {METHOD_LABELS.get(method, method)}", str(pairs), *cells])
    return lines + _table(["rows", "seed pairs", *(labels.get(m, m) for m in metrics)], rows) + [""]


def _site_label(method: str, component: str) -> str:
    if component.startswith("best: "):
        return f"{METHOD_LABELS.get(method, method)}, best ({component[6:].replace('+', ' + ')})"
    return METHOD_LABELS.get(method, method) + COMPONENT_LABELS.get(component, f" + {component}")


def _sites(folder: Path) -> list[str]:
    table = _read_csv(folder / "sites_table.csv")
    goal = _read_csv(folder / "goal.csv")
    choice = _read_csv(folder / "best_choice.csv")
    best = _json(folder / "best.json") or {}
    gains = _read_csv(folder / "component_gains.csv")
    method_gains = _read_csv(folder / "method_gains.csv")
    shortcuts = _read_csv(folder / "shortcut_tests.csv")
    adaptations = ["none", "adabn", "tent"]
    test = table[(table["split"] == "test") & (table["metric"] == "balanced_accuracy")]
    n_target = shortcuts[shortcuts["domain"] == "target test"]["n_images"]
    n_text = f", n = {int(n_target.iloc[0])}" if len(n_target) else ""
    lines = [
        "## The main table",
        "",
        f"The target's test split{n_text}; balanced accuracy, mean ± half-width of the 95% t-interval over "
        f"{int(test['n_seeds'].max())} seeds, without and with test-time adaptation.",
        "",
    ]
    rows = []
    for (method, component), part in test.groupby(["method", "component"], sort=False):
        cells = []
        for adaptation in adaptations:
            r = part[part["adaptation"] == adaptation]
            cells.append("n/a" if r.empty else _pm(r["mean"].iloc[0], r["ci_low"].iloc[0], r["ci_high"].iloc[0]))
        rows.append([_site_label(method, component), *cells])
    lines += _table(["", "no adaptation", "AdaBN", "TENT"], rows) + [""]

    plain = choice[choice["adaptation"] == "none"].set_index("component")
    kept = best.get("components", [])
    lines += ["## What the numbers say", ""]
    n_pairs = int(choice["n_pairs"].iloc[0])
    gain_texts = [f"{c} {plain.loc[c, 'val_gain_mean']:+.3f}" for c in plain.index if c not in ("baseline", "multi")]
    adapt_texts = [
        f"{a} {g:+.3f}"
        for a, g in choice[(choice["component"] == "baseline") & (choice["adaptation"] != "none")][
            ["adaptation", "val_gain_mean"]
        ].itertuples(index=False)
    ]
    lines.append(
        f"- The choice, on the target's validation split (mean paired gain over the baseline, {n_pairs} pairs over "
        f"{', '.join(best.get('screened_on', []))}): {', '.join(gain_texts)}; test-time adaptation of the plain "
        f"models {', '.join(adapt_texts)}. Kept: {' + '.join(kept) or 'nothing'}, adaptation "
        f"{best.get('adaptation', 'none')}."
    )
    reached = goal[goal["reached"].astype(str) == "True"]
    goal_value = float(goal["goal"].iloc[0])
    lines.append(
        f"- The goal of {goal_value:.2f} (best combination, target test split) is "
        + (
            "reached by " + ", ".join(METHOD_LABELS.get(m, m) for m in reached["method"])
            if len(reached)
            else "**not reached** by any method"
        )
        + ": "
        + ", ".join(
            f"{METHOD_LABELS.get(g['method'], g['method'])} {g['mean']:.3f} [{g['ci_low']:.3f}, {g['ci_high']:.3f}]"
            for _, g in goal.iterrows()
        )
        + "."
    )
    test_gains = gains[
        (gains["split"] == "test") & (gains["adaptation"] == "none") & (gains["metric"] == "balanced_accuracy")
    ]
    for component, part in test_gains.groupby("component", sort=False):
        texts = [
            f"{METHOD_LABELS.get(g['method'], g['method'])} {_iv(g['gain_mean'], g['gain_ci_low'], g['gain_ci_high'])}"
            for _, g in part.iterrows()
        ]
        n_clear = sum(_clear_of_zero(g["gain_ci_low"], g["gain_ci_high"]) for _, g in part.iterrows())
        summary = "every interval contains 0" if n_clear == 0 else f"{n_clear} of {len(part)} intervals clear of 0"
        label = (
            f"the chosen combination ({component[6:].replace('+', ' + ')})"
            if component.startswith("best: ")
            else COMPONENT_LABELS.get(component, f" + {component}").removeprefix(" + ")
        )
        lines.append(f"- Gain of {label} on the test split ({summary}): {'; '.join(texts)}.")
    ours = method_gains[
        (method_gains["split"] == "test")
        & (method_gains["adaptation"] == "none")
        & (method_gains["metric"] == "balanced_accuracy")
    ]
    for comparator, part in ours.groupby("comparator", sort=False):
        clear = part[(part["gain_ci_low"] > 0) | (part["gain_ci_high"] < 0)]
        detail = "; ".join(
            f"{_site_label('robustmed', r['component'])} {_iv(r['gain_mean'], r['gain_ci_low'], r['gain_ci_high'])}"
            for _, r in clear.iterrows()
        )
        lines.append(
            f"- The method against {METHOD_LABELS.get(comparator, comparator)} on the target's test split: the "
            f"paired interval contains 0 under {len(part) - len(clear)} of {len(part)} fixes"
            + (f" (clear of 0: {detail})" if len(clear) else "")
            + "."
        )
    robust = method_gains[method_gains["metric"] == "pgd10_train_eps"]
    for comparator, part in robust.groupby("comparator", sort=False):
        lines.append(
            f"- PGD-10 accuracy on the source test split, the method minus "
            f"{METHOD_LABELS.get(comparator, comparator)}: {part['gain_mean'].min():+.3f} to "
            f"{part['gain_mean'].max():+.3f} over the fixes."
        )
    source = shortcuts[(shortcuts["domain"] == "source test") & (shortcuts["metric"] == "accuracy")].set_index("test")
    if "no_lungs" in source.index and "lungs and all" in source.index:
        s = source.loc["no_lungs"]
        lines.append(
            f"- Shortcut test: ERM trained and tested on source slices without their lungs reaches "
            f"{s['mean']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}] accuracy on the source test split, against "
            f"{source.loc['lungs and all', 'mean']:.3f} with them"
            + (
                ": clear of chance (0.5), so the source labels are largely predictable from outside the lungs, a "
                "cue that need not travel to another site."
                if s["ci_low"] > 0.5
                else "."
            )
        )
    lines += ["", "## Shortcut tests (ERM)", ""]
    rows = [
        [
            r["test"],
            r["domain"],
            r["metric"].replace("_", " "),
            _pm(r["mean"], r["ci_low"], r["ci_high"]),
            str(int(r["n_images"])),
        ]
        for _, r in shortcuts.iterrows()
    ]
    lines += _table(["slices", "split", "metric", "mean ± half-width", "n"], rows) + [""]
    return lines


def _effects(folder: Path, study: str) -> list[str]:
    effects = _read_csv(folder / "effects.csv")
    details = _details(folder)
    labels = _metric_labels(details)
    metrics = list(dict.fromkeys(effects["metric"]))
    row_labels = ABLATION_LABELS if study == "ablation" else FIDELITY_LABELS

    def label(row: str, reference: str, group: str) -> str:
        if row in row_labels:
            return row_labels[row]
        if group == "before -> after":
            return f"`{row}` after - before"
        return f"`{row}` - `{reference}`"

    keys = list(dict.fromkeys(zip(effects["group"], effects["row"], effects["reference"])))
    n_pairs = sorted(set(effects["n_pairs"].astype(int)))
    lines = [
        "## The main table",
        "",
        f"Paired per-seed differences, row minus reference, mean [95% t-interval], n = "
        f"{', '.join(map(str, n_pairs))} seed pairs"
        + (" (a positive number: higher without the part)" if study == "ablation" else "")
        + ".",
        "",
    ]
    rows = []
    for group, row, reference in keys:
        cells = []
        for metric in metrics:
            e = effects[(effects["row"] == row) & (effects["reference"] == reference) & (effects["metric"] == metric)]
            cells.append(
                "n/a" if e.empty else _iv(e["gain_mean"].iloc[0], e["gain_ci_low"].iloc[0], e["gain_ci_high"].iloc[0])
            )
        rows.append([label(row, reference, group), *cells])
    lines += _table(["comparison", *(labels.get(m, m) for m in metrics)], rows) + [""]
    lines += ["## What the numbers say", ""]
    clear = effects[(effects["gain_ci_low"] > 0) | (effects["gain_ci_high"] < 0)]
    if clear.empty:
        lines.append(
            f"- No interval excludes zero: over {len(effects)} effects, nothing measured here is beyond seed noise."
        )
    else:
        lines.append(
            f"- {len(clear)} of {len(effects)} intervals exclude zero: "
            + "; ".join(
                f"{label(e['row'], e['reference'], e['group'])}, {labels.get(e['metric'], e['metric'])}: "
                f"{_iv(e['gain_mean'], e['gain_ci_low'], e['gain_ci_high'])}"
                for _, e in clear.iterrows()
            )
            + ". Every other interval contains zero."
        )
    runs = _read_csv(details / "runs.csv")
    if "ensemble_train_eps" in runs:
        means = runs.groupby("name")["ensemble_train_eps"].mean().drop("erm", errors="ignore")
        reference = "robustmed"
        if study == "ablation" and reference in means:
            others = means.drop(reference)
            rank = (
                "the lowest"
                if means.idxmin() == reference
                else "the highest"
                if means.idxmax() == reference
                else "neither the lowest nor the highest"
            )
            lines.append(
                f"- Mean {labels['ensemble_train_eps']} accuracy: the full method {means[reference]:.3f}, the variants "
                f"{others.min():.3f}-{others.max():.3f}; of the {len(means)} the full method has {rank}."
            )
        elif study == "fidelity":
            lines.append(
                f"- Mean {labels['ensemble_train_eps']} accuracy per row ranges from {means.min():.3f} "
                f"({means.idxmin()}) to {means.max():.3f} ({means.idxmax()})."
            )
    return lines + [""]


def _attention(folder: Path) -> list[str]:
    runs, summary, pairs = (_read_csv(folder / f) for f in ("runs.csv", "summary.csv", "paired.csv"))
    profile = _json(folder / "profile.json") or {}
    base = profile.get("base_config", {})
    names = [n for n in dict.fromkeys(summary["name"]) if n != "untrained"]
    maps = list(dict.fromkeys(summary["map"]))
    n_runs = len(runs[["name", "seed"]].drop_duplicates())
    seeds = ", ".join(str(s) for s in sorted(runs["seed"].unique()))
    first = runs.drop_duplicates(["name", "seed"])
    n_slices, n_empty = int(first["n_slices"].iloc[0]), int(first["n_empty_mask"].iloc[0])
    same = runs["test_split"].nunique() == 1
    run_dirs = [r["run_dir"] for r in profile.get("runs", [])]
    label = {**METHOD_LABELS, "untrained": "untrained"}
    lines = [
        "## Setting",
        "",
        f"- data: `{base.get('data', '?')}`, runs: `{os.path.dirname(run_dirs[0]) if run_dirs else '?'}` (relative "
        "to this folder)",
        f"- model: `{base.get('model', '?')}`, {base.get('img_size', '?')} px, {base.get('epochs', '?')} epochs, "
        f"profile `{profile.get('profile', {}).get('name', '?')}`",
        f"- {n_runs} runs: {len(names)} methods x seeds {seeds}; checkpoints chosen on validation (ERM: best clean, "
        "others: best PGD)",
        f"- each run's own test split, n = {n_slices} slices"
        + (" (the same slices for every run: the comparisons are paired)" if same else " (not the same for every run)"),
        f"- lung masks **estimated** (`prior.lung_mask`); {n_empty} of {n_slices} slices "
        f"({n_empty / n_slices:.1%}) get no mask and are left out of the ratios",
        "- maps: " + ", ".join(maps),
        "",
        "## Lung-attention ratio per method",
        "",
        "The share of each map's mass inside the estimated lungs, mean ± half-width of the 95% t-interval over seeds; "
        "a uniform map scores the lungs' area, an untrained model (one random init) is the second baseline.",
        "",
    ]
    rows = []
    for m in maps:
        part = summary[summary["map"] == m].set_index("name")
        cells = [
            "n/a"
            if n not in part.index
            else _pm(
                part.loc[n, "lung_ratio_mean"], part.loc[n, "lung_ratio_ci_low"], part.loc[n, "lung_ratio_ci_high"]
            )
            for n in [*names, "untrained"]
        ]
        rows.append([m, *cells, f"{part['lung_area_mean'].mean():.3f}"])
    lines += _table(["map", *(label.get(n, f"`{n}`") for n in names), "untrained", "uniform map"], rows) + [""]
    lines += [
        "## The method against each other method",
        "",
        "Paired per-seed differences of the lung ratio, the method minus the comparator, mean [95% t-interval], and "
        "the smallest mean difference the study could detect with 80% power (`stats.minimum_detectable_effect`).",
        "",
    ]
    rows = [
        [
            p["map"],
            label.get(p["comparator"], p["comparator"]),
            _iv(p["diff_mean"], p["diff_ci_low"], p["diff_ci_high"]),
            str(int(p["n_pairs"])),
            f"{p['mde']:.3f}",
        ]
        for _, p in pairs.iterrows()
    ]
    lines += _table(["map", "comparator", "the method minus it", "seed pairs", "detectable (80% power)"], rows)
    lines += ["", "## What the numbers say", ""]
    trained = summary[summary["name"] != "untrained"]
    excess = trained["lung_ratio_mean"] - trained["lung_area_mean"]
    top = trained.loc[excess.idxmax()]
    above = trained[trained["lung_ratio_ci_low"] > trained["lung_area_mean"]]
    lines.append(
        f"- Against a uniform map ({trained['lung_area_mean'].mean():.3f}): the trained models' mean ratios lie "
        f"between {trained['lung_ratio_mean'].min():.3f} and {trained['lung_ratio_mean'].max():.3f}; "
        f"{len(above)} of {len(trained)} method-and-map intervals lie above it; the largest excess is "
        f"{excess.max():+.3f} ({label.get(top['name'], top['name'])}, {top['map']})."
    )
    for comparator, part in pairs.groupby("comparator", sort=False):
        clear = part[(part["diff_ci_low"] > 0) | (part["diff_ci_high"] < 0)]
        detail = "; ".join(
            f"{r['map']} {_iv(r['diff_mean'], r['diff_ci_low'], r['diff_ci_high'])}" for _, r in clear.iterrows()
        )
        lines.append(
            f"- The method minus {label.get(comparator, comparator)}: {len(clear)} of {len(part)} intervals "
            + ("excludes" if len(clear) == 1 else "exclude")
            + " zero"
            + (f" ({detail})" if len(clear) else "")
            + f"; differences from {part['diff_mean'].min():+.3f} to "
            f"{part['diff_mean'].max():+.3f}, detectable at 80% power from {part['mde'].min():.3f} to "
            f"{part['mde'].max():.3f}."
        )
    blank = summary[summary["name"] == "untrained"].set_index("map")
    if len(blank):
        beaten = [
            m
            for m in maps
            if m in blank.index
            and (trained[trained["map"] == m]["lung_ratio_mean"] > blank.loc[m, "lung_ratio_mean"]).all()
        ]
        lines.append(
            f"- The untrained model scores {blank['lung_ratio_mean'].min():.3f} to "
            f"{blank['lung_ratio_mean'].max():.3f}; "
            f"every trained method is above it on {len(beaten)} of {len(blank)} maps"
            + (f" ({', '.join(beaten)})." if beaten else ".")
        )
    return lines + [""]


def writeup(folder: str | Path, study: str | None = None) -> str:
    """The Markdown of a study folder's README.md, from its files alone.

    Args:
        folder: A study folder, e.g. ``results/reproduction/cpu``.
        study: ``reproduction``, ``sites``, ``fidelity`` or ``ablation`` (default: found from the files).
    """
    folder = Path(folder)
    study = study or study_of(folder)
    details = _details(folder)
    location = _repository_location(folder, study).as_posix()
    titles = {
        "reproduction": "Reproduction of the paper's comparison",
        "sweep": "Weight-noise scale chosen on validation",
        "sites": "Cross-site study",
        "fidelity": "Fidelity to CAP's code",
        "ablation": "Ablation of the method",
        "attention": "Where the reproduction's models look",
    }
    lines = [GENERATED.format(folder=location), "", f"# {titles[study]}: `{folder.name}`", "", ABOUT[study], ""]
    if study == "sweep":
        lines += _sweep(folder)
    elif study == "attention":
        lines += _attention(folder)
    else:
        lines += _setup(folder, details)
    if study == "reproduction":
        lines += _reproduction(folder)
    elif study == "sites":
        lines += _sites(folder)
    elif study not in ("sweep", "attention"):
        lines += _effects(folder, study)
    lines += _provenance(folder, details, study)
    lines += _files(folder)
    return "\n".join(lines).rstrip("\n") + "\n"


def write_writeup(folder: str | Path, study: str | None = None, machine_folder: str | Path | None = None) -> Path:
    """Makes ``folder``'s result files portable (``portable_paths``) and writes its ``README.md``.

    Returns:
        The path of the README written.
    """
    folder = Path(folder)
    study = study or study_of(folder)
    portable_paths(folder, machine_folder, study)
    path = folder / "README.md"
    path.write_text(writeup(folder, study))
    return path


def study_folders(root: str | Path = "results") -> list[Path]:
    """Every study folder under ``root`` (``results/<study>/<profile>``), in order of ``STUDIES``."""
    root = Path(root)
    return [f for s in STUDIES for f in sorted((root / s).glob("*")) if f.is_dir()]


INDEX_INTRO = (
    "Committed results of the studies. Each folder's README.md is written by the study's own command from "
    "the folder's result files (CSV, JSON), so its numbers cannot drift from them; "
    "`python -m robustmed_lite results writeup` writes them all again from the committed files. Run folders "
    "and data in the files are relative to the folder that holds the file. Intervals are 95% t-intervals over "
    "seeds: with three seeds they are wide, so treat an effect near zero from three seeds as unsettled (the "
    "second cross-site folder, with five seeds, shows how a three-seed interval can move)."
)


def write_index(root: str | Path = "results") -> Path:
    """``results/README.md``: one line per study folder, linking its write-up."""
    root = Path(root)
    lines = ["# Results", "", INDEX_INTRO, ""]
    rows = []
    for folder in study_folders(root):
        study = study_of(folder)
        details = _details(folder)
        runs = _read_csv(details / "runs.csv")
        data = (_json(details / "profile.json") or {}).get("base_config", {}).get("data", "?")
        rows.append(
            [
                f"[{folder.relative_to(root).as_posix()}]({folder.relative_to(root).as_posix()}/README.md)",
                study,
                "phantom" if data == "phantom" else Path(str(data)).name,
                str(len(runs[["name", "seed"]].drop_duplicates())),  # attention: a row per run and map
                ", ".join(map(str, sorted(runs["seed"].unique()))),
            ]
        )
    lines += _table(["folder", "study", "training data", "runs", "seeds"], rows)
    path = root / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path
