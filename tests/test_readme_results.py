"""The README's result tables quote the committed result files: a re-run that changes a number fails here until
the README says the new one."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
INTERVAL = re.compile(r"([+-]\d\.\d{3}) \[([+-]\d\.\d{3}), ([+-]\d\.\d{3})\]")
PLUS_MINUS = re.compile(r"(\d\.\d{3}) ± (\d\.\d{3})")


def _table_after(marker: str, document: str = README) -> list[list[str]]:
    """The rows (cells) of the first Markdown table after ``marker``."""
    text = document[document.index(marker) :]
    lines = text[text.index("\n|") :].strip().splitlines()
    rows = []
    for line in lines:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows[2:]  # without the header and the rule


FIDELITY_ROWS = {
    "`cap` after - before": "cap",
    "`robustmed` after - before": "robustmed",
    "`robustmed`, earlier prior view": "robustmed-prior_view",
    "`robustmed`, SGD proxy": "robustmed-proxy_optimizer",
    "`robustmed`, stop-gradient soft target": "robustmed-target_grad",
    "`robustmed` + weight-level feedback": "robustmed+weight_feedback",
    "`robustmed` + training on prior views": "robustmed+prior_samples",
    "`awp` - `trades`": "awp",
    "`awp` with warm-up - `trades`": "awp+warmup",
    "`awp` with gamma 1e-3 - `trades`": "awp+gamma1e-3",
}


PHANTOM_ROWS = {
    label: row
    for label, row in FIDELITY_ROWS.items()
    if row in ("cap", "robustmed", "robustmed-proxy_optimizer", "robustmed+weight_feedback", "robustmed+prior_samples")
}


@pytest.mark.parametrize(
    "results, marker, labels, metrics",
    [
        (
            "results/fidelity/cpu",
            "**The committed measurement** (`results/fidelity/cpu/table.md`",
            FIDELITY_ROWS,
            ("ensemble_train_eps", "clean_accuracy"),
        ),
        (
            "results/fidelity/cpu-phantom",
            "**On the phantom** (`results/fidelity/cpu-phantom/table.md`",
            PHANTOM_ROWS,
            ("ensemble_train_eps", "pgd10_train_eps", "clean_accuracy"),
        ),
    ],
    ids=["soares", "phantom"],
)
def test_the_fidelity_tables_quote_the_committed_effects(results, marker, labels, metrics):
    effects = pd.read_csv(ROOT / results / "effects.csv").set_index(["row", "metric"])
    rows = _table_after(marker)
    assert [r[0] for r in rows] == list(labels)
    for label, *cells in rows:
        assert len(cells) == len(metrics), label
        for cell, metric in zip(cells, metrics):
            quoted = [float(v) for v in INTERVAL.search(cell).groups()]
            measured = effects.loc[(labels[label], metric), ["gain_mean", "gain_ci_low", "gain_ci_high"]]
            assert quoted == pytest.approx(measured.round(3).tolist(), abs=5e-4), (label, metric)


ABLATION_ROWS = {
    "without the prediction feedback (`cap`)": "cap",
    "without the lung-prior view": "robustmed-prior",
    "without the proxy attention noise": "robustmed-weight_noise",
    "TRADES' loss instead of the square loss": "robustmed-square_loss",
}
ABLATION_METRICS = ("clean_accuracy", "pgd10_train_eps", "ensemble_train_eps", "ood_mean_accuracy", "corruption_all")


@pytest.mark.parametrize("folder", ["cpu-phantom", "cpu"], ids=["phantom", "soares"])
def test_the_ablation_tables_quote_the_committed_effects(folder):
    results = ROOT / "results" / "ablation" / folder
    effects = pd.read_csv(results / "effects.csv").set_index(["row", "metric"])
    rows = _table_after(f"**The committed measurement** (`results/ablation/{folder}/table.md`")
    assert [r[0] for r in rows] == list(ABLATION_ROWS)
    for label, *cells in rows:
        for cell, metric in zip(cells, ABLATION_METRICS, strict=True):
            quoted = [float(v) for v in INTERVAL.search(cell).groups()]
            measured = effects.loc[(ABLATION_ROWS[label], metric), ["gain_mean", "gain_ci_low", "gain_ci_high"]]
            assert quoted == pytest.approx(measured.round(3).tolist(), abs=5e-4), (label, metric)


@pytest.mark.parametrize(
    "folder, sentence, method_lowest",
    [
        ("cpu-phantom", "({method}, against {low}-{high})", True),  # "the full method has the lowest mean ..."
        ("cpu", "the full method's mean ensemble accuracy is {method}, the variants' {low}-{high}", False),
    ],
    ids=["phantom", "soares"],
)
def test_the_ablation_paragraphs_quote_the_ensemble_accuracies(folder, sentence, method_lowest):
    runs = pd.read_csv(ROOT / "results" / "ablation" / folder / "all_runs" / "runs.csv")
    ensemble = runs.groupby("name")["ensemble_train_eps"].mean().drop("erm").round(3)
    others = ensemble.drop("robustmed")
    if method_lowest:
        assert ensemble.idxmin() == "robustmed"
    quoted = sentence.format(
        method=f"{ensemble['robustmed']:.3f}", low=f"{others.min():.3f}", high=f"{others.max():.3f}"
    )
    assert quoted in " ".join(README.split())


REPRODUCTION_ROWS = {
    "natural accuracy": "clean_accuracy",
    "ensemble @ 4/255": "ensemble_train_eps",
    "ensemble @ 8/255": "ensemble_8_255",
    "corruptions, CAP's 15 types": "corruption_cap15",
    "corruptions, CT physics": "corruption_ct",
    "UCSD (all 746), balanced accuracy": "ucsd_covidct_balanced_accuracy",
}


def test_the_reproduction_table_quotes_the_committed_summary():
    table = pd.read_csv(ROOT / "results/reproduction/cpu/table.csv").set_index(["name", "metric"])
    rows = _table_after("**The committed result** (`results/reproduction/cpu/table.md`")
    names = ["erm", "trades", "awp", "cap", "robustmed"]
    assert [r[0] for r in rows] == list(REPRODUCTION_ROWS)
    for label, *cells in rows:
        for name, cell in zip(names, cells):
            mean, half = (float(v) for v in PLUS_MINUS.search(cell).groups())
            row = table.loc[(name, REPRODUCTION_ROWS[label])]
            assert (mean, half) == pytest.approx(
                (round(row["mean"], 3), round((row.ci_high - row.ci_low) / 2, 3)), abs=5e-4
            ), (label, name)


def _seconds(text: str) -> int:
    """'1 min 05 s' or '48 s' -> seconds."""
    match = re.fullmatch(r"(?:(\d+) min )?(\d+) s", text.strip())
    assert match, f"not a time: {text!r}"
    return int(match.group(1) or 0) * 60 + int(match.group(2))


def test_the_notebook_times_quote_the_benchmark():
    """The README's per-notebook times are the ones benchmarks/notebooks.py recorded, for both data settings."""
    import json

    recorded = {
        data: {
            row["notebook"]: row["seconds"]
            for row in json.loads((ROOT / "benchmarks" / "results" / f"notebooks_cpu_{data}.json").read_text())[
                "notebooks"
            ]
        }
        for data in ("phantom", "found")
    }
    rows = _table_after("**How long each notebook takes.**")
    assert [r[0].strip("`") for r in rows] == sorted(recorded["phantom"]), "one row per notebook, in book order"
    for name, phantom, found in rows:
        name = name.strip("`")
        assert _seconds(phantom) == round(recorded["phantom"][name]), name
        assert _seconds(found) == round(recorded["found"][name]), name
    guide = _table_after("**How long the notebooks run.**", (ROOT / "book" / "workshop.md").read_text())
    assert {r[0].strip("`"): _seconds(r[1]) for r in guide} == {
        name: round(seconds) for name, seconds in recorded["phantom"].items()
    }, "the instructor guide's times"


