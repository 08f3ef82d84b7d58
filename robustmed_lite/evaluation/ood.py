"""Out-of-distribution evaluation: corruption accuracy, mCE against an ERM reference, and shift between sites.

* ``corruption_table``: accuracy of each model under every corruption and severity (the corrupted images are
  made once and shared by the models, seeded).
* ``corruption_summary``: per model, clean accuracy, mean corruption accuracy (mCA), mCE and relative mCE
  against a reference model (ImageNet-C, Hendrycks and Dietterich 2019), and relative robustness mCA / clean.
* ``shift_table``: accuracy and clinical metrics of each model on several domains (the source test split, another
  scanner or hospital), with the drop from the source.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from ..common import model_device
from ..runinfo import progress_options
from .corruptions import CORRUPTIONS, FAMILY_OF, corrupt
from .metrics import class_counts, clinical_metrics, predict_logits, undefined_metrics_note


def corruption_table(
    models: dict[str, nn.Module],
    images: torch.Tensor,
    labels: torch.Tensor,
    corruptions=CORRUPTIONS,
    severities=(1, 2, 3, 4, 5),
    seed: int = 0,
    batch_size: int = 128,
    progress: bool = True,
    prepare: Callable | None = None,
) -> pd.DataFrame:
    """Accuracy of every model on clean images and under each corruption and severity.

    Args:
        models: Name -> classifier taking [0,1] inputs (evaluated in eval mode).
        images: (N,1,S,S) in [0,1].
        labels: (N,).
        corruptions: Names from ``corruptions.CORRUPTIONS``.
        severities: Severities 1..5 to run.
        seed: Seed of the corruptions (the same corrupted images for every model).
        batch_size: Images corrupted and classified at once.
        progress: Progress bar.
        prepare: Applied to every batch after the corruption, before the models see it (for models trained on
            prepared slices: a scanner change happens before any preprocessing, which may undo part of it).

    Returns:
        Long table: model, corruption ('clean' for severity 0), family, severity, accuracy, n.
    """
    severities = check_severities(severities)
    device = model_device(next(iter(models.values())))
    conditions = [("clean", 0)] + [(c, s) for c in corruptions for s in severities]
    rows = []
    for name, severity in tqdm(conditions, desc="corruptions", leave=False, **progress_options(progress)):
        correct = dict.fromkeys(models, 0)
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size].to(device)
            y = labels[start : start + batch_size]
            # Each batch gets its own seed (from the seed and its first index): for a given seed, batch size and
            # device the corrupted images are fixed, and batches do not share one noise draw.
            xc = x if severity == 0 else corrupt(x, name, severity, seed=seed * 100_003 + start)
            xc = xc if prepare is None else prepare(xc)
            for model_name, model in models.items():
                correct[model_name] += int((predict_logits(model, xc, batch_size).argmax(1) == y).sum())
        for model_name in models:
            rows.append(
                {
                    "model": model_name,
                    "corruption": name,
                    "family": FAMILY_OF.get(name, "clean"),
                    "severity": severity,
                    "accuracy": correct[model_name] / len(images),
                    "n": len(images),
                }
            )
    return pd.DataFrame(rows)


def check_severities(severities) -> list[int]:
    """The severities as a list of distinct ints in 1..5, or a ValueError that says what was wrong."""
    values = [int(s) for s in severities]
    if not values or any(s < 1 or s > 5 for s in values) or len(set(values)) != len(values):
        raise ValueError(
            f"severities take distinct values in 1..5 (0 is the clean images, always included), got {list(severities)}"
        )
    return values


def corruption_summary(table: pd.DataFrame, reference: str | None = None) -> pd.DataFrame:
    """Per model: clean accuracy, mCA, mCE and relative mCE (against ``reference``, default the first model),
    and relative robustness (mCA / clean accuracy).

    mCE = mean over corruptions of sum_s err(model) / sum_s err(reference); relative mCE uses the errors in
    excess of each model's clean error. Values below 1 beat the reference. A corruption on which the reference
    has no error (or, for relative mCE, no excess error) has no ratio: it is left out of that mean, a warning
    names it, and ``mCE_corruptions`` / ``relative_mCE_corruptions`` count the corruptions each mean is over.
    """
    reference = reference or table["model"].iloc[0]
    clean = table[table["severity"] == 0].set_index("model")["accuracy"]
    corr = table[table["severity"] > 0].assign(error=lambda d: 1 - d["accuracy"])
    per_c = corr.groupby(["model", "corruption"])["error"].sum().unstack()  # sum over severities
    n_sev = corr.groupby(["model", "corruption"])["severity"].count().unstack()
    ref_err = per_c.loc[reference].where(lambda v: v > 1e-12)
    ref_excess = (per_c.loc[reference] - n_sev.loc[reference] * (1 - clean[reference])).where(lambda v: v > 1e-12)
    for label, values in (("mCE", ref_err), ("relative mCE", ref_excess)):
        if values.isna().any():
            warnings.warn(
                f"{label}: the reference {reference!r} has no {'excess ' * (label != 'mCE')}error on "
                f"{sorted(values[values.isna()].index)}, which are left out of its mean",
                stacklevel=2,
            )
    rows = []
    for model in per_c.index:
        ce = per_c.loc[model] / ref_err
        excess = per_c.loc[model] - n_sev.loc[model] * (1 - clean[model])
        relative = excess / ref_excess
        mca = corr[corr["model"] == model]["accuracy"].mean()
        rows.append(
            {
                "model": model,
                "clean": clean[model],
                "mCA": mca,
                "mCE": ce.mean(),
                "relative_mCE": relative.mean(),
                "relative_robustness": mca / clean[model],
                "mCE_corruptions": int(ce.notna().sum()),
                "relative_mCE_corruptions": int(relative.notna().sum()),
                "reference": reference,
                "n": int(table["n"].iloc[0]),
            }
        )
    return pd.DataFrame(rows)


def shift_table(
    models: dict[str, nn.Module],
    domains: dict[str, tuple[torch.Tensor, torch.Tensor]],
    source: str | None = None,
    batch_size: int = 256,
) -> pd.DataFrame:
    """Accuracy and clinical metrics of each model on each domain, and the drop from the source domain.

    Args:
        models: Name -> classifier.
        domains: Name -> (images, labels), e.g. {"site A (test)": ..., "site B": ...}.
        source: The in-distribution domain (default: the first).
        batch_size: Inference batch size.

    Returns:
        One row per model and domain: n, n_covid, n_noncovid, the clinical metrics, ``note`` (why a metric is
        undefined on a domain with one class, also warned; else '') and ``drop_from_source``.
    """
    source = source or next(iter(domains))
    rows = []
    for domain, (_, y) in domains.items():
        note = undefined_metrics_note(y.numpy())
        if note:
            warnings.warn(f"shift table, domain {domain!r}: {note}", stacklevel=2)
    for model_name, model in models.items():
        for domain, (x, y) in domains.items():
            probs = predict_logits(model, x, batch_size).softmax(1).numpy()
            n_covid, n_noncovid = class_counts(y.numpy())
            rows.append(
                {
                    "model": model_name,
                    "domain": domain,
                    "n": len(y),
                    "n_covid": n_covid,
                    "n_noncovid": n_noncovid,
                    **clinical_metrics(y.numpy(), probs),
                    "note": undefined_metrics_note(y.numpy(), probs.shape[1]),
                }
            )
    table = pd.DataFrame(rows)
    src = table[table["domain"] == source].set_index("model")["accuracy"]
    table["drop_from_source"] = src.reindex(table["model"]).to_numpy() - table["accuracy"]
    return table
