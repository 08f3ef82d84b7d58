"""A robustness and generalisation report for one trained model, to file with a hospital team or a reviewer.

``build_report(checkpoint, out_dir)`` writes ``report.html`` (one self-contained file: inline CSS and images, no
JavaScript, no network) and ``report.json``. Each metric entry of the JSON has the fields of Google's Model Card
Toolkit (``type``, ``value``, ``slice``, ``threshold``, ``confidence_interval``) plus ``n``. The sections answer
the items of the medical-imaging AI reporting standards that this package can measure (CLAIM 2024, TRIPOD+AI;
the appendix maps them).

Honest by construction: the decision threshold is fixed on the validation split (``choose_threshold`` sees only
validation labels and scores), attacks run in eval mode on inputs in [0,1] with eps as k/255, and every measured
number carries its n and a 95% interval (Wilson for proportions, percentile bootstrap for AUC and ECE). A section
whose input is missing (no external site, no ERM reference, no BatchNorm) is kept and marked "not measured" with
the reason.

Each section's numbers are cached as JSON in ``<out>/cache``, keyed by the checkpoint's SHA-256 and the section's
settings, so an interrupted or repeated report reuses what was measured.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import html
import importlib.util
import io
import json
import math
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy.stats import rankdata
from tqdm.auto import tqdm

from ..checkpoints import load_checkpoint, model_from_checkpoint, selected_checkpoint_name
from ..common import CLASS_NAMES, format_eps, parse_eps
from ..runinfo import environment_info, progress_options

SECTIONS = {
    "provenance": "Provenance",
    "intended_use": "Intended use",
    "data": "Data and partitions",
    "clinical_summary": "Clinical summary",
    "generalisation": "Generalisation across sites",
    "calibration": "Calibration",
    "corruptions": "Corruptions",
    "adversarial": "Adversarial robustness",
    "attention": "Where the model looks",
    "failures": "Failures",
    "limitations": "Limitations",
    "appendix": "Appendix: reporting checklists",
}
NOT_MEASURED = "not measured"
Z95 = 1.959963984540054  # the 97.5% normal quantile
SCHEMA_VERSION = 1

# CLAIM 2024 (Tejani et al., Radiology: AI 2024), TRIPOD+AI (Collins et al., BMJ 2024) and the FDA's 2025 draft
# guidance: what each asks that the report answers (paraphrased, by the part of the paper it belongs to), and the
# section that answers it. Item numbers are left to the published checklists.
CHECKLIST = [
    ("CLAIM 2024", "Introduction / Methods", "Intended use and clinical role of the model", "intended_use"),
    ("CLAIM 2024", "Methods", "Data sources, inclusion and preprocessing", "data"),
    ("CLAIM 2024", "Methods", "How data were partitioned (train / validation / test, patient-level)", "data"),
    (
        "CLAIM 2024",
        "Methods / Results",
        "Metrics of performance with measures of precision (intervals)",
        "clinical_summary",
    ),
    ("CLAIM 2024", "Results", "Robustness or sensitivity analysis", "corruptions"),
    ("CLAIM 2024", "Results", "Robustness to adversarial inputs", "adversarial"),
    ("CLAIM 2024", "Results", "Methods of explainability or interpretability", "attention"),
    ("CLAIM 2024", "Results", "External testing on data from other sites", "generalisation"),
    ("CLAIM 2024", "Results", "Performance per partition, with precision", "generalisation"),
    ("CLAIM 2024", "Results", "Failure analysis of incorrectly classified cases", "failures"),
    ("CLAIM 2024", "Discussion", "Limitations, potential bias and generalisability", "limitations"),
    ("CLAIM 2024", "Other information", "Software, model and code availability; provenance", "provenance"),
    ("TRIPOD+AI", "Introduction / Methods", "Intended use of the model", "intended_use"),
    ("TRIPOD+AI", "Methods", "Data sources and settings (centres)", "data"),
    ("TRIPOD+AI", "Methods / Results", "Decision threshold and how it was chosen", "clinical_summary"),
    ("TRIPOD+AI", "Results", "Calibration measures", "calibration"),
    ("TRIPOD+AI", "Results", "Performance across centres with intervals", "generalisation"),
    ("TRIPOD+AI", "Results", "Handling of poor-quality or corrupted input", "corruptions"),
    ("TRIPOD+AI", "Results", "Performance in key subgroups (sites)", "generalisation"),
    ("TRIPOD+AI", "Discussion", "Limitations and applicability", "limitations"),
    ("TRIPOD+AI", "Other information", "Model and code availability", "provenance"),
    (
        "FDA draft 2025",
        "Discussion",
        "Performance on independent data; known limitations; adversarial risks",
        "limitations",
    ),
]


# ------------------------------------------------------------------------------------------------ statistics
def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n`` (NaNs for ``n = 0``)."""
    if n == 0:
        return math.nan, math.nan
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def auc_score(labels, scores) -> float:
    """Area under the ROC curve (Mann-Whitney, ties counted a half); NaN without both classes."""
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int((labels == 1).sum()), int((labels == 0).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(scores)
    return float((ranks[labels == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def bootstrap_interval(
    statistic: Callable[..., float], *arrays, n_boot: int = 1000, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(*arrays)``, resampling rows of all arrays together.

    Resamples where the statistic is undefined (NaN, e.g. an AUC of a one-class resample) are dropped.
    """
    n = len(arrays[0])
    if n == 0 or n_boot <= 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        values.append(statistic(*(a[idx] for a in arrays)))
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return math.nan, math.nan
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def choose_threshold(val_labels, val_p_covid) -> float:
    """The decision threshold on p(COVID) that maximises Youden's J (sensitivity + specificity - 1) on the
    validation split; ties go to the threshold nearest 0.5. The rule is "COVID when p > threshold".

    Only validation labels and scores enter here: the test split must never choose its own threshold.
    """
    labels, p = np.asarray(val_labels), np.asarray(val_p_covid, dtype=np.float64)
    if (labels == 1).sum() == 0 or (labels == 0).sum() == 0:
        return 0.5
    cuts = np.unique(p)
    candidates = np.concatenate([[0.5, 0.0], (cuts[:-1] + cuts[1:]) / 2, [cuts[-1]]])
    pos, neg = labels == 1, labels == 0
    best, best_j = 0.5, -np.inf
    for t in candidates:
        pred = p > t
        j = pred[pos].mean() + (~pred[neg]).mean() - 1
        if j > best_j + 1e-12 or (abs(j - best_j) <= 1e-12 and abs(t - 0.5) < abs(best - 0.5)):
            best, best_j = float(t), j
    return best


def predictive_values(sensitivity: float, specificity: float, prevalence: float) -> tuple[float, float]:
    """PPV and NPV at a prevalence (Bayes' rule from sensitivity and specificity)."""
    tp, fp = sensitivity * prevalence, (1 - specificity) * (1 - prevalence)
    tn, fn = specificity * (1 - prevalence), (1 - sensitivity) * prevalence
    ppv = tp / (tp + fp) if tp + fp > 0 else math.nan
    npv = tn / (tn + fn) if tn + fn > 0 else math.nan
    return ppv, npv


def _ece(p_covid, labels, bins: int = 10) -> float:
    confidence = np.maximum(p_covid, 1 - p_covid)
    correct = ((p_covid > 0.5).astype(int) == labels).astype(np.float64)
    which = np.clip((confidence * bins).astype(int), 0, bins - 1)
    return float(
        sum(
            abs(correct[which == b].mean() - confidence[which == b].mean()) * (which == b).mean()
            for b in range(bins)
            if (which == b).any()
        )
    )


def metric(
    type: str, value: float, slice: str, n: int, interval=None, threshold: float | None = None, method: str = ""
) -> dict:
    """One metric entry with the Model Card Toolkit's fields (plus ``n`` and how the interval was made)."""
    entry = {"type": type, "value": _num(value), "slice": slice, "threshold": threshold, "n": int(n)}
    if interval is not None:
        entry["confidence_interval"] = {"lower_bound": _num(interval[0]), "upper_bound": _num(interval[1])}
        entry["interval_method"] = method
    return entry


def _num(x):
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else round(float(x), 4)


def confusion(labels, p_covid, threshold: float) -> dict:
    """The 2x2 counts of the rule "COVID when p > threshold"."""
    labels, pred = np.asarray(labels), np.asarray(p_covid) > threshold
    return {
        "tp": int((pred & (labels == 1)).sum()),
        "fn": int((~pred & (labels == 1)).sum()),
        "tn": int((~pred & (labels == 0)).sum()),
        "fp": int((pred & (labels == 0)).sum()),
    }


# ----------------------------------------------------------------------------------------------------- setup
@dataclass
class ReportSettings:
    """What the report measures and how much; the defaults fit the phantom fast profile in about a minute on
    two CPU cores.

    Attributes:
        prevalences: The two prevalences at which PPV and NPV are stated.
        n_boot: Bootstrap resamples of each AUC and ECE interval.
        corruption_n: Test images (stratified) per corruption condition.
        corruption_severities: Severities of every corruption type.
        eps: Radii of the attack ensemble, as k/255.
        attack_n: Test images (stratified) attacked.
        apgd_steps, fab_steps, square_queries: Budgets of the ensemble's members (AutoAttack uses 100, 100, 5000;
            0 leaves FAB or Square out: on two CPU cores FAB alone takes minutes).
        saliency_n: Images whose lung-attention ratio is measured, per site.
        failures: Most confident false negatives and false positives shown (each).
        reference: An ERM checkpoint to compare corruption accuracy with (None: not measured).
        seed: Seed of every sample, corruption and attack.
    """

    prevalences: tuple[float, float] = (0.05, 0.30)
    n_boot: int = 1000
    corruption_n: int = 96
    corruption_severities: tuple[int, ...] = (1, 3, 5)
    eps: tuple[str, ...] = ("1/255", "2/255", "4/255")
    attack_n: int = 48
    apgd_steps: int = 10
    fab_steps: int = 0
    square_queries: int = 0
    saliency_n: int = 48
    failures: int = 4
    reference: str | None = None
    seed: int = 0


@dataclass
class Site:
    """A labelled evaluation set: the run's own test split or an external site."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    source: str
    external: bool


@dataclass
class ReportInputs:
    """Everything the sections read. ``val`` chooses the threshold; ``sites[0]`` is the run's own test split."""

    checkpoint: Path
    sha256: str
    model: torch.nn.Module
    cfg: object
    val: tuple[torch.Tensor, torch.Tensor]
    sites: list[Site]
    split_note: str
    settings: ReportSettings
    state: dict = field(default_factory=dict)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_checkpoint(spec: str | Path, runs_root: str | Path = "runs/book") -> Path:
    """The checkpoint a report is about: a ``.pt`` file, a run folder (its validation-chosen checkpoint), or the
    name of a shipped fast-profile run (``erm-seed0``, ``robustmed-seed0``, ...), restored into ``runs_root``.

    Raises:
        FileNotFoundError: None of these; the message lists the shipped names.
    """
    from ..book import bookruns

    path = Path(spec)
    if path.is_file():
        return path
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.pt"))
        config = path / "config.yaml"
        if config.exists():
            import yaml

            chosen = path / selected_checkpoint_name(yaml.safe_load(config.read_text()).get("method", "erm"))
            if chosen.exists():
                return chosen
        if found:
            return path / ("best_robust.pt" if "best_robust.pt" in found else found[0])
        raise FileNotFoundError(f"run folder {path} holds no .pt checkpoint. Fix: pass a trained run's folder")
    if str(spec) in bookruns.RUNS:
        cfg = bookruns.run_config(str(spec), Path(runs_root) / str(spec))
        bookruns.restore(cfg)
        chosen = cfg.run_dir() / selected_checkpoint_name(cfg.method)
        if chosen.exists():
            return chosen
    raise FileNotFoundError(
        f"{spec} is neither a checkpoint file, a run folder nor a shipped run. Fix: pass a .pt file, a run "
        f"folder, or one of {', '.join(bookruns.RUNS)}"
    )


def parse_site(text: str) -> tuple[str, str]:
    """``NAME=ROOT`` of ``--site`` (ROOT: a data folder, ``root:test`` for one split, or ``phantom:<site>``)."""
    name, sep, root = text.partition("=")
    if not sep or not name or not root:
        raise ValueError(f"--site {text!r}: expected NAME=ROOT, e.g. --site ucsd=../shared/data/ucsd_covidct")
    return name, root


def _phantom_split(cfg, n: int, site: str, seed: int):
    from ..data.phantom import make_phantom_dataset
    from ..data.preprocess import prepare

    images, labels = make_phantom_dataset(n, cfg.img_size, site, seed=seed)[:2]
    return prepare(images, cfg.img_size, cfg.lung_crop, cfg.intensity, cfg.lung_region)[0], labels


def _load_site(cfg, name: str, root: str, progress: bool) -> Site:
    from ..data.loaders import DataError
    from ..data.preprocess import load_domain

    if root.startswith("phantom"):
        site = root.partition(":")[2] or "B"
        images, labels = _phantom_split(cfg, cfg.n_test, site, seed=2)
    else:
        images, labels, _ = load_domain(root, cfg.img_size, cfg.lung_crop, cfg.intensity, cfg.lung_region, progress)
    counts = torch.bincount(labels.long(), minlength=2)[:2].tolist()
    if min(counts) == 0:
        held = ", ".join(f"{n} {CLASS_NAMES[c]}" for c, n in enumerate(counts) if n)
        raise DataError(
            f"--site {name}={root} holds only {held or 'no'} images: sensitivity, specificity and AUC need both "
            f"classes. Fix: point it at a folder with both {CLASS_NAMES[1]} and {CLASS_NAMES[0]} slices"
        )
    return Site(name, images, labels, root, external=True)


def load_inputs(
    checkpoint: str | Path,
    sites=(),
    settings: ReportSettings | None = None,
    own_shift: bool = True,
    progress: bool = True,
    data: str | None = None,
) -> ReportInputs:
    """The model, its validation split, its test split and the sites, rebuilt from the checkpoint's config.

    Args:
        checkpoint: See ``resolve_checkpoint``.
        sites: ``(name, root)`` pairs of external sites.
        settings: What to measure.
        own_shift: Add the run's own shifted test set (phantom: ``ood_site``; real data: ``ood_data``).
        progress: Progress bars while loading real data.
        data: The run's own data root, if it moved since training (default: the config's ``data``).
    """
    from ..data.loaders import load_images
    from ..data.preprocess import domain_label, prepare, source_size

    path = resolve_checkpoint(checkpoint)
    model, cfg = model_from_checkpoint(path)
    cfg.progress = False
    if data is not None:
        cfg.data = data
    own = []
    if cfg.data == "phantom":
        val = _phantom_split(cfg, cfg.n_val, cfg.site, seed=1)
        own.append(
            Site(
                f"phantom site {cfg.site} (test)",
                *_phantom_split(cfg, cfg.n_test, cfg.site, 2),
                "phantom",
                external=False,
            )
        )
        note = (
            "Phantom: train, validation and test are generated with separate data seeds (0, 1, 2), so no "
            "synthetic patient is in two splits."
        )
        if own_shift and cfg.ood_site != cfg.site:
            own.append(
                Site(
                    f"phantom site {cfg.ood_site}",
                    *_phantom_split(cfg, cfg.n_test, cfg.ood_site, 2),
                    f"phantom:{cfg.ood_site}",
                    external=True,
                )
            )
    else:
        data = load_images(cfg.data, source_size(cfg.img_size, cfg.lung_crop), progress=progress)
        parts = data.splits(val=cfg.val_fraction, test=cfg.test_fraction, seed=0)

        def prepared(k):
            return prepare(data.images[parts[k]], cfg.img_size, cfg.lung_crop, cfg.intensity, cfg.lung_region)[0]

        val = (prepared("val"), data.labels[parts["val"]])
        own.append(
            Site(
                f"{domain_label(cfg.data)} (test)",
                prepared("test"),
                data.labels[parts["test"]],
                cfg.data,
                external=False,
            )
        )
        if data.official_split is not None:
            note = "The data set's official split (patient-grouped where it records patients)."
        elif data.patient_ids is not None:
            note = "Split grouped by patient (no patient in two splits), stratified by class, seed 0."
        else:
            note = (
                "Split stratified by class, seed 0, NOT grouped by patient (the layout records no patient ids): "
                "slices of one patient may be in training and test, which flatters the internal test."
            )
        if own_shift and cfg.ood_data:
            own.append(_load_site(cfg, domain_label(cfg.ood_data), cfg.ood_data, progress))
    external = [_load_site(cfg, name, root, progress) for name, root in sites]
    return ReportInputs(path, sha256_of(path), model, cfg, val, own + external, note, settings or ReportSettings())


# ---------------------------------------------------------------------------------------------------- plots
def _figure_png(fig, dpi: int = 90) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _figure_svg(fig) -> str:
    import matplotlib.pyplot as plt

    buffer = io.StringIO()
    with plt.rc_context({"svg.fonttype": "none"}):  # text stays text: small and sharp in print
        fig.savefig(buffer, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buffer.getvalue()
    return text[text.index("<svg") :]


def _forest_plot(rows: list[dict]) -> str:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(7.5, 0.5 + 0.45 * len(rows)), sharey=True)
    names = [r["site"] for r in rows][::-1]
    for ax, key in zip(axes, ("sensitivity", "specificity")):
        for i, r in enumerate(rows[::-1]):
            value, (lo, hi) = r[key], r[f"{key}_ci"]
            if value is None:
                continue
            ax.errorbar(value, i, xerr=[[value - lo], [hi - value]], fmt="o", color="k", capsize=3)
        ax.set_xlim(0, 1.02)
        ax.set_title(f"{key} (95% Wilson)", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(names)), names, fontsize=8)
    return _figure_svg(fig)


def _reliability_plot(curves: dict[str, dict]) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    for name, c in curves.items():
        conf, acc, count = (np.asarray(c[k], dtype=float) for k in ("confidence", "accuracy", "count"))
        keep = count > 0
        ax.plot(conf[keep], acc[keep], marker="o", ms=3, label=f"{name}")
        for x, y, k in zip(conf[keep], acc[keep], count[keep]):
            ax.annotate(str(int(k)), (x, y), fontsize=6, xytext=(2, -8), textcoords="offset points")
    ax.set_xlabel("confidence (bin mean)")
    ax.set_ylabel("accuracy in bin")
    ax.legend(fontsize=7)
    return _figure_svg(fig)


def _lines_plot(series: dict[str, tuple], xlabel: str, ylabel: str) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.6, 3.2))
    for name, (x, y) in series.items():
        ax.plot(x, y, marker="o", ms=3, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _figure_svg(fig)


def _histogram_plot(values: dict[str, list], xlabel: str) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.6, 3.0))
    for name, v in values.items():
        ax.hist(v, bins=20, range=(0, 1), alpha=0.5, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("images")
    ax.legend(fontsize=7)
    return _figure_svg(fig)


def _failure_tiles(images: torch.Tensor, maps: torch.Tensor, captions: list[str]) -> str:
    import matplotlib.pyplot as plt

    n = len(images)
    images, maps = images.numpy(), maps.numpy()
    fig, axes = plt.subplots(2, n, figsize=(1.5 * n, 3.2), squeeze=False)
    for i in range(n):
        axes[0, i].imshow(images[i, 0], cmap="gray", vmin=0, vmax=1)
        axes[0, i].set_title(captions[i], fontsize=6)
        axes[1, i].imshow(images[i, 0], cmap="gray", vmin=0, vmax=1)
        axes[1, i].imshow(maps[i, 0] / max(float(maps[i].max()), 1e-12), cmap="inferno", alpha=0.5)
        for ax in axes[:, i]:
            ax.axis("off")
    return _figure_png(fig, dpi=80)


# --------------------------------------------------------------------------------------------------- sections
def _probs(model, images) -> np.ndarray:
    from .metrics import predict_logits

    return predict_logits(model, images).softmax(1)[:, 1].numpy().astype(np.float64)


def _not_measured(reason: str, **extra) -> dict:
    return {"status": NOT_MEASURED, "reason": reason, "metrics": [], **extra}


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "unknown (not a git checkout)"
    except (OSError, subprocess.SubprocessError):
        return "unknown (git not found)"


def section_provenance(inp: ReportInputs) -> dict:
    state = load_checkpoint(inp.checkpoint)
    record = inp.checkpoint.parent / "env.json"
    run_record = json.loads(record.read_text()) if record.exists() else None
    return {
        "status": "measured",
        "checkpoint": str(inp.checkpoint),
        "sha256": inp.sha256,
        "epoch": state.get("epoch"),
        "commit": _git_commit(),
        "seed": inp.cfg.seed,
        "config": {
            k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v))
            for k, v in inp.cfg.to_dict().items()
        },
        "run_record": run_record,
        "environment": environment_info(),
        "data_roots": [{"site": s.name, "source": s.source, "n": len(s.labels)} for s in inp.sites]
        + [{"site": "validation", "source": inp.cfg.data, "n": len(inp.val[1])}],
        "metrics": [],
    }


def section_intended_use(inp: ReportInputs) -> dict:
    return {
        "status": "stated",
        "banner": "RESEARCH USE ONLY. Not a medical device; not for diagnosis or treatment decisions.",
        "intended_use": (
            f"Research on robust classification of single axial lung-CT slices into {CLASS_NAMES[1]} and "
            f"{CLASS_NAMES[0]} ({inp.cfg.model}, {inp.cfg.img_size} px, method {inp.cfg.method}); teaching; "
            "comparison of training methods under distribution shift and attack."
        ),
        "not_for": [
            "diagnosing, triaging or ruling out COVID-19 in a patient",
            "any scanner, protocol, population or site not evaluated in this report",
            "slices other than axial lung-window CT, or whole volumes without a slice-selection step",
            "other lung diseases: the model knows two classes only",
            "use without a radiologist, or as evidence of safety against adversarial manipulation",
        ],
        "metrics": [],
    }


def section_data(inp: ReportInputs) -> dict:
    rows = []
    for name, labels, role in [("validation", inp.val[1], "chooses the threshold")] + [
        (s.name, s.labels, "external site" if s.external else "internal test") for s in inp.sites
    ]:
        n, pos = len(labels), int((labels == 1).sum())
        rows.append(
            {
                "partition": name,
                "role": role,
                "n": n,
                "n_covid": pos,
                "n_noncovid": n - pos,
                "prevalence": _num(pos / n if n else math.nan),
            }
        )
    metrics = [
        metric(
            "prevalence",
            r["prevalence"],
            r["partition"],
            r["n"],
            wilson_interval(r["n_covid"], r["n"]),
            method="Wilson",
        )
        for r in rows
    ]
    return {"status": "measured", "partitions": rows, "split": inp.split_note, "metrics": metrics}


def fix_threshold(inp: ReportInputs) -> dict:
    """The decision threshold, from the validation images and labels alone: it runs before any test prediction,
    and reads neither the sites' images nor their labels."""
    p = _probs(inp.model, inp.val[0])
    val = inp.val
    return {
        "threshold": choose_threshold(val[1].numpy(), p),
        "n_val": len(val[1]),
        "rule": "COVID when p(COVID) > threshold; threshold maximises Youden's J on the validation split",
    }


def _rates(labels: np.ndarray, p: np.ndarray, threshold: float, slice_name: str) -> tuple[dict, list[dict]]:
    c = confusion(labels, p, threshold)
    n_pos, n_neg = c["tp"] + c["fn"], c["tn"] + c["fp"]
    sens = c["tp"] / n_pos if n_pos else math.nan
    spec = c["tn"] / n_neg if n_neg else math.nan
    row = {
        "site": slice_name,
        **c,
        "sensitivity": _num(sens),
        "specificity": _num(spec),
        "sensitivity_ci": [_num(v) for v in wilson_interval(c["tp"], n_pos)],
        "specificity_ci": [_num(v) for v in wilson_interval(c["tn"], n_neg)],
        "predicted_covid_share": _num(float((p > threshold).mean())),
        "n": len(labels),
    }
    metrics = [
        metric("sensitivity", sens, slice_name, n_pos, wilson_interval(c["tp"], n_pos), threshold, "Wilson"),
        metric("specificity", spec, slice_name, n_neg, wilson_interval(c["tn"], n_neg), threshold, "Wilson"),
    ]
    return row, metrics


def section_clinical_summary(inp: ReportInputs) -> dict:
    threshold = inp.state["threshold"]["threshold"]
    rows, metrics = [], []
    for site in inp.sites:
        row, m = _rates(site.labels.numpy(), inp.state["p"][site.name], threshold, site.name)
        rows.append(row)
        metrics += m
    main = rows[0]
    pv = []
    for prevalence in inp.settings.prevalences:
        ppv, npv = predictive_values(main["sensitivity"] or 0.0, main["specificity"] or 0.0, prevalence)
        pv.append({"prevalence": prevalence, "ppv": _num(ppv), "npv": _num(npv)})
        metrics += [
            metric("ppv", ppv, f"{main['site']} at prevalence {prevalence:g}", main["n"], threshold=threshold),
            metric("npv", npv, f"{main['site']} at prevalence {prevalence:g}", main["n"], threshold=threshold),
        ]
    return {
        "status": "measured",
        **inp.state["threshold"],
        "main": main,
        "sites": rows,
        "predictive_values": pv,
        "forest_plot": _forest_plot(rows),
        "metrics": metrics,
    }


def section_generalisation(inp: ReportInputs) -> dict:
    from .adapt import adapt

    threshold, s = inp.state["threshold"]["threshold"], inp.settings
    rows, metrics = [], []
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in inp.model.modules())
    for site in inp.sites:
        y, p = site.labels.numpy(), inp.state["p"][site.name]
        auc = auc_score(y, p)
        ci = bootstrap_interval(auc_score, y, p, n_boot=s.n_boot, seed=s.seed)
        rate_row, rate_metrics = _rates(y, p, threshold, site.name)
        row = {
            **rate_row,
            "auc": _num(auc),
            "auc_ci": [_num(ci[0]), _num(ci[1])],
            "external": site.external,
            "true_covid_share": _num(float(y.mean())),
        }
        metrics += [metric("auc", auc, site.name, len(y), ci, method=f"percentile bootstrap, {s.n_boot}")]
        metrics += rate_metrics
        if has_bn and site.external:
            import copy

            adapted = adapt(copy.deepcopy(inp.model), site.images, "adabn")  # labels never reach the adaptation
            pa = _probs(adapted, site.images)
            row["auc_adabn"] = _num(auc_score(y, pa))
            metrics.append(metric("auc after AdaBN", auc_score(y, pa), site.name, len(y)))
        rows.append(row)
    external = [r for r in rows if r["external"]]
    out = {
        "status": "measured" if external else NOT_MEASURED,
        "sites": rows,
        "metrics": metrics,
        "adabn": "measured" if has_bn else f"{NOT_MEASURED}: the model has no BatchNorm layer to re-estimate",
    }
    if not external:
        out["reason"] = "no external site: pass --site NAME=ROOT (only the internal test split is shown)"
    return out


