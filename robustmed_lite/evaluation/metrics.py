"""Evaluation: predictions, accuracy, and the robust + clinical table (clean, each attack, worst case).

Conventions of ``evaluate`` (those of AutoAttack): the model is in eval mode; only correctly classified samples
are attacked, and a sample the model already gets wrong keeps its clean prediction under every attack (the
attacker's best answer is to leave it alone), so robust accuracy never exceeds clean accuracy and an attack
that happens to repair a wrong prediction earns no credit. Clinical metrics under an attack are computed from
these adversarial predictions and probabilities. The worst case counts a sample as robust only if it is
correct clean and under every listed attack.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import confusion_matrix, f1_score, roc_auc_score
from torch import nn
from tqdm.auto import tqdm

from ..common import eval_mode, model_device, parse_eps
from ..runinfo import progress_options
from .attacks import Attack, check_finite

POSITIVE_CLASS = 1  # COVID
TABLE_COLUMNS = (
    "condition",
    "attack",
    "norm",
    "eps",
    "eps_value",
    "steps",
    "n",
    "n_covid",
    "n_noncovid",
    "accuracy",
    "auc",
    "sensitivity",
    "specificity",
    "f1",
    "seconds",
    "note",
)


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Logits of ``model`` in eval mode over a tensor of images, batch by batch; restores the modes.

    Raises:
        ValueError: Non-finite images, or a model that returns non-finite logits (both would silently become
            class 0 under ``argmax``); the message gives their count and positions.
    """
    device = model_device(model)
    out = []
    with eval_mode(model):
        for i in range(0, len(images), batch_size):
            batch = images[i : i + batch_size]
            check_finite(batch, "the images", first_index=i)
            out.append(model(batch.to(device)).float().cpu())
            _check_logits(out[-1], i)
    return torch.cat(out) if out else torch.zeros(0)


def _check_logits(logits: torch.Tensor, first_index: int) -> None:
    bad = (~torch.isfinite(logits)).any(1).nonzero().squeeze(1)
    if len(bad):
        raise ValueError(
            f"the model returned non-finite logits for {len(bad)} image(s), first "
            f"{(bad[:5] + first_index).tolist()}. Fix: its weights are probably NaN (a diverged run: "
            "lower the learning rate) or the checkpoint is damaged"
        )


