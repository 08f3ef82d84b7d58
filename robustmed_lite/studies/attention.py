"""Where the reproduction's models look on real CT: the lung-attention ratio of every trained run's saliency maps
on its own held-out test split.

    python -m robustmed_lite attention --profile cpu     # runs/reproduction/cpu -> results/attention/cpu

Nothing is trained. Each run of the reproduction (``<method>-seed<k>`` under ``--runs``, finished training) is
opened at its validation-chosen checkpoint (``checkpoints.selected_checkpoint_name``), its test split is rebuilt
from its config as the reproduction scores it, and the maps of ``MAPS`` are drawn in eval mode on inputs in
[0, 1]: the attention each position receives and Grad-CAM at Visformer's stages 2 and 3, and the input gradient
(Grad-CAM and the input gradient explain the predicted class). The score of a map is its share of mass inside
the lungs (``saliency.mass_ratio``). Real CT has no lung masks: the mask is ``prior.lung_mask``, the dark region
inside the body, an **estimate**; a slice where it finds nothing has no ratio and is counted, not averaged.

Baselines: the mask's area (a uniform map's ratio) and an untrained model of the same architecture (random init,
seed ``UNTRAINED_SEED``). Over seeds: mean and 95% t-interval per method and map, and the paired per-seed
difference ``robustmed`` minus each other method with its 95% t-interval and the smallest difference the study
could detect at 80% power (``stats.minimum_detectable_effect``).

Writes ``runs.csv`` (per run and map), ``untrained.csv``, ``summary.csv``, ``paired.csv``, ``attention.png``, the
provenance (``environment.json``, ``profile.json``, ``commands.txt``, ``timings.json``) and ``README.md``. Rows of
finished runs are kept in ``runs.partial.csv`` while the study runs; a later call reuses the rows (there or in
``runs.csv``) of every run whose checkpoint file is unchanged (its SHA-1), so an interrupted call resumes and more
seeds add only their own runs.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from ..checkpoints import load_checkpoint, model_from_checkpoint, selected_checkpoint_name
from ..config import DATA_KEYS
from ..evaluation.checkpoint_eval import _evaluation_splits
from ..evaluation.metrics import accuracy
from ..evaluation.saliency import attention_ratios, saliency_maps
from ..evaluation.stats import minimum_detectable_effect, paired_differences, t_interval
from ..method.prior import lung_mask
from ..models import create_model
from ..runinfo import get_device, progress_options
from .plan import PROFILES, build_plan, parse_methods, parse_seeds
from .reproduce import TRAINED, record_provenance, record_timing
from .summary import THE_METHOD
from .writeup import METHOD_LABELS, write_writeup

MAPS = {
    "attention s2": {"method": "attention", "layer": "stage2"},
    "attention s3": {"method": "attention", "layer": "stage3"},
    "Grad-CAM s2": {"method": "gradcam", "layer": "stage2"},
    "Grad-CAM s3": {"method": "gradcam", "layer": "stage3"},
    "input gradient": {"method": "input_grad"},
}
DEFAULT_METHODS = ("erm", "trades", "awp", "cap", "robustmed")
UNTRAINED = "untrained"
UNTRAINED_SEED = 0
PARTIAL = "runs.partial.csv"


def found_seeds(runs_root: Path, methods) -> tuple[int, ...]:
    """The seeds for which every method has a run that finished training (``trained.json``)."""
    per_method = []
    for method in methods:
        pattern = re.compile(rf"{re.escape(method)}-seed(\d+)")
        per_method.append(
            {
                int(m.group(1))
                for p in runs_root.iterdir()
                if (m := pattern.fullmatch(p.name)) and (p / TRAINED).exists()
            }
        )
    return tuple(sorted(set.intersection(*per_method))) if per_method else ()


def check_runs(runs_root: Path, methods, seeds) -> list[tuple[str, int, Path]]:
    """The (method, seed, checkpoint) of every run, with a one-line error naming the path and the fix.

    Raises:
        FileNotFoundError: The runs folder is missing, holds no finished run, or a run lacks its checkpoint.
    """
    if not runs_root.is_dir():
        raise FileNotFoundError(
            f"--runs {runs_root} is not a folder. Fix: pass the reproduction's run folder (python -m robustmed_lite "
            "reproduce --profile cpu trains it into runs/reproduction/cpu)"
        )
    seeds = found_seeds(runs_root, methods) if seeds is None else seeds
    if not seeds:
        raise FileNotFoundError(
            f"{runs_root} holds no seed with a finished run of every method ({', '.join(methods)}). Fix: train them "
            f"with python -m robustmed_lite reproduce --methods {','.join(methods)}, or choose --methods"
        )
    found = []
    for seed in seeds:
        for method in methods:
            run_dir = runs_root / f"{method}-seed{seed}"
            checkpoint = run_dir / selected_checkpoint_name(method)
            if not (run_dir / TRAINED).exists() or not checkpoint.exists():
                missing = checkpoint if (run_dir / TRAINED).exists() else run_dir / TRAINED
                raise FileNotFoundError(
                    f"{missing} does not exist: run {run_dir.name} has not finished training. Fix: finish it with "
                    "python -m robustmed_lite reproduce (same --profile, --methods and --seeds), or leave seed "
                    f"{seed} out of --seeds"
                )
            found.append((method, seed, checkpoint))
    return found


def _split_key(cfg) -> str:
    values = cfg.to_dict()
    return json.dumps({k: values.get(k) for k in (*DATA_KEYS, "n_val", "n_train", "duplicates")}, sort_keys=True)


def _digest(x: torch.Tensor, y: torch.Tensor) -> str:
    h = hashlib.sha1(x.numpy().tobytes())
    h.update(y.numpy().tobytes())
    return h.hexdigest()[:10]


def map_rows(model, x, y, masks, batch_size: int = 64) -> list[dict]:
    """Per map of ``MAPS``: slices, how many have no lung estimate, the mean lung ratio and the mean lung area
    (both over the slices with a mask) and the model's accuracy on the slices."""
    maps = saliency_maps({"model": model}, x, MAPS, batch_size=batch_size)
    ratios = attention_ratios(maps, masks, labels=y)
    acc = accuracy(model, x, y)
    rows = []
    for label in MAPS:
        r = ratios[ratios["method"] == label]
        valid = r["lung_ratio"].notna()
        rows.append(
            {
                "map": label,
                "n_slices": len(r),
                "n_ratio": int(valid.sum()),
                "n_empty_mask": int((r["lung_area"] == 0).sum()),
                "share_empty_mask": float((r["lung_area"] == 0).mean()),
                "lung_ratio": float(r.loc[valid, "lung_ratio"].mean()),
                "lung_area": float(r.loc[valid, "lung_area"].mean()),
                "excess": float((r.loc[valid, "lung_ratio"] - r.loc[valid, "lung_area"]).mean()),
                "test_accuracy": acc,
            }
        )
    return rows


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    """Per row (``name``) and map: the mean and 95% t-interval over seeds of the lung ratio and of its excess
    over the lung area, the mean lung area and the mean share of slices without a lung estimate."""
    rows = []
    for (name, label), group in runs.groupby(["name", "map"], sort=False):
        ratio, excess = t_interval(group["lung_ratio"]), t_interval(group["excess"])
        rows.append(
            {
                "name": name,
                "map": label,
                "n_seeds": ratio.n,
                "n_slices": int(group["n_slices"].iloc[0]),
                "lung_ratio_mean": ratio.mean,
                "lung_ratio_ci_low": ratio.low,
                "lung_ratio_ci_high": ratio.high,
                "lung_area_mean": float(group["lung_area"].mean()),
                "excess_mean": excess.mean,
                "excess_ci_low": excess.low,
                "excess_ci_high": excess.high,
                "share_empty_mask": float(group["share_empty_mask"].mean()),
                "test_accuracy_mean": float(group["test_accuracy"].mean()),
            }
        )
    return pd.DataFrame(rows)