def _reliability(p: np.ndarray, y: np.ndarray, bins: int = 10) -> dict:
    confidence = np.maximum(p, 1 - p)
    correct = ((p > 0.5).astype(int) == y).astype(float)
    which = np.clip((confidence * bins).astype(int), 0, bins - 1)
    out = {"confidence": [], "accuracy": [], "count": []}
    for b in range(bins):
        members = which == b
        out["count"].append(int(members.sum()))
        out["confidence"].append(_num(confidence[members].mean()) if members.any() else None)
        out["accuracy"].append(_num(correct[members].mean()) if members.any() else None)
    return out


def section_calibration(inp: ReportInputs) -> dict:
    s = inp.settings
    rows, metrics, curves = [], [], {}
    for site in inp.sites:
        y, p = site.labels.numpy(), inp.state["p"][site.name]
        ece = _ece(p, y)
        ci = bootstrap_interval(_ece, p, y, n_boot=s.n_boot, seed=s.seed)
        curves[site.name] = _reliability(p, y)
        rows.append(
            {
                "site": site.name,
                "ece": _num(ece),
                "ece_ci": [_num(ci[0]), _num(ci[1])],
                "n": len(y),
                "bins": curves[site.name],
            }
        )
        metrics.append(
            metric(
                "expected calibration error (10 bins)",
                ece,
                site.name,
                len(y),
                ci,
                method=f"percentile bootstrap, {s.n_boot}",
            )
        )
    plot_curves = {k: {kk: [x if x is not None else 0 for x in v] for kk, v in c.items()} for k, c in curves.items()}
    return {"status": "measured", "sites": rows, "metrics": metrics, "plot": _reliability_plot(plot_curves)}


