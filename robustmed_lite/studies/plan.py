"""The runs of a study: profiles, the plan of (row, seed) runs with CAP's two stages, and shards.

A *row* is a method of ``config.METHODS`` or a named variant of one (a method with other settings). With two
stages every robust run starts from the clean (ERM) run trained on the same data and preparation.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ATTACK_RAMP, METHODS, SIZE_KEYS, WEIGHT_NOISE_KEYS, load_config, scale_epochs

ALL_METHODS = tuple(METHODS)
DEFAULT_SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class Profile:
    """How a reproduction trains and evaluates.

    Attributes:
        name: ``cpu``, ``gpu`` or ``paper``.
        preset: The training preset (``configs/*.yaml``).
        train: Overrides of the preset.
        two_stage: Start every robust run from the same seed's clean (ERM) model, as CAP does.
        jobs: Runs trained at once (processes; on a GPU they share it).
        ensemble_n: Test images attacked by the ensemble (seeded, stratified); None: all of them; 0: no ensemble.
        apgd_steps: Iterations of each APGD member.
        fab_steps: FAB iterations.
        square_queries: Square's queries per image.
        corruption_n: Test images scored under the corruptions (seeded, stratified); None: all of them.
    """

    name: str
    preset: str
    train: dict = field(default_factory=dict)
    two_stage: bool = True
    jobs: int = 1
    ensemble_n: int | None = None
    apgd_steps: int = 100
    fab_steps: int = 100
    square_queries: int = 5000
    corruption_n: int | None = None


# CAP's attack-step ramp scaled to the gpu profile's 12 epochs (full steps from epoch 1: no ramp).
_CAP_RAMP_12 = scale_epochs(ATTACK_RAMP.value, 12, ATTACK_RAMP.run_epochs)

PROFILES = {
    # 64 px, the narrow Visformer, 10 epochs: the five core methods x 3 seeds fit in an hour on 2 CPU cores.
    # Two processes of one thread each train 25% faster than one of two threads at this size (measured).
    # The ensemble runs on a stratified subset with reduced budgets (AutoAttack's: 100 / 100 / 5000).
    "cpu": Profile(
        "cpu",
        "cpu-demo",
        dict(img_size=64, epochs=10),
        jobs=2,
        ensemble_n=128,
        apgd_steps=50,
        fab_steps=20,
        square_queries=500,
    ),
    # 128 px visformer_tiny, several runs sharing one GPU; sized for about 10 minutes of one H100/H200 (estimate:
    # not run in this workplace, see the README). The weight noise's warm-up is each method's own, scaled to 12
    # epochs (noise from epoch 1: the robust runs start from the clean model).
    "gpu": Profile(
        "gpu",
        "colab",
        dict(img_size=128, epochs=12, warmup_epochs=1, attack_warmup_epochs=_CAP_RAMP_12, eval_n=372),
        jobs=4,
        ensemble_n=None,
        apgd_steps=100,
        fab_steps=50,
        square_queries=1000,
    ),
    # CAP's protocol: 224 px, 200 epochs, ImageNet weights, AutoAttack's budgets. Hours of GPU.
    "paper": Profile("paper", "paper", {}, jobs=1, ensemble_n=None),
}


@dataclass(frozen=True)
class RunSpec:
    """One training run of the plan: a row name (a method, or a named variant of one) and a seed."""

    name: str
    seed: int
    preset: str
    overrides: dict
    run_dir: Path
    init_from: Path | None
    reference: str = "erm"  # the clean row trained on the same data: stage 1, and mCE's reference
    # The settings the row itself chooses (a variant's): an error where its method ignores them. The rest of
    # ``overrides`` (the profile's and the study's, for every row) applies like the preset's own values.
    chosen: tuple[str, ...] = ()

    @property
    def method(self) -> str:
        return self.overrides["method"]

    def config(self):
        chosen = {k: v for k, v in self.overrides.items() if k in self.chosen}
        shared = {k: v for k, v in self.overrides.items() if k not in self.chosen}
        return load_config(self.preset, chosen, defaults=shared)


def parse_seeds(text: str | list | tuple) -> tuple[int, ...]:
    """``"0,1,2"`` or ``"0-4"`` -> seeds, with a clear error for anything else (a reversed range names the fix)."""
    if isinstance(text, (list, tuple)):
        values = list(text)
    else:
        values = []
        for part in str(text).split(","):
            part = part.strip()
            match = re.fullmatch(r"(\d+)-(\d+)", part)
            if match:
                low, high = int(match.group(1)), int(match.group(2))
                if low > high:
                    raise ValueError(
                        f"--seeds range {part!r} is reversed (it would hold no seed). Fix: write it from low to "
                        f"high, {high}-{low}"
                    )
                values += list(range(low, high + 1))
            elif re.fullmatch(r"\d+", part):
                values.append(int(part))
            else:
                raise ValueError(
                    f"cannot read seeds {text!r} (--seeds). Fix: give comma-separated integers such as 0,1,2, or "
                    "a range such as 0-4"
                )
    if not values or len(set(values)) != len(values):
        raise ValueError(f"--seeds must be distinct integers, got {text!r}. Fix: name each seed once, e.g. 0,1,2")
    return tuple(int(v) for v in values)


def parse_methods(text: str | list | tuple | None, option: str = "--methods") -> tuple[str, ...]:
    """Comma-separated method names (default: all nine), checked against ``config.METHODS``.

    Args:
        text: The names, ``"all"``, or None (all).
        option: The option the names came from, for the messages.
    """
    if text is None or text == "all":
        return ALL_METHODS
    names = [m.strip() for m in (text.split(",") if isinstance(text, str) else text) if m.strip()]
    choices = f"{', '.join(ALL_METHODS)} (or all)"
    if not names:
        raise ValueError(f"{option} {text!r} gives no method. Fix: name one or more of {choices}, comma-separated")
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise ValueError(f"{option}: unknown method(s) {', '.join(unknown)}. Fix: choose from {choices}")
    return tuple(dict.fromkeys(names))


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"i/n"`` (1 <= i <= n) -> (i, n); None -> (1, 1)."""
    if text is None:
        return 1, 1
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not match or not 1 <= int(match.group(1)) <= int(match.group(2)):
        raise ValueError(f"--shard takes i/n with 1 <= i <= n (e.g. 2/4), got {text!r}")
    return int(match.group(1)), int(match.group(2))


def parse_variant(text: str) -> tuple[str, dict]:
    """``"NAME=METHOD,key=value,..."`` -> (NAME, overrides): an extra row, a method with other settings."""
    name, _, rest = text.partition("=")
    parts = [p.strip() for p in rest.split(",") if p.strip()]
    if not name.strip() or not parts or "=" in parts[0]:
        raise ValueError(
            f"cannot read variant {text!r}: use NAME=METHOD,key=value,... "
            "(e.g. robustmed+crop=robustmed,lung_crop=true)"
        )
    overrides = {"method": parse_methods(parts[0], f"--variant {name.strip()}")[0]}
    for part in parts[1:]:
        key, eq, value = part.partition("=")
        if not eq:
            raise ValueError(f"variant {name!r}: {part!r} is not key=value")
        overrides[key.strip()] = value.strip()
    return name.strip(), overrides


# Settings that shape only the robust stage: rows that differ in nothing else start from one clean (ERM) run.
ROBUST_ONLY = (
    "attack",
    "feedback",
    "weight_noise",
    "loss",
    "prior",
    "beta",
    "smooth",
    "target_grad",
    *WEIGHT_NOISE_KEYS,
    "weight_feedback_share",
    "weight_feedback_halvings",
    "prior_samples",
    "prior_view",
    "tau",
    "attack_warmup_epochs",
)


def build_plan(
    profile: Profile,
    data: str,
    methods,
    seeds,
    runs_root: Path,
    overrides: dict | None = None,
    variants: dict[str, dict] | None = None,
) -> list[RunSpec]:
    """The runs of a reproduction, stage-1 (clean) runs first, each with its run directory.

    With ``profile.two_stage`` every robust row starts from the clean (ERM) row trained on the same data and
    preparation: ``erm`` for the methods, and for a variant the ERM row with the same settings, which is added
    (named ``erm+<suffix>``, the suffix of the variant's name) when the variants do not include one.
    """
    rows = {m: {"method": m} for m in methods}
    for name, values in (variants or {}).items():
        if name in rows or name in METHODS:
            raise ValueError(f"variant name {name!r} is taken by a method: choose another name")
        rows[name] = dict(values)

    def settings_of(row: dict) -> dict:
        return {k: v for k, v in row.items() if k != "method"}

    def clean_settings(row: dict) -> dict:  # what the clean run of a row trains with
        return {k: v for k, v in settings_of(row).items() if k not in ROBUST_ONLY}

    references = {}
    if profile.two_stage:
        clean = {json.dumps(clean_settings(r), sort_keys=True): n for n, r in rows.items() if r["method"] == "erm"}
        added = {}
        for name, row in rows.items():
            key = json.dumps(clean_settings(row), sort_keys=True)
            if key not in clean:
                clean[key] = "erm" if not clean_settings(row) else f"erm+{name.split('+', 1)[-1]}"
                added[clean[key]] = {"method": "erm", **clean_settings(row)}
            references[name] = clean[key]
        rows = {**added, **rows}
    base = {**profile.train, **(overrides or {}), "data": data, "progress": False}
    plan = []
    for seed in seeds:
        for name, row in rows.items():
            run_dir = runs_root / f"{name}-seed{seed}"
            reference = references.get(name, "erm")
            init = None
            if profile.two_stage and row["method"] != "erm":
                init = runs_root / f"{reference}-seed{seed}" / "best_clean.pt"
            values = {**base, **row, "seed": seed, "out_dir": str(run_dir)}
            if init is not None:
                values["init_from"] = str(init)
            # A size the user passed to the study samples real data as it would for train (config.SIZE_KEYS)
            chosen = tuple(sorted((set(row) - {"method"}) | (set(overrides or {}) & set(SIZE_KEYS))))
            plan.append(RunSpec(name, seed, profile.preset, values, run_dir, init, reference, chosen))
    plan.sort(key=lambda s: (s.init_from is not None, s.seed))  # stage 1 first, stable otherwise
    for spec in plan:
        spec.config()  # every config resolves before anything trains
    return plan


def shard_of(plan: list[RunSpec], shard: tuple[int, int]) -> list[RunSpec]:
    """The runs of shard i of n, deterministically: the clean run of seed s goes to shard ``s mod n`` (so each
    shard trains its own stage-1 runs first), the others round-robin in plan order. A shard whose robust run
    starts from another shard's clean run waits for that checkpoint."""
    i, n = shard
    if n == 1:
        return list(plan)
    mine, k = [], 0
    for spec in plan:
        if spec.init_from is None and spec.method == "erm":
            owner = spec.seed % n
        else:
            owner, k = k % n, k + 1
        if owner == i - 1:
            mine.append(spec)
    return mine