def test_the_large_data_table_quotes_the_benchmark():
    """The slice store's peak memory and throughput in the README are those benchmarks/large_data.py recorded."""
    import json

    recorded = json.loads((ROOT / "benchmarks" / "results" / "large_data_cpu.json").read_text())
    rows = _table_after("**Measured** (`python benchmarks/large_data.py`")
    assert [r[0].split(" (")[0] for r in rows] == ["slice store", "the same slices in memory"]
    for row, result in zip(rows, recorded["results"], strict=True):
        assert row[1].strip("*") == f"{result['peak_rss_mb']:,} MB"
        assert row[2] == f"{result['ready_s']:g} s"
        assert row[3] == f"{result['data_pass_slices_per_s']:,} slices/s"
        assert row[4] == f"{round(result['epoch_s'])} s ({round(result['train_slices_per_s'])} slices/s)"
    store = recorded["results"][0]
    assert store["path"] == "store" and store["peak_rss_mb"] < 2000 and recorded["n_train"] == 50_000
    assert f"{recorded['store_mb']} MiB store, written in {round(recorded['store_write_s'])} s" in README


SITE_METHODS = {"ERM": "erm", "TRADES": "trades", "the method": "robustmed"}
SITE_COMPONENTS = {
    "": "baseline",
    " + lung crop": "crop",
    " + intensity (`anchor`)": "intensity",
    " + acquisition augmentation": "acq",
    " + multi-source (uses UCSD train labels)": "multi",
}