def _stratified(site: Site, n: int, seed: int):
    from ..data.loaders import stratified_subset

    idx = torch.from_numpy(stratified_subset(site.labels.numpy(), min(n, len(site.labels)), seed=seed))
    return site.images[idx], site.labels[idx]


def section_corruptions(inp: ReportInputs) -> dict:
    from .corruptions import FAMILIES
    from .ood import corruption_table

    s = inp.settings
    x, y = _stratified(inp.sites[0], s.corruption_n, s.seed)
    models = {"model": inp.model}
    reference_note = f"{NOT_MEASURED}: no ERM reference given (--reference CHECKPOINT)"
    if s.reference:
        ref_model, ref_cfg = model_from_checkpoint(resolve_checkpoint(s.reference))
        if ref_cfg.img_size != inp.cfg.img_size:
            raise ValueError(
                f"--reference {s.reference} takes {ref_cfg.img_size} px, the model {inp.cfg.img_size} px. Fix: "
                "pass an ERM checkpoint trained at the same size"
            )
        models["reference"] = ref_model
        reference_note = f"measured: {s.reference} ({ref_cfg.method})"
    # The first type of each family stands for it at report speed; the study commands run all of them.
    chosen = [names[0] for names in FAMILIES.values()]
    table = corruption_table(models, x, y, chosen, s.corruption_severities, seed=s.seed, progress=False)
    clean = table[table.severity == 0].set_index("model")["accuracy"].to_dict()
    rows, metrics = [], []
    for (family, corruption, severity), part in table[table.severity > 0].groupby(["family", "corruption", "severity"]):
        acc = dict(zip(part["model"], part["accuracy"]))
        k = round(acc["model"] * len(y))
        row = {
            "family": family,
            "corruption": corruption,
            "severity": int(severity),
            "accuracy": _num(acc["model"]),
            "accuracy_ci": [_num(v) for v in wilson_interval(k, len(y))],
            "n": len(y),
        }
        if "reference" in acc:
            row["reference_accuracy"] = _num(acc["reference"])
            row["difference"] = _num(acc["model"] - acc["reference"])
        rows.append(row)
        metrics.append(
            metric(
                "accuracy",
                acc["model"],
                f"{corruption} severity {severity}",
                len(y),
                wilson_interval(k, len(y)),
                method="Wilson",
            )
        )
    series = {}
    for family in dict.fromkeys(r["family"] for r in rows):
        mine = [r for r in rows if r["family"] == family]
        series[family] = ([0] + [r["severity"] for r in mine], [clean["model"]] + [r["accuracy"] for r in mine])
    return {
        "status": "measured",
        "clean_accuracy": _num(clean["model"]),
        "reference_clean_accuracy": _num(clean.get("reference")),
        "reference": reference_note,
        "rows": rows,
        "n": len(y),
        "metrics": metrics,
        "plot": _lines_plot(series, "severity (0 = clean)", "accuracy"),
    }