def adversarial_examples(
    model: nn.Module, attack: Callable, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 128
) -> torch.Tensor:
    """``attack(model, x, y)`` over a tensor of images, batch by batch, on the model's device (where the
    adversarial examples stay)."""
    device = model_device(model)
    return torch.cat(
        [
            attack(model, images[i : i + batch_size].to(device), labels[i : i + batch_size].to(device))
            for i in range(0, len(images), batch_size)
        ]
    )


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy in eval mode.

    Raises:
        ValueError: Non-finite images or logits (see ``predict_logits``), or not one label per image.
    """
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    return (predict_logits(model, images, batch_size).argmax(1) == labels.cpu()).float().mean().item()


def clinical_metrics(labels, probs) -> dict[str, float]:
    """Accuracy, AUC, sensitivity, specificity and F1.

    Two classes: for the positive class 1 (COVID); sensitivity = recall of COVID, specificity = recall of
    non-COVID. k classes: macro averages (one-vs-rest AUC, per-class sensitivity and specificity, macro F1).
    AUC is NaN when a class is missing from ``labels``.

    Args:
        labels: (N,) true classes.
        probs: (N, k) class probabilities; the prediction is their argmax.
    """
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    k = probs.shape[1]
    pred = probs.argmax(1)
    cm = confusion_matrix(labels, pred, labels=np.arange(k)).astype(np.float64)
    tp = np.diag(cm)
    with np.errstate(invalid="ignore", divide="ignore"):
        sens = tp / cm.sum(1)
        spec = (cm.sum() - cm.sum(0) - cm.sum(1) + tp) / (cm.sum() - cm.sum(1))
    present = np.unique(labels)
    if k == 2:
        auc = roc_auc_score(labels, probs[:, POSITIVE_CLASS]) if len(present) == 2 else float("nan")
        sens, spec = sens[POSITIVE_CLASS], spec[POSITIVE_CLASS]
        f1 = f1_score(labels, pred, pos_label=POSITIVE_CLASS, zero_division=0)
    else:
        auc = (
            roc_auc_score(
                labels, probs / probs.sum(1, keepdims=True), multi_class="ovr", average="macro", labels=np.arange(k)
            )
            if len(present) == k
            else float("nan")
        )
        sens, spec = np.nanmean(sens), np.nanmean(spec)
        f1 = f1_score(labels, pred, labels=np.arange(k), average="macro", zero_division=0)
    return {
        "accuracy": float((pred == labels).mean()) if len(labels) else float("nan"),
        "auc": float(auc),
        "sensitivity": float(sens),
        "specificity": float(spec),
        "f1": float(f1),
    }


def threshold_sweep(labels, p_covid, thresholds=None) -> pd.DataFrame:
    """Sensitivity and specificity of the rule "COVID when p(COVID) > t" for each threshold t. At t = 0.5 the rule
    is the argmax prediction that ``clinical_metrics`` scores.

    Args:
        labels: (N,) true classes, 1 = COVID.
        p_covid: (N,) predicted probabilities of COVID.
        thresholds: Default 0, 0.01, ..., 1.

    Returns:
        One row per threshold: threshold, sensitivity, specificity, balanced_accuracy.

    Raises:
        ValueError: A class is missing from ``labels`` (sensitivity or specificity would be undefined), or the two
            arrays differ in length.
    """
    labels, p_covid = np.asarray(labels).ravel(), np.asarray(p_covid, dtype=np.float64).ravel()
    if len(labels) != len(p_covid):
        raise ValueError(f"{len(labels)} labels but {len(p_covid)} probabilities: pass one probability per label")
    covid, non_covid = labels == POSITIVE_CLASS, labels != POSITIVE_CLASS
    if not covid.any() or not non_covid.any():
        raise ValueError(
            f"the labels hold {int(covid.sum())} COVID and {int(non_covid.sum())} non-COVID slices: "
            "sensitivity and specificity need both classes. Fix: sweep a split with both"
        )
    thresholds = np.linspace(0, 1, 101) if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    positive = p_covid[None, :] > thresholds[:, None]
    sensitivity = positive[:, covid].mean(1)
    specificity = (~positive[:, non_covid]).mean(1)
    return pd.DataFrame(
        {
            "threshold": thresholds,
            "sensitivity": sensitivity,
            "specificity": specificity,
            "balanced_accuracy": (sensitivity + specificity) / 2,
        }
    )


def class_counts(labels) -> tuple[int, int]:
    """(COVID, non-COVID) counts of binary labels."""
    labels = np.asarray(labels).reshape(-1)
    return int((labels == POSITIVE_CLASS).sum()), int((labels == 1 - POSITIVE_CLASS).sum())


def undefined_metrics_note(labels, k: int = 2) -> str:
    """Why some clinical metrics of ``clinical_metrics`` are NaN (or meaningless) for these labels, or ''.

    With one class present AUC is undefined (it ranks positives against negatives), so is specificity (no
    negatives) or sensitivity (no positives), and accuracy is just the recall of the class that is there.
    """
    labels = np.asarray(labels).reshape(-1)
    if not len(labels):
        return "no images"
    present = set(np.unique(labels).tolist())
    if k == 2 and len(present) == 1:
        only = present.pop()
        if only == POSITIVE_CLASS:
            return (
                f"only COVID images ({len(labels)}): AUC and specificity are undefined (NaN), accuracy is the "
                "sensitivity"
            )
        return (
            f"only non-COVID images ({len(labels)}): AUC and sensitivity are undefined (NaN), F1 is 0 by "
            "convention, accuracy is the specificity"
        )
    missing = sorted(set(range(k)) - present)
    if missing:
        return f"classes {missing} absent ({len(labels)} images): AUC is undefined (NaN)"
    return ""


def _batches(data, batch_size: int) -> tuple[Iterable[tuple[torch.Tensor, torch.Tensor]], int | None]:
    """(x, y) batches, and how many (None if unknown), from a DataLoader of (x, y) / (x, ..., y), a pair
    (images, labels), or an object with ``.images`` and ``.labels`` (PhantomSet, ImageSet)."""
    if hasattr(data, "images") and hasattr(data, "labels"):
        data = (data.images, data.labels)
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        images, labels = data
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        batches = ((images[i : i + batch_size], labels[i : i + batch_size]) for i in range(0, len(images), batch_size))
        return batches, -(-len(images) // batch_size)
    try:
        total = len(data)
    except TypeError:
        total = None
    return ((batch[0], batch[-1]) for batch in data), total


def evaluate(
    model: nn.Module,
    data,
    attacks: dict[str, Attack] | None = None,
    *,
    batch_size: int = 128,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Clean, per-attack and worst-case accuracy with clinical metrics, one row per condition.

    Each attack runs once per batch, on the correctly classified samples only (see the module docstring).

    Args:
        model: A classifier taking inputs in [0, 1]; evaluated in eval mode, its modes restored afterwards.
        data: A DataLoader yielding (x, y) or (x, ..., y), a pair of tensors (images, labels), or an object with
            ``.images`` and ``.labels``.
        attacks: Condition name -> attack. None or empty: the clean row only.
        batch_size: Batch size when ``data`` holds tensors.
        device: Where batches go; default the model's device.
        progress: Show a progress bar.

    Returns:
        A DataFrame with columns ``TABLE_COLUMNS``: rows ``clean``, one per attack, and ``worst case`` (with two
        or more attacks). ``eps`` is k/255 text (L2: plain), ``eps_value`` the float; ``steps`` counts gradient
        steps; ``seconds`` is the wall time of the attack and its prediction; ``n_covid`` and ``n_noncovid``
        count the classes; ``note`` says why a metric is undefined (one class present; also warned), else ''.
        Binary metrics treat class 1 (COVID) as positive; with k classes they are macro averages
        (``df.attrs["average"]``).

    Raises:
        ValueError: No samples, reserved condition names, or non-finite images (count and positions given).
    """
    attacks = dict(attacks or {})
    if "clean" in attacks or "worst case" in attacks:
        raise ValueError("'clean' and 'worst case' are reserved condition names")
    device = torch.device(device) if device is not None else model_device(model)
    names = ["clean", *attacks]
    probs, labels = {name: [] for name in names}, []
    n_correct, seconds = dict.fromkeys(names, 0), dict.fromkeys(names, 0.0)
    batches, total = _batches(data, batch_size)
    bar = tqdm(batches, total=total, desc="evaluate", leave=False, **progress_options(progress))
    seen = 0
    with eval_mode(model):
        for x, y in bar:
            check_finite(x, "the evaluated images", first_index=seen)
            x, y = x.to(device), y.to(device).long()
            with torch.no_grad():
                logits = model(x).float()
            _check_logits(logits, seen)
            clean = logits.softmax(1)
            correct = (clean.argmax(1) == y).nonzero().squeeze(1)
            probs["clean"].append(clean.cpu())
            n_correct["clean"] += len(correct)
            for name, attack in attacks.items():
                adv = clean.clone()
                if len(correct):
                    start = time.perf_counter()
                    x_adv = attack(model, x[correct], y[correct])
                    with torch.no_grad():
                        adv[correct] = model(x_adv).float().softmax(1)
                    seconds[name] += time.perf_counter() - start
                probs[name].append(adv.cpu())
                n_correct[name] += int((adv.argmax(1) == y).sum())
            labels.append(y.cpu())
            seen += len(y)
            bar.set_postfix({name: f"{count / seen:.3f}" for name, count in n_correct.items()}, refresh=False)
    if not seen:
        raise ValueError("evaluate got no samples")
    y_all = torch.cat(labels).numpy()
    probs = {name: torch.cat(p).numpy() for name, p in probs.items()}
    rows = [
        {
            "condition": "clean",
            "attack": "none",
            "norm": "",
            "eps": "0/255",
            "eps_value": 0.0,
            "steps": 0,
            **clinical_metrics(y_all, probs["clean"]),
            "seconds": 0.0,
        }
    ]
    for name, attack in attacks.items():
        rows.append(
            {
                "condition": name,
                "attack": attack.describe(),
                "norm": attack.norm,
                "eps": attack.eps_str,
                "eps_value": attack.eps,
                "steps": attack.steps,
                **clinical_metrics(y_all, probs[name]),
                "seconds": seconds[name],
            }
        )
    if len(attacks) > 1:
        values = attacks.values()
        rows.append(
            {
                "condition": "worst case",
                "attack": "any of " + ", ".join(attacks),
                "norm": ", ".join(sorted({a.norm for a in values})),
                "eps": ", ".join(sorted({a.eps_str for a in values})),
                "eps_value": max(a.eps for a in values),
                "steps": sum(a.steps for a in values),
                **clinical_metrics(y_all, _worst_case(y_all, [probs[name] for name in names])),
                "seconds": sum(seconds.values()),
            }
        )
    table = pd.DataFrame(rows).reindex(columns=list(TABLE_COLUMNS))
    table["n"] = len(y_all)
    table["n_covid"], table["n_noncovid"] = class_counts(y_all)
    note = undefined_metrics_note(y_all, probs["clean"].shape[1])
    table["note"] = note
    if note:
        warnings.warn(
            f"evaluate: {note}. Evaluate on a sample with both classes (data.stratified_subset)", stacklevel=2
        )
    table.attrs["average"] = "binary, positive class 1 (COVID)" if probs["clean"].shape[1] == 2 else "macro"
    return table


