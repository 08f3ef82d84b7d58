"""The book's verdict, written at build time from the committed reproduction: ```{robustmed-verdict}```.

The intro opens with what the book found and the closing page ends with it; both read the same files,
``results/reproduction/cpu/verdicts.csv`` (the paper's claims judged from paired per-seed gains), ``table.csv``,
``gains.csv`` and ``profile.json``, so the prose cannot drift from the numbers when the study is run again. The
directive renders a few sentences and, with ``:table:``, one small table of the verdicts.

The folder is ``robustmed_verdict_results`` in _config.yml (relative to the repository root); the environment
variable ``ROBUSTMED_VERDICT_RESULTS`` overrides it, e.g. to preview the book against another study's folder.
A folder without these files stops the build with a message that says which file and how to make it: an empty
verdict would read as "nothing found".
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_RESULTS = "results/reproduction/cpu"
NEEDED = ("verdicts.csv", "table.csv", "gains.csv", "profile.json")
METHOD_LABELS = {"erm": "ERM", "trades": "TRADES", "awp": "AWP", "cap": "CAP", "robustmed": "the method"}
DATA_LABELS = {"sarscov2": "the Soares SARS-CoV-2 set (Brazil)", "ucsd_covidct": "UCSD COVID-CT (China)"}
WRITEUP_URL = "https://github.com/robustmed-lite/robustmed-lite/blob/main/{folder}/README.md"


def _sentence_case(text: str) -> str:
    """The first letter in upper case, the rest as written (``OOD`` stays ``OOD``)."""
    return text[:1].upper() + text[1:]


def results_folder(configured: str = DEFAULT_RESULTS, root: Path = ROOT) -> Path:
    """The reproduction folder the verdict reads: ``ROBUSTMED_VERDICT_RESULTS`` where set, else ``configured``."""
    folder = Path(os.environ.get("ROBUSTMED_VERDICT_RESULTS") or configured)
    return folder if folder.is_absolute() else root / folder


def check_folder(folder: Path) -> None:
    """Raises FileNotFoundError, naming the missing file and the command that writes it, unless all are there."""
    missing = [name for name in NEEDED if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"the book's verdict reads {folder}, which lacks {', '.join(missing)}. Fix: commit the finished "
            "reproduction there (python -m robustmed_lite reproduce --profile cpu ...), or set "
            "ROBUSTMED_VERDICT_RESULTS to a folder that has them (e.g. results/reproduction/cpu-shared-gamma)"
        )


def _label(method: str) -> str:
    return METHOD_LABELS.get(method, f"`{method}`")


def _points(mean: float, low: float, high: float) -> str:
    """A gain in accuracy points with its interval: ``-5.8 [-10.8, -0.8]``."""
    return f"{100 * mean:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]"


def _setting(folder: Path, seeds: int) -> str:
    profile = json.loads((folder / "profile.json").read_text())
    config, train = profile["base_config"], profile["profile"]["train"]
    data = Path(str(config["data"])).name
    return (
        f"with `{config['model']}` trained on {DATA_LABELS.get(data, f'`{data}`')} at {train['img_size']} px for "
        f"{train['epochs']} epochs, {seeds} seeds, on a CPU"
    )


def _claim_sentence(v: pd.Series) -> str:
    claimed = 100 * float(v["claimed_gain"])
    return (
        f"**{_sentence_case(v['claim'].split(' +')[0])}**: the paper claims about {claimed:.3g} points above the "
        f"{v['comparator']}; here the method's paired gain over it ({_label(v['comparator_method'])}) is "
        f"{_points(v['gain_mean'], v['gain_ci_low'], v['gain_ci_high'])} points, **{v['verdict']}**"
    )


def _robustness_sentence(gains: pd.DataFrame) -> str | None:
    rows = gains[(gains["comparator"] == "best prior defence") & gains["metric"].str.startswith("ensemble_")]
    if rows.empty:
        return None
    parts = [
        f"{_points(r['gain_mean'], r['gain_ci_low'], r['gain_ci_high'])} points "
        + ("at the training eps" if r["metric"].endswith("train_eps") else f"at {r['label'].split('@')[-1].strip()}")
        for _, r in rows.iterrows()
    ]
    return (
        f"Under the attack ensemble, its robust accuracy minus that of the best prior defence "
        f"({_label(rows['best_prior'].iloc[0])}) is {' and '.join(parts)}."
    )


def _site_sentence(table: pd.DataFrame) -> str | None:
    rows = table[table["metric"].str.endswith("_balanced_accuracy")]
    if rows.empty:
        return None
    site = rows["metric"].iloc[0].removesuffix("_balanced_accuracy")
    low, high = rows["mean"].min(), rows["mean"].max()
    where = "below" if high < 0.5 else "near" if low < 0.55 else "above"
    return (
        f"At the other hospital, {DATA_LABELS.get(site, f'`{site}`')}, every method, the method itself "
        f"included, reaches a balanced accuracy of only {low:.2f} to {high:.2f}, {where} chance (0.5)."
    )


def verdict_markdown(folder: Path, table: bool = True, link: str | None = None) -> str:
    """The verdict as MyST Markdown: the setting, one sentence per headline claim, robustness and the other
    hospital, then (``table``) the verdict of every claim against every comparator.

    Args:
        folder: A reproduction folder (``results/reproduction/<profile>``).
        table: Add the table of verdicts.
        link: The write-up's URL, linked at the end; None links nothing.
    """
    check_folder(folder)
    verdicts = pd.read_csv(folder / "verdicts.csv")
    if verdicts.empty:
        raise ValueError(f"{folder / 'verdicts.csv'} has no rows: the study judged no claim; run it with the method")
    primary = verdicts[verdicts["primary"].astype(str).str.lower() == "true"]
    seeds = int(verdicts["n_pairs"].max())
    lines = [f"On real CT, {_setting(folder, seeds)}:", ""]
    lines += [f"- {_claim_sentence(v)}." for _, v in primary.iterrows()]
    extra = [
        s
        for s in (
            _robustness_sentence(pd.read_csv(folder / "gains.csv")),
            _site_sentence(pd.read_csv(folder / "table.csv")),
        )
        if s
    ]
    lines += ["", " ".join(extra)] if extra else []
    if table:
        lines += [
            "",
            "| claim | compared with | paired gain, points (95% CI) | verdict |",
            "| --- | --- | --- | --- |",
        ]
        lines += [
            f"| {v['claim']} | {v['comparator']} ({_label(v['comparator_method'])}) | "
            f"{_points(v['gain_mean'], v['gain_ci_low'], v['gain_ci_high'])} | {v['verdict']} |"
            for _, v in verdicts.iterrows()
        ]
        lines += ["", f"*The rule:* {verdicts['rule'].iloc[0]}"]
    if link:
        lines += ["", f"The study's [write-up]({link}) has every metric, the commands and the environment."]
    return "\n".join(lines) + "\n"


def setup(app):
    from docutils import nodes
    from docutils.parsers.rst import directives
    from docutils.statemachine import StringList
    from sphinx.errors import ExtensionError
    from sphinx.util.docutils import SphinxDirective

    app.add_config_value("robustmed_verdict_results", DEFAULT_RESULTS, "env")

    def check_results(app) -> None:  # at builder-inited: a missing study stops the build with its fix
        try:
            check_folder(results_folder(app.config.robustmed_verdict_results))
        except FileNotFoundError as err:
            raise ExtensionError(str(err)) from None

    class VerdictDirective(SphinxDirective):
        option_spec = {"table": directives.flag}

        def run(self):
            folder = results_folder(self.config.robustmed_verdict_results)
            for name in NEEDED:  # the page is read again when the study's files change
                self.env.note_dependency(str(folder / name))
            try:
                relative = folder.resolve().relative_to(ROOT).as_posix()
                link = WRITEUP_URL.format(folder=relative)
            except ValueError:  # a folder outside the repository has no page on GitHub
                link = None
            text = verdict_markdown(folder, table="table" in self.options, link=link)
            container = nodes.container(classes=["robustmed-verdict"])
            self.state.nested_parse(StringList(text.splitlines(), source=str(folder)), self.content_offset, container)
            return [container]

    app.connect("builder-inited", check_results)
    app.add_directive("robustmed-verdict", VerdictDirective)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