def section_adversarial(inp: ReportInputs) -> dict:
    from .attacks import APGD
    from .ensemble import Ensemble, TorchattacksAttack
    from .metrics import adversarial_examples, predict_logits

    s = inp.settings
    x, y = _stratified(inp.sites[0], s.attack_n, s.seed)
    clean_ok = predict_logits(inp.model, x).argmax(1) == y
    extra = {"FAB": s.fab_steps, "Square": s.square_queries}
    if any(extra.values()):
        if importlib.util.find_spec("torchattacks") is None:  # FAB and Square come from torchattacks
            extra = dict.fromkeys(extra, 0)
    budget = f"APGD-CE and APGD-margin {s.apgd_steps} steps each" + "".join(
        f", {kind} {steps} {'queries' if kind == 'Square' else 'steps'}" for kind, steps in extra.items() if steps
    )
    rows, metrics, robust_at = [], [], []
    robust = clean_ok.clone()
    for eps in tqdm(s.eps, desc="attack ensemble", leave=False, **progress_options(inp.state["progress"])):
        members = [
            APGD(eps, steps=s.apgd_steps, loss="ce", seed=s.seed),
            APGD(eps, steps=s.apgd_steps, loss="margin", seed=s.seed),
        ] + [TorchattacksAttack(kind, eps, steps, seed=s.seed, **({"n_classes": 2} if kind == "FAB" else {}))
             for kind, steps in extra.items() if steps]  # fmt: skip
        ensemble = Ensemble(members)
        # A larger L-inf ball holds the smaller one: an image fooled at a smaller eps is fooled here too, so only
        # the images still robust are attacked (the worst case per image is monotone in eps).
        rows_left = robust.nonzero().flatten()
        if len(rows_left):
            adv = adversarial_examples(inp.model, ensemble, x[rows_left], y[rows_left])
            robust[rows_left] = predict_logits(inp.model, adv).argmax(1).cpu() == y[rows_left]
        robust_at.append(robust.clone())
        k, label = int(robust.sum()), format_eps(parse_eps(eps))
        rows.append(
            {
                "eps": label,
                "eps_value": _num(parse_eps(eps)),
                "accuracy": _num(k / len(y)),
                "accuracy_ci": [_num(v) for v in wilson_interval(k, len(y))],
                "n": len(y),
                "attack": ensemble.describe(),
                "steps": budget,
            }
        )
        metrics.append(
            metric(
                "robust accuracy (attack ensemble, worst case per image)",
                k / len(y),
                f"{inp.sites[0].name}, L-inf eps {label}",
                len(y),
                wilson_interval(k, len(y)),
                method="Wilson",
            )
        )
    # Worst case per image: the smallest radius at which some member fools it ("clean": wrong without attack).
    weakest = []
    for i in range(len(y)):
        fooled = [row["eps"] for row, ok in zip(rows, robust_at) if not ok[i]]
        weakest.append("clean" if not clean_ok[i] else (fooled[0] if fooled else "robust at every eps"))
    per_image = {name: weakest.count(name) for name in ["clean", *(r["eps"] for r in rows), "robust at every eps"]}
    k_clean = int(clean_ok.sum())
    skipped = [kind for kind, steps in extra.items() if not steps]
    return {
        "status": "measured",
        "clean_accuracy": _num(k_clean / len(y)),
        "clean_ci": [_num(v) for v in wilson_interval(k_clean, len(y))],
        "rows": rows,
        "n": len(y),
        "members": budget
        + (f" ({' and '.join(skipped)} {NOT_MEASURED} at report speed: set their budgets)" if skipped else ""),
        "weakest_eps_counts": per_image,
        "worst_case": "an image counts as robust at an eps only if it is correct clean and no member fools it",
        "metrics": metrics,
        "plot": _lines_plot(
            {"ensemble": ([0] + [r["eps_value"] for r in rows], [k_clean / len(y)] + [r["accuracy"] for r in rows])},
            "eps (pixel scale)",
            "accuracy",
        ),
    }