def paired(runs: pd.DataFrame, reference: str = THE_METHOD, column: str = "lung_ratio") -> pd.DataFrame:
    """Per map and other row: the paired per-seed difference ``reference`` minus that row of ``column``, its 95%
    t-interval, the spread of the differences and the smallest mean difference detectable at 80% power."""
    rows = []
    names = [n for n in dict.fromkeys(runs["name"]) if n != reference]
    for label, group in runs.groupby("map", sort=False):
        mine = group[group["name"] == reference]
        if mine.empty:
            continue
        for name in names:
            other = group[group["name"] == name]
            if other.empty:
                continue
            d = paired_differences(dict(zip(mine["seed"], mine[column])), dict(zip(other["seed"], other[column])))
            iv = t_interval(list(d.values()))
            rows.append(
                {
                    "map": label,
                    "reference": reference,
                    "comparator": name,
                    "metric": column,
                    "n_pairs": iv.n,
                    "diff_mean": iv.mean,
                    "diff_ci_low": iv.low,
                    "diff_ci_high": iv.high,
                    "diff_sd": iv.std,
                    "mde": minimum_detectable_effect(iv.n, iv.std),
                }
            )
    return pd.DataFrame(rows)


def plot_study(summary: pd.DataFrame, title: str | None = None, labels: dict | None = None):
    """Mean lung ratio per map (groups) and method (points, 95% t-interval over seeds), the untrained model
    (crosses) and a uniform map's ratio, the mask's area (dashed); ``labels`` renames the methods in the legend."""
    import matplotlib.pyplot as plt

    from ..figures import MIN_FONT, PAGE_WIDTH

    labels = list(dict.fromkeys(summary["map"]))
    trained = [n for n in dict.fromkeys(summary["name"]) if n != UNTRAINED]
    fig, ax = plt.subplots(figsize=(PAGE_WIDTH, 3.2), layout="constrained")
    width = 0.8 / max(1, len(trained))
    colours = plt.get_cmap("tab10")
    for i, label in enumerate(labels):
        part = summary[summary["map"] == label].set_index("name")
        area = part["lung_area_mean"].mean()
        ax.hlines(
            area, i - 0.45, i + 0.45, colors="0.3", linestyles="--", lw=1, label="uniform map" if i == 0 else None
        )
        for j, name in enumerate(trained):
            if name not in part.index:
                continue
            r = part.loc[name]
            x = i - 0.4 + width * (j + 0.5)
            err = [[r["lung_ratio_mean"] - r["lung_ratio_ci_low"]], [r["lung_ratio_ci_high"] - r["lung_ratio_mean"]]]
            ax.errorbar(
                x,
                r["lung_ratio_mean"],
                yerr=err,
                fmt="o",
                ms=4,
                capsize=2,
                color=colours(j),
                label=name if i == 0 else None,
            )
        if UNTRAINED in part.index:
            ax.plot(
                i + 0.45,
                part.loc[UNTRAINED, "lung_ratio_mean"],
                "x",
                color="0.2",
                ms=6,
                label="untrained" if i == 0 else None,
            )
    ax.set_xticks(range(len(labels)), labels, fontsize=MIN_FONT)
    ax.set_ylabel("share of the map on the\nestimated lungs", fontsize=MIN_FONT + 1)
    ax.tick_params(axis="y", labelsize=MIN_FONT)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=MIN_FONT, frameon=False, ncols=len(trained) + 2, loc="lower center", bbox_to_anchor=(0.5, 1.0))
    if title:
        ax.set_title(title, fontsize=9, pad=22)
    return fig


