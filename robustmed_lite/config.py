"""Training configuration: one dataclass, presets in YAML, command-line overrides (as in timm).

``load_config("cpu-demo", {"method": "robustmed", "epochs": 3})`` reads the preset (a name in
``robustmed_lite/configs/`` or a path to a YAML file), applies the overrides, fills the method's components and
checks everything. A run directory keeps the resolved config as ``config.yaml``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .attacks import format_eps, parse_eps
from .preprocess import INTENSITY_MODES, LUNG_REGIONS, split_spec

CONFIG_DIR = Path(__file__).parent / "configs"
PRESETS = ("cpu-demo", "colab", "paper")

# Each method is a choice of components; `robustmed` and `cap` switch them for ablations.
#   attack: the sample-level perturbation (none / pgd: CE, PGD-AT style / trades: KL, TRADES style)
#   feedback: early stopping of that attack (none / fat / last_correct)
#   weight_noise: none / awp / proxy_attention;  loss: the outer objective;  prior: use the lung-prior view
METHODS: dict[str, dict] = {
    "erm": dict(attack="none", feedback="none", weight_noise="none", loss="ce", prior=False),
    "pgd_at": dict(attack="pgd", feedback="none", weight_noise="none", loss="ce", prior=False),
    "trades": dict(attack="trades", feedback="none", weight_noise="none", loss="trades", prior=False),
    "mart": dict(attack="pgd", feedback="none", weight_noise="none", loss="mart", prior=False),
    "awp": dict(attack="trades", feedback="none", weight_noise="awp", loss="trades", prior=False),
    "fat": dict(attack="trades", feedback="fat", weight_noise="none", loss="trades", prior=False),
    "score": dict(attack="trades", feedback="none", weight_noise="none", loss="score", prior=False),
    "cap": dict(attack="trades", feedback="none", weight_noise="proxy_attention", loss="square_kl", prior=True),
    "robustmed": dict(attack="trades", feedback="last_correct", weight_noise="proxy_attention", loss="square_kl",
                      prior=True),
}
CHOICES = {
    "attack": ("none", "pgd", "trades"),
    "feedback": ("none", "fat", "last_correct"),
    "weight_noise": ("none", "awp", "proxy_attention"),
    "loss": ("ce", "trades", "mart", "score", "square_kl"),
    "optimizer": ("adamw", "sgd"),
    "intensity": INTENSITY_MODES,
    "lung_region": LUNG_REGIONS,
    "schedule": ("cosine", "constant"),
}


@dataclass
class TrainConfig:
    """Everything a training run depends on. ``None`` components take the method's defaults."""

    # what
    method: str = "erm"
    model: str = "tiny_visformer"
    pretrained: bool = False
    # data: "phantom" or a folder/CSV of real CT
    data: str = "phantom"
    img_size: int = 64
    site: str = "A"  # phantom site to train on
    ood_site: str = "B"  # phantom site for the shift test
    n_train: int = 2000
    n_val: int = 400
    n_test: int = 600
    val_fraction: float = 0.15  # real data without an official split
    test_fraction: float = 0.15
    ood_data: str | None = None  # real data for the shift test (e.g. UCSD when training on Soares); "path:test"
    extra_data: str | None = None  # another labelled site pooled into training (its own train/val/test split)
    site_balanced: bool = True  # with extra_data: every site fills the same share of each epoch
    hflip: bool = True
    vflip: bool = False
    # site-independent inputs (preprocess.py), applied to every split and test domain alike
    lung_crop: bool = False  # crop each slice to its lungs' bounding box before resizing
    intensity: str = "none"  # per-slice standardisation: none / percentile / histeq / anchor
    lung_region: str = "all"  # shortcut tests: all / no_lungs (lungs filled) / lungs_only (rest blanked)
    # acquisition augmentation (training only): probability per slice of one low-severity scanner corruption
    acq_aug: float = 0.0
    acq_aug_severity: int = 2  # severities 1..this are drawn
    # optimisation
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    schedule: str = "cosine"
    warmup_epochs: int = 0
    cosine_period: int = 0  # epochs of one cosine half-wave; 0: the whole run. Longer runs climb back up (CAP)
    # sample perturbation (eps on the [0,1] pixel scale; strings like "8/255" are accepted)
    eps: float | str = 8 / 255
    step_size: float | str = 2 / 255
    attack_steps: int = 10
    attack_warmup_epochs: int = 0  # ramp the attack steps up from 1 over these epochs (CAP's schedule)
    tau: int = 0  # FAT's extra steps after the first misclassified iterate
    # method components (None: the method's default)
    attack: str | None = None
    feedback: str | None = None
    weight_noise: str | None = None
    loss: str | None = None
    prior: bool | None = None
    beta: float = 6.0
    smooth: float = 0.03  # weight of p(x_aug) in the soft target (CAP's code reuses the attack eps, 0.03)
    target_grad: bool = False  # backpropagate through p(x_aug) in the soft target, as CAP's code does
    gamma: float = 5e-3
    weight_noise_warmup: int = 0  # epochs before weight noise starts
    proxy_lr: float = 0.01
    # lung prior
    prior_threshold: float | str = 0.5
    prior_radius: int = 2
    prior_eps: float = 0.003
    prior_s: float = 0.5
    # validation (checkpoints are chosen here, never on test)
    eval_attack_steps: int = 10
    eval_n: int = 256  # validation images attacked each epoch
    # run
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU
    channels_last: bool = True  # on CUDA
    out_dir: str = "runs/{method}-{model}-{img_size}px-seed{seed}"
    init_from: str | None = None  # warm start: weights of a checkpoint (CAP starts from a clean model)
    progress: bool = True
    # resolved component values, filled by `resolve()`
    _resolved: bool = field(default=False, repr=False)

    def resolve(self) -> TrainConfig:
        """Fills the method's components, parses eps, and checks every value; returns self."""
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}: choose one of {sorted(METHODS)}")
        for key, default in METHODS[self.method].items():
            if getattr(self, key) is None:
                setattr(self, key, default)
        for key, options in CHOICES.items():
            if getattr(self, key) not in options:
                raise ValueError(f"{key}={getattr(self, key)!r} is not one of {options}")
        self.eps, self.step_size = parse_eps(self.eps), parse_eps(self.step_size)
        for key in ("eps", "step_size", "lr", "weight_decay", "beta", "gamma", "smooth", "proxy_lr", "prior_eps"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        if not 0 <= self.acq_aug <= 1 or not 1 <= self.acq_aug_severity <= 5:
            raise ValueError(f"acq_aug is a probability in [0, 1] and acq_aug_severity in 1..5, got {self.acq_aug} "
                             f"and {self.acq_aug_severity}")
        if self.extra_data is not None and self.data == "phantom":
            raise ValueError("extra_data pools another real site into training: train on real data (--data)")
        if self.cosine_period < 0:
            raise ValueError(f"cosine_period must be >= 0 epochs (0: the whole run), got {self.cosine_period}")
        for key in ("epochs", "batch_size", "img_size", "n_train", "n_val"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.attack != "none" and (self.eps == 0 or self.attack_steps < 1):
            raise ValueError(f"method {self.method!r} perturbs samples: it needs eps > 0 and attack_steps >= 1")
        if self.feedback != "none" and self.attack == "none":
            raise ValueError("a feedback rule needs a sample attack (attack='pgd' or 'trades')")
        if self.loss in ("trades", "mart", "score", "square_kl") and self.attack == "none":
            raise ValueError(f"loss {self.loss!r} compares clean and adversarial predictions: set an attack")
        if self.data is None:
            raise ValueError("data is not set: this preset trains on real CT. Fix: pass --data with the folder "
                             "holding your slices (e.g. the Kaggle SARS-CoV-2 COVID/ and non-COVID/ folders)")
        if self.data != "phantom" and not Path(self.data).exists():
            raise FileNotFoundError(f"data root {self.data!r} does not exist: pass --data phantom or the folder "
                                    "holding your CT slices (e.g. the Kaggle COVID/ and non-COVID/ folders)")
        for key in ("ood_data", "extra_data"):
            value = getattr(self, key)
            if value is not None and not Path(split_spec(value)[0]).exists():
                raise FileNotFoundError(f"{key} {value!r} does not exist: pass an existing folder (optionally "
                                        "with :train, :val or :test for one split of it)")
        self._resolved = True
        return self

    def run_dir(self) -> Path:
        """The output folder, with {method}, {model}, {img_size} and {seed} filled in."""
        return Path(self.out_dir.format(**self.to_dict()))

    def to_dict(self) -> dict:
        """Plain values (eps also as 'k/255' text) for YAML and logs."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.startswith("_")}
        if isinstance(d["eps"], float):
            d["eps_text"] = format_eps(d["eps"])
        return d


def _field_types() -> dict[str, type]:
    hints = {"int": int, "float": float, "str": str, "bool": bool}
    out = {}
    for f in dataclasses.fields(TrainConfig):
        if f.name.startswith("_"):
            continue
        out[f.name] = next((t for name, t in hints.items() if str(f.type).startswith(name)), str)
    return out


def coerce(key: str, value):
    """Converts a command-line string to the field's type ('none' -> None, 'true'/'false' -> bool)."""
    types = _field_types()
    if key not in types:
        raise ValueError(f"unknown config key {key!r}; known keys: {', '.join(sorted(types))}")
    if not isinstance(value, str):
        return value
    if value.lower() in ("none", "null"):
        return None
    kind = types[key]
    if kind is bool or value.lower() in ("true", "false"):
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"{key} takes true/false, got {value!r}")
        return value.lower() in ("true", "1", "yes")
    if key in ("eps", "step_size") and "/" in value:
        return value
    if kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            if key == "prior_threshold":
                return value
            raise ValueError(f"{key} takes a number, got {value!r}") from None
    return value


def load_config(preset: str | Path | None = None, overrides: dict | None = None) -> TrainConfig:
    """A resolved config from a preset name or YAML path plus overrides."""
    values = {}
    if preset:
        path = Path(preset)
        if not path.suffix:
            path = CONFIG_DIR / f"{preset}.yaml"
        if not path.exists():
            raise FileNotFoundError(f"config {preset!r} not found: use one of {PRESETS} or a path to a YAML file")
        values = yaml.safe_load(path.read_text()) or {}
    for key, value in (overrides or {}).items():
        values[key] = coerce(key, value)
    unknown = set(values) - set(_field_types()) - {"eps_text"}
    if unknown:
        raise ValueError(f"unknown config keys {sorted(unknown)}")
    values.pop("eps_text", None)
    return TrainConfig(**values).resolve()