def section_attention(inp: ReportInputs) -> dict:
    from ..data.preprocess import lung_region, lungs
    from .saliency import mass_ratio, saliency, supported_methods

    s = inp.settings
    method = "gradcam" if "gradcam" in supported_methods(inp.model) else "input_grad"
    ratios, rows, metrics = {}, [], []
    for site in inp.sites:
        x, _ = _stratified(site, s.saliency_n, s.seed)
        masks = lungs(x)
        ratio = mass_ratio(saliency(inp.model, x, method), masks).numpy()
        ok = ratio[np.isfinite(ratio)]
        area = masks.flatten(1).float().mean(1).numpy()
        ratios[site.name] = ok.tolist()
        ci = bootstrap_interval(np.mean, ok, n_boot=s.n_boot, seed=s.seed) if len(ok) else (math.nan, math.nan)
        rows.append(
            {
                "site": site.name,
                "median": _num(np.median(ok)) if len(ok) else None,
                "mean": _num(ok.mean()) if len(ok) else None,
                "mean_ci": [_num(ci[0]), _num(ci[1])],
                "lung_area": _num(area.mean()),
                "n": len(ok),
            }
        )
        metrics.append(
            metric(
                f"lung-attention ratio ({method})",
                ok.mean() if len(ok) else math.nan,
                site.name,
                len(ok),
                ci,
                method=f"percentile bootstrap, {s.n_boot}",
            )
        )
    site = inp.sites[0]
    no_lungs, blanked = lung_region(site.images, "no_lungs")
    p = _probs(inp.model, no_lungs)
    correct = int(((p > 0.5).astype(int) == site.labels.numpy()).sum())
    n = len(site.labels)
    ci = wilson_interval(correct, n)
    chance = max(float(site.labels.float().mean()), 1 - float(site.labels.float().mean()))
    shortcut = {
        "accuracy": _num(correct / n),
        "ci": [_num(ci[0]), _num(ci[1])],
        "n": n,
        "blanked": len(blanked),
        "chance": _num(chance),
        "warning": ci[0] > chance + 0.05,
    }
    metrics.append(metric("accuracy with the lungs removed", correct / n, site.name, n, ci, 0.5, "Wilson"))
    return {
        "status": "measured",
        "method": method,
        "sites": rows,
        "shortcut": shortcut,
        "metrics": metrics,
        "plot": _histogram_plot(ratios, "share of saliency inside the (Otsu) lung mask"),
    }