def _file_digest(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()[:10]


def _untrained_rows(cfg, x, y, masks, digest: str, device, batch_size: int) -> list[dict]:
    torch.manual_seed(UNTRAINED_SEED)
    blank = create_model(cfg.model, num_classes=2, img_size=cfg.img_size).to(device).eval()
    head = {"name": UNTRAINED, "method": UNTRAINED, "seed": UNTRAINED_SEED, "test_split": digest}
    return [{**head, **r} for r in map_rows(blank, x, y, masks, batch_size)]


def _run_table(found, batch_size: int, progress: bool, cached: pd.DataFrame, partial: Path):
    """The per-run rows (reusing the ``cached`` rows of the same checkpoint file) and the untrained model's rows
    on the test split."""
    device = get_device()
    splits, rows, untrained = {}, [], []
    for method, seed, checkpoint in tqdm(found, desc="attention", unit="run", **progress_options(progress)):
        digest = _file_digest(checkpoint)
        if len(cached):
            kept = cached[(cached["name"] == method) & (cached["seed"] == seed) & (cached["checkpoint_sha1"] == digest)]
            if sorted(kept["map"]) == sorted(MAPS):
                rows += kept.to_dict("records")
                continue
        model, cfg = model_from_checkpoint(checkpoint, device)
        key = _split_key(cfg)
        if key not in splits:
            x, y = _evaluation_splits(cfg).test
            masks = lung_mask(x)
            splits[key] = (x, y, masks, _digest(x, y))
            if not untrained:
                untrained = _untrained_rows(cfg, *splits[key], device, batch_size)
        x, y, masks, split = splits[key]
        head = {
            "name": method,
            "method": method,
            "seed": seed,
            "checkpoint": checkpoint.name,
            "checkpoint_sha1": digest,
            "selected_epoch": int(load_checkpoint(checkpoint)["epoch"]),
            "model": cfg.model,
            "img_size": cfg.img_size,
            "test_split": split,
            "run_dir": str(checkpoint.parent),
        }
        rows += [{**head, **r} for r in map_rows(model, x, y, masks, batch_size)]
        pd.DataFrame(rows).to_csv(partial, index=False)
    if not untrained:  # every run was reused: the baseline still needs the test split
        cfg = model_from_checkpoint(found[0][2])[1]
        x, y = _evaluation_splits(cfg).test
        untrained = _untrained_rows(cfg, x, y, lung_mask(x), _digest(x, y), device, batch_size)
    return pd.DataFrame(rows), pd.DataFrame(untrained)


def run_attention(
    profile: str = "cpu",
    methods=DEFAULT_METHODS,
    seeds=None,
    runs: str | Path | None = None,
    out: str | Path | None = None,
    batch_size: int = 64,
    progress: bool = True,
    command: list[str] | None = None,
) -> dict[str, pd.DataFrame]:
    """Scores every run's maps and writes the study (see the module docstring).

    Args:
        profile: The reproduction profile whose runs are read.
        methods: Rows, comma-separated or a sequence (default: erm, trades, awp, cap, robustmed).
        seeds: Seeds (``"0-9"``); None: every seed with a finished run of every method.
        runs: The reproduction's run folder (default ``runs/reproduction/<profile>``).
        out: Results folder (default ``results/attention/<profile>``).
        batch_size: Images per forward pass.
        progress: A progress bar over the runs.
        command: The command line to record (default ``sys.argv``).

    Returns:
        ``{"runs", "untrained", "summary", "paired"}``, as written.
    """
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}: choose one of {', '.join(PROFILES)}")
    prof = PROFILES[profile]
    methods = parse_methods(methods)
    seeds = None if seeds is None else parse_seeds(seeds)
    runs_root = Path(runs or f"runs/reproduction/{prof.name}").resolve()
    found = check_runs(runs_root, methods, seeds)
    out = Path(out or f"results/attention/{prof.name}")
    clock = {"start": time.time()}
    data = model_from_checkpoint(found[0][2])[1].data
    plan = build_plan(prof, data, methods, sorted({s for _, s, _ in found}), runs_root)
    out.mkdir(parents=True, exist_ok=True)
    record_provenance(out, prof, plan, None, command, (1, 1), 1)
    partial = out / PARTIAL
    previous = [pd.read_csv(f) for f in (out / "runs.csv", partial) if f.exists()]
    cached = pd.concat(previous, ignore_index=True) if previous else pd.DataFrame()
    table, untrained = _run_table(found, batch_size, progress, cached, partial)
    clock["trained"] = clock["corrupted"] = time.time()
    table.to_csv(out / "runs.csv", index=False)
    untrained.to_csv(out / "untrained.csv", index=False)
    summary = summarise(pd.concat([table, untrained], ignore_index=True))
    summary.to_csv(out / "summary.csv", index=False)
    differences = paired(table)
    differences.to_csv(out / "paired.csv", index=False)
    title = f"{len(found)} runs, {int(table['n_slices'].iloc[0])} test slices each: mean and 95% t-interval over seeds"
    fig = plot_study(summary, title=title, labels=METHOD_LABELS)
    fig.savefig(out / "attention.png", dpi=120, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    partial.unlink(missing_ok=True)
    record_timing(out, clock, (1, 1), 1, len(found), len(found))
    write_writeup(out, "attention")
    return {"runs": table, "untrained": untrained, "summary": summary, "paired": differences}