def _worst_case(labels: np.ndarray, probs: Sequence[np.ndarray]) -> np.ndarray:
    """Per sample, the probabilities of the condition that fools it (lowest true-class probability among
    those that do), else of the one with the lowest true-class probability: wrong iff any condition is wrong."""
    stacked = np.stack(probs)  # (conditions, N, k)
    p_true = np.take_along_axis(stacked, labels[None, :, None], 2)[..., 0]
    correct = stacked.argmax(2) == labels[None]
    pick = np.argmin(correct * 2.0 + p_true, axis=0)  # any wrong condition (key < 2) beats every correct one
    return stacked[pick, np.arange(len(labels))]


def accuracy_vs_eps(
    model: nn.Module, data, attacks: dict[str, Callable[[float], Attack]], eps_values: Sequence[float | str], **kwargs
) -> pd.DataFrame:
    """``evaluate`` at several radii, the attack rows of every eps stacked in one long table (for plots).

    At eps 0 every attack returns x unchanged, so that radius is not attacked: its rows repeat the clean row.

    Args:
        model: The classifier.
        data: As in ``evaluate``.
        attacks: Condition name -> a function eps -> attack, e.g. ``{"PGD-10": lambda e: PGD(e, steps=10)}``.
        eps_values: Radii (floats or "k/255" strings).
        **kwargs: Passed to ``evaluate``.

    Returns:
        ``evaluate``'s columns; the worst case is included when there are two or more attacks.
    """
    tables, clean = [], None
    for eps in map(parse_eps, eps_values):
        if eps > 0:
            table = evaluate(model, data, {name: make(eps) for name, make in attacks.items()}, **kwargs)
            clean = table.iloc[[0]] if clean is None else clean
            tables.append(table.iloc[1:])
        else:
            clean = evaluate(model, data, None, **kwargs) if clean is None else clean
            names = [*attacks, "worst case"] if len(attacks) > 1 else list(attacks)
            tables.append(clean.loc[clean.index.repeat(len(names))].assign(condition=names))
    return pd.concat(tables, ignore_index=True)