def section_failures(inp: ReportInputs) -> dict:
    from .saliency import saliency, supported_methods

    site, threshold, cap = inp.sites[0], inp.state["threshold"]["threshold"], inp.settings.failures
    y, p = site.labels.numpy(), inp.state["p"][site.name]
    fn = np.flatnonzero((y == 1) & (p <= threshold))
    fp = np.flatnonzero((y == 0) & (p > threshold))
    fn, fp = fn[np.argsort(p[fn])][:cap], fp[np.argsort(-p[fp])][:cap]
    method = "gradcam" if "gradcam" in supported_methods(inp.model) else "input_grad"
    out = {
        "status": "measured",
        "site": site.name,
        "cap": cap,
        "method": method,
        "metrics": [],
        "n_false_negatives": int(((y == 1) & (p <= threshold)).sum()),
        "n_false_positives": int(((y == 0) & (p > threshold)).sum()),
    }
    for key, idx, what in (("false_negatives", fn, "FN"), ("false_positives", fp, "FP")):
        if len(idx) == 0:
            out[key] = None
            continue
        images = site.images[torch.from_numpy(idx)]
        maps = saliency(inp.model, images, method)
        out[key] = {
            "indices": idx.tolist(),
            "p_covid": [_num(v) for v in p[idx]],
            "tiles": _failure_tiles(images, maps, [f"{what} #{i} p={p[i]:.2f}" for i in idx]),
        }
    return out