def _site_row(label: str) -> tuple[str, str]:
    """'TRADES + lung crop' -> ('trades', 'crop'); 'ERM, best (intensity + acq)' -> ('erm', 'best: intensity+acq')."""
    for name, method in SITE_METHODS.items():
        if label.startswith(name):
            rest = label[len(name) :]
            best = re.fullmatch(r", best \((.+)\)", rest)
            return method, ("best: " + best.group(1).replace(" + ", "+") if best else SITE_COMPONENTS[rest])
    raise AssertionError(f"not a row of the cross-site table: {label!r}")


def test_the_cross_site_table_quotes_the_committed_study():
    table = pd.read_csv(ROOT / "results" / "sites" / "cpu" / "sites_table.csv")
    test = table[(table["split"] == "test") & (table["metric"] == "balanced_accuracy")].set_index(
        ["method", "component", "adaptation"]
    )
    rows = _table_after("**The committed result** (`results/sites/cpu/table.md`")
    assert len(rows) == len(test) // 3, "one README row per method and component"
    for label, *cells in rows:
        method, component = _site_row(label)
        for cell, adaptation in zip(cells, ("none", "adabn", "tent"), strict=True):
            mean, half = (float(v) for v in PLUS_MINUS.search(cell).groups())
            row = test.loc[(method, component, adaptation)]
            assert (mean, half) == pytest.approx(
                (round(row["mean"], 3), round((row.ci_high - row.ci_low) / 2, 3)), abs=5e-4
            ), (label, adaptation)


def test_the_second_cross_site_call_is_quoted_against_the_first():
    """The README's table of the two calls of the cross-site study, and the goal it quotes, from the committed files."""
    from robustmed_lite.studies.sites import compare_studies

    first, second = (ROOT / "results" / "sites" / name for name in ("cpu", "cpu-erm-robustmed"))
    rows = _table_after("**Measured again with the method's current defaults**")
    names = {}
    for label, *_ in rows:
        method, component = _site_row(label)
        names[label] = method if component == "baseline" else f"{method}+{component.removeprefix('best: ')}"
    table = compare_studies(
        pd.read_csv(first / "all_runs" / "runs.csv"),
        pd.read_csv(second / "all_runs" / "runs.csv"),
        list(names.values()),
        ["ucsd_covidct_test_balanced_accuracy"],
    ).set_index("name")
    assert len(table) == len(rows) == 12, "ERM and the method, six rows each"
    for label, before, after, difference in rows:
        r = table.loc[names[label]]
        assert (float(before), float(after)) == pytest.approx((round(r["before"], 3), round(r["after"], 3)), abs=5e-4)
        quoted = [float(v) for v in INTERVAL.search(difference).groups()]
        assert quoted == pytest.approx(
            [round(r[c], 3) for c in ("gain_mean", "gain_ci_low", "gain_ci_high")], abs=5e-4
        ), label
    text = " ".join(README.split())
    goal = pd.read_csv(second / "goal.csv").set_index("method")
    for method, name in (("erm", "ERM"), ("robustmed", "the method")):
        g = goal.loc[method]
        assert not g["reached"] and f"{name} {g['mean']:.3f} [{g['ci_low']:.3f}, {g['ci_high']:.3f}]" in text