def section_limitations(inp: ReportInputs, sections: dict) -> dict:
    """Sentences generated from the measured results, each naming the number behind it."""
    notes = []
    gen, clin = sections["generalisation"], sections["clinical_summary"]
    for row in gen["sites"]:
        share, true = row["predicted_covid_share"] or 0, row["true_covid_share"] or 0
        if abs(share - true) > 0.2:
            notes.append(
                f"calls {share:.0%} of {row['site']} {CLASS_NAMES[1]} while {true:.0%} are "
                f"(n = {row['n']}): it reads the site, not only the disease"
            )
        for key in ("sensitivity", "specificity"):
            lo = row[f"{key}_ci"][0]
            if lo is not None and lo < 0.7:
                notes.append(f"{key} on {row['site']} may be as low as {lo:.2f} (95% lower bound, n = {row['n']})")
    if gen["status"] == NOT_MEASURED:
        notes.append("no external site was evaluated: performance at another hospital is unknown")
    for row in sections["calibration"]["sites"]:
        if row["ece"] is not None and row["ece"] > 0.1:
            notes.append(f"poorly calibrated on {row['site']} (ECE {row['ece']:.2f}): probabilities are not risks")
    adv = sections["adversarial"]
    if adv["status"] != NOT_MEASURED and adv["rows"]:
        worst = adv["rows"][-1]
        notes.append(
            f"accuracy falls to {worst['accuracy']:.2f} under an L-inf attack of eps {worst['eps']} "
            f"(n = {worst['n']}, reduced budgets): not evidence of safety against manipulation"
        )
    cor = sections["corruptions"]
    if cor["status"] != NOT_MEASURED:
        bad = [r for r in cor["rows"] if r["accuracy"] is not None and r["accuracy"] < cor["clean_accuracy"] - 0.15]
        for r in bad[:4]:
            notes.append(
                f"{r['corruption']} at severity {r['severity']} lowers accuracy to {r['accuracy']:.2f} "
                f"(clean {cor['clean_accuracy']:.2f}, n = {r['n']})"
            )
    short = sections["attention"].get("shortcut")
    if short and short["warning"]:
        notes.append(
            f"with the lungs removed accuracy stays at {short['accuracy']:.2f} (chance {short['chance']:.2f},"
            f" n = {short['n']}): the labels are predictable from outside the lungs"
        )
    if "NOT grouped" in sections["data"]["split"]:
        notes.append("the internal split is not grouped by patient: the internal test is optimistic")
    notes.append(
        f"threshold {clin['threshold']:.3f} was fixed on {clin['n_val']} validation slices; "
        "another site may need its own threshold, chosen on its own validation data"
    )
    return {"status": "generated", "notes": notes, "metrics": []}


def section_appendix(inp: ReportInputs) -> dict:
    return {
        "status": "stated",
        "metrics": [],
        "rows": [{"standard": a, "item": b, "asks": c, "section": d, "title": SECTIONS[d]} for a, b, c, d in CHECKLIST],
    }


MEASURED = {
    "provenance": section_provenance,
    "intended_use": section_intended_use,
    "data": section_data,
    "clinical_summary": section_clinical_summary,
    "generalisation": section_generalisation,
    "calibration": section_calibration,
    "corruptions": section_corruptions,
    "adversarial": section_adversarial,
    "attention": section_attention,
    "failures": section_failures,
}


# --------------------------------------------------------------------------------------------------- driver
def _cache_key(inp: ReportInputs, name: str) -> str:
    settings = dataclasses.asdict(inp.settings)
    if name != "corruptions":
        settings.pop("reference")
    sites = [(s.name, s.source, len(s.labels)) for s in inp.sites]
    text = json.dumps([name, inp.sha256, settings, sites, SCHEMA_VERSION], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _cached(cache: Path, inp: ReportInputs, name: str, compute: Callable[[], dict]) -> tuple[dict, bool]:
    path = cache / f"{name}-{_cache_key(inp, name)}.json"
    if path.exists():
        return json.loads(path.read_text()), True
    result = compute()
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(path)
    return result, False


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuses an output folder that exists unless ``overwrite`` (whose matching cached evaluations are reused)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"--out {out_dir} is a file. Fix: choose another --out folder")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"--out {out_dir} already exists. Fix: pass --overwrite to rewrite the report there (cached "
            "evaluations of the same checkpoint and settings are reused), or choose another --out"
        )


def build_report(
    checkpoint: str | Path,
    out_dir: str | Path,
    sites=(),
    settings: ReportSettings | None = None,
    own_shift: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    data: str | None = None,
) -> dict:
    """Measures every section and writes ``report.html`` and ``report.json`` into ``out_dir``.

    Args:
        checkpoint: A checkpoint file, a run folder or a shipped run name (``resolve_checkpoint``).
        out_dir: The report folder; refused if it exists, unless ``overwrite``.
        sites: ``(name, root)`` external sites (``parse_site``).
        settings: What to measure (``ReportSettings``).
        own_shift: Include the run's own shifted test set as a site.
        overwrite: Write into an existing folder, reusing its matching cached evaluations.
        progress: Progress bar over the sections.
        data: Where the run's own data is now, if not at its config's ``data`` (a moved folder).

    Returns:
        The report as written to ``report.json``.
    """
    out_dir = Path(out_dir)
    check_out_dir(out_dir, overwrite)
    start = time.time()
    inp = load_inputs(checkpoint, sites, settings, own_shift, progress, data)
    cache = out_dir / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    inp.state["progress"] = progress
    inp.state["threshold"], _ = _cached(cache, inp, "threshold", lambda: fix_threshold(inp))
    predictions, _ = _cached(
        cache, inp, "predictions", lambda: {s.name: _probs(inp.model, s.images).tolist() for s in inp.sites}
    )
    inp.state["p"] = {k: np.asarray(v) for k, v in predictions.items()}
    sections, reused, seconds = {}, [], {}
    bar = tqdm(MEASURED.items(), desc="report", **progress_options(progress))
    for name, compute in bar:
        bar.set_postfix_str(name)
        t0 = time.time()
        sections[name], hit = _cached(cache, inp, name, lambda compute=compute: compute(inp))
        seconds[name] = round(time.time() - t0, 1)
        if hit:
            reused.append(name)
    sections["limitations"] = section_limitations(inp, sections)
    sections["appendix"] = section_appendix(inp)
    for name, title in SECTIONS.items():
        sections[name]["title"] = title
    report = {
        "schema_version": SCHEMA_VERSION,
        "model": {
            "checkpoint": str(inp.checkpoint),
            "sha256": inp.sha256,
            "method": inp.cfg.method,
            "architecture": inp.cfg.model,
        },
        "generated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.time() - start, 1),
        "section_seconds": seconds,
        "reused_from_cache": reused,
        "sections": {name: sections[name] for name in SECTIONS},
    }
    (out_dir / "report.json").write_text(json.dumps(_without_figures(report), indent=1))
    (out_dir / "report.html").write_text(render_html(report))
    return report


FIGURE_KEYS = ("plot", "forest_plot", "tiles")


def _without_figures(value):
    """The report without its embedded images: the JSON holds numbers, the HTML the pictures."""
    if isinstance(value, dict):
        return {k: _without_figures(v) for k, v in value.items() if k not in FIGURE_KEYS}
    if isinstance(value, list):
        return [_without_figures(v) for v in value]
    return value


def all_metrics(report: dict) -> list[dict]:
    """Every metric entry of a report, section by section."""
    return [m for section in report["sections"].values() for m in section.get("metrics", [])]


def render_html(report: dict) -> str:
    """The report as one self-contained HTML page (Jinja2 template ``templates/report.html.j2``)."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("robustmed_lite.evaluation", "templates"),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        undefined=jinja2.StrictUndefined,
    )
    env.filters["pct"] = lambda v: "n/a" if v is None else f"{v:.1%}"
    env.filters["f3"] = lambda v: "n/a" if v is None else f"{v:.3f}"
    env.filters["ci"] = lambda v: "n/a" if not v or v[0] is None else f"[{v[0]:.3f}, {v[1]:.3f}]"
    env.filters["json"] = lambda v: json.dumps(v, indent=1, default=str)
    env.globals["NOT_MEASURED"] = NOT_MEASURED
    env.globals["escape"] = html.escape
    return env.get_template("report.html.j2").render(r=report, s=report["sections"], titles=SECTIONS)
