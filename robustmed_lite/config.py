"""Training configuration: one dataclass, presets in YAML, command-line overrides (as in timm).

``load_config("cpu-demo", {"method": "robustmed", "epochs": 3})`` reads the preset (a name in
``robustmed_lite/configs/`` or a path to a YAML file), applies the overrides, fills the method's components and
checks everything. A run directory keeps the resolved config as ``config.yaml``.

The weight noise's scale, warm-up and proxy settings are each method's own where nobody sets them
(``PUBLISHED_SETTINGS``: cap and robustmed take CAP's, awp TRADES-AWP's; epoch counts scaled to the run by
``scale_epochs``; ``settings_table`` lists them per preset). An option set on the command line or in a YAML file
of the user's own that the chosen method, loss or switches would ignore is an error (``refuse_ignored``); a
preset's values, and ``defaults`` shared by every method of a study, stay silent.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .common import format_eps, parse_eps
from .components import ATTACKS, FEEDBACK, LOSSES, METHOD_REGISTRY, PRIOR_VIEWS, WEIGHT_NOISE, register_method
from .data.duplicates import DUPLICATE_MODES
from .data.loaders import ROOT_LINK_TARGET, check_link
from .data.preprocess import INTENSITY_MODES, LUNG_REGIONS, split_spec
from .method.weight_perturbation import PROXY_OPTIMIZERS

CONFIG_DIR = Path(__file__).parent / "configs"
PRESETS = ("cpu-demo", "colab", "paper")
SIZE_KEYS = ("n_train", "n_val", "n_test")  # the sizes of the train, val and test splits (loaders.SPLITS)

# Each method is a row of component values (``components.register_method``); ``TrainConfig`` fields left at None
# take the method's value, else the fallback below. The parts themselves live in one registry each
# (``components``): sample attack (attacks.py), feedback rule (attacks.py), weight noise (perturbation.py), loss
# (objectives.py), prior view (prior.py).
#   attack: the sample-level perturbation (none / pgd: CE, PGD-AT style / trades: KL, TRADES style)
#   feedback: early stopping of that attack (none / fat / last_correct)
#   weight_noise: none / awp / proxy_attention, with its proxy_optimizer (adamw: CAP's / sgd: AWP's)
#   loss: the outer objective, and target_grad: whether the gradient flows through the soft target (square_kl)
#   prior: use the lung-prior view, and prior_view: how it is made (cap: CAP's code / package: earlier variant)
#   weight_feedback, prior_samples: the two readings of the paper's abstract (ablation switches, see below)
METHOD_FIELDS = (
    "attack",
    "feedback",
    "weight_noise",
    "proxy_optimizer",
    "loss",
    "target_grad",
    "prior",
    "prior_view",
    "weight_feedback",
    "prior_samples",
)
COMPONENT_DEFAULTS = dict(
    attack="none",
    feedback="none",
    weight_noise="none",
    proxy_optimizer="sgd",
    loss="ce",
    target_grad=False,
    prior=False,
    prior_view="cap",
    weight_feedback=False,
    prior_samples=0.0,
)

# CAP (Xu et al., AAAI 2023) as its public code trains: TRADES attack, proxy attention noise from a stateful AdamW
# proxy, square loss + KL with the gradient through the soft target, CAP's own guided-filter prior view.
_CAP = dict(
    COMPONENT_DEFAULTS,
    attack="trades",
    weight_noise="proxy_attention",
    proxy_optimizer="adamw",
    loss="square_kl",
    target_grad=True,
    prior=True,
)

# What the 2026 paper adds to CAP: ``robustmed`` differs from ``cap`` in these fields only (a test checks it).
# The two readings of the abstract are switches, off until the measurements decide (benchmarks/fidelity.py).
PAPER_ADDITIONS = {
    "feedback": (
        "last_correct",
        "early-stopping (prediction) feedback on the sample perturbation, in the spirit of "
        "FAT: perturb as strongly as possible while the prediction stays correct (stop at the last "
        "still-correct iterate; --feedback fat is FAT's reading)",
    ),
    "weight_feedback": (
        False,
        "interpretation of 'dual-level perturbations on samples and weights ... with an "
        "early-stopping feedback mechanism': the same feedback on the weight noise, gamma halved "
        "(up to weight_feedback_halvings times) while the perturbed model misclassifies more than "
        "weight_feedback_share of the clean batch; off until measured",
    ),
    "prior_samples": (
        0.0,
        "interpretation of 'generate augmented data': the prior views x_aug of this share of "
        "each batch join it as extra training samples (not only in the proxy's KL and the soft "
        "target); 0 = off until measured",
    ),
}


@dataclass(frozen=True)
class Published:
    """A setting as its authors' public code trains it.

    Attributes:
        value: The value ("lr": the model's learning rate; None: the setting does not exist there).
        source: Where it is set: repository, file and line (or the paper).
        run_epochs: The value counts epochs of a run this long; a run of another length takes it scaled
            (``scale_epochs``). None: not an epoch count.
    """

    value: object
    source: str
    run_epochs: int | None = None


CAP_CODE, AWP_CODE = "CAP", "AWP"
SOURCES = (
    "Sources: CAP is github.com/Quinn777/CAP at commit b8dad7d (Xu et al., AAAI 2023; main.py, src/), AWP is "
    "github.com/csdongxian/AWP at commit a7acf5d (Wu et al., NeurIPS 2020; trades_AWP/ is TRADES-AWP, AT_AWP/ "
    "is AT-AWP); file:line."
)
# The weight-noise settings of the two codes the methods follow: cap and robustmed take CAP's, awp takes TRADES-AWP's
# (``METHOD_SETTINGS`` says which method takes which). Both codes count epochs from 1 and switch the noise on with
# ``epoch >= warmup``: the warm-up is the first epoch with noise.
PUBLISHED_SETTINGS = {
    "cap": {
        "gamma": Published(1e-4, f"{CAP_CODE} main.py:122 (--cap_gamma)"),
        "weight_noise_warmup": Published(
            20,
            f"{CAP_CODE} main.py:123 (--cap_warmup), read as `epoch >= cap_warmup` (src/trainer/cap.py:93) "
            "with epochs counted from 1 (src/train.py:159); of a 200-epoch run (configs/sars-visformer-cap.json)",
            run_epochs=200,
        ),
        "proxy_optimizer": Published(
            "adamw", f"{CAP_CODE} src/train.py:105 (the model's optimizer, adamw in configs/sars-visformer-cap.json)"
        ),
        "proxy_lr": Published("lr", f"{CAP_CODE} src/train.py:105 (the model's lr, never scheduled)"),
        "proxy_weight_decay": Published(1e-4, f"{CAP_CODE} src/utils/schedules.py:46 (AdamW of get_optimizer)"),
    },
    "awp": {
        "gamma": Published(5e-3, f"{AWP_CODE} trades_AWP/train_trades_cifar.py:60 (--awp-gamma)"),
        "weight_noise_warmup": Published(
            10,
            f"{AWP_CODE} trades_AWP/train_trades_cifar.py:62 (--awp-warmup), read as `epoch >= awp_warmup` (:179) "
            "with epochs counted from 1 (:294); of a 200-epoch run (:24)",
            run_epochs=200,
        ),
        "proxy_optimizer": Published(
            "sgd", f"{AWP_CODE} trades_AWP/train_trades_cifar.py:279 (a fresh step from the model's weights)"
        ),
        "proxy_lr": Published(
            0.01,
            f"{AWP_CODE} AT_AWP/train_cifar10.py:241 (TRADES-AWP steps at the model's lr, "
            "trades_AWP/train_trades_cifar.py:279: the size of one stateless SGD step cancels in the "
            "layer-normalised direction)",
        ),
        "proxy_weight_decay": Published(None, f"{AWP_CODE} trades_AWP/train_trades_cifar.py:279 (SGD, no decay)"),
    },
}
# The weight-noise settings a method takes where neither the user nor the preset sets them (TrainConfig fields
# that default to None). A method registered without them takes those of the built-in method with its weight noise.
SETTING_FIELDS = ("gamma", "weight_noise_warmup", "proxy_lr", "proxy_weight_decay")
METHOD_SETTINGS = {"cap": "cap", "robustmed": "cap", "awp": "awp"}
SETTINGS_OF_NOISE = {"proxy_attention": "cap", "awp": "awp"}
# The attack-step ramp: CAP adds a step in every even epoch (counted from 1) up to epoch 18 when training with its
# configs (attack_policy: true); ``attack_warmup_epochs: 18`` with 10 steps is that ramp (``trainer.attack_steps_at``).
ATTACK_RAMP = Published(
    18,
    f"{CAP_CODE} src/utils/schedules.py:134-137 (AttackPolicy: one more step when 0 < epoch < 20 and epoch is "
    "even, epochs from 1, src/train.py:159), switched on by attack_policy: true in configs/sars-visformer-cap.json",
    run_epochs=200,
)


def scale_epochs(value: int, epochs: int, run_epochs: int) -> int:
    """The one rule for a published epoch count: ``value`` epochs of a ``run_epochs`` run become the same share of
    a run of ``epochs`` epochs, rounded half up, at least 1 (epochs count from 1: 1 is the first epoch)."""
    return max(1, math.floor(value * epochs / run_epochs + 0.5))


def method_setting(method: str, key: str, weight_noise: str, epochs: int, lr: float):
    """The value of weight-noise setting ``key`` that ``method`` trains with when nobody sets it: its own
    published value (``PUBLISHED_SETTINGS``), an epoch count scaled to a run of ``epochs`` epochs.

    Raises:
        ValueError: A method with a weight noise that no published settings cover (name the fix).
    """
    source = METHOD_SETTINGS.get(method) or SETTINGS_OF_NOISE.get(weight_noise)
    if source is None:
        raise ValueError(
            f"method {method!r} uses weight noise {weight_noise!r}, which has no published {key}. Fix: pass "
            f"--{key} (or set it in the YAML file)"
        )
    published = PUBLISHED_SETTINGS[source][key]
    if published.value == "lr":
        return lr
    if published.run_epochs:
        return scale_epochs(published.value, epochs, published.run_epochs)
    return published.value


_BUILTIN_METHODS = {
    "erm": dict(attack="none", loss="ce"),
    "pgd_at": dict(attack="pgd", loss="ce"),
    "trades": dict(attack="trades", loss="trades"),
    "mart": dict(attack="pgd", loss="mart"),
    # TRADES-AWP (Wu et al., NeurIPS 2020): its code's proxy is a stateless SGD step on the TRADES loss on x_adv.
    "awp": dict(attack="trades", weight_noise="awp", proxy_optimizer="sgd", loss="trades"),
    "fat": dict(attack="trades", feedback="fat", loss="trades"),
    "score": dict(attack="trades", loss="score"),
    "cap": dict(_CAP),
    "robustmed": {**_CAP, **{k: v for k, (v, _) in PAPER_ADDITIONS.items()}},
}
# The settings that decide which test images a run is scored on and how they are prepared: runs that share them
# can be compared on one test split (OOD suite, corruption stage).
DATA_KEYS = (
    "data",
    "img_size",
    "site",
    "n_test",
    "val_fraction",
    "test_fraction",
    "lung_crop",
    "intensity",
    "lung_region",
)
for _name, _row in _BUILTIN_METHODS.items():
    register_method(_name, **_row)

# Name -> the method's row of component values (live: a method registered later is in it too).
METHODS: Mapping[str, dict] = METHOD_REGISTRY


class _Choices(Mapping):
    """Field -> its allowed values; the component fields read their registry (live), the rest are fixed."""

    _fixed = {
        "proxy_optimizer": PROXY_OPTIMIZERS,
        "optimizer": ("adamw", "sgd"),
        "intensity": INTENSITY_MODES,
        "lung_region": LUNG_REGIONS,
        "schedule": ("cosine", "constant", "step"),
        "duplicates": DUPLICATE_MODES,
    }
    _registries = {
        "attack": ATTACKS,
        "feedback": FEEDBACK,
        "weight_noise": WEIGHT_NOISE,
        "loss": LOSSES,
        "prior_view": PRIOR_VIEWS,
    }

    def __getitem__(self, key: str) -> tuple[str, ...]:
        if key in self._registries:
            return self._registries[key].names()
        return self._fixed[key]

    def __iter__(self):
        return iter([*self._registries, *self._fixed])

    def __len__(self) -> int:
        return len(self._registries) + len(self._fixed)


CHOICES: Mapping[str, tuple[str, ...]] = _Choices()


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
    # Images per split: the phantom draws this many; real data takes a stratified sample of each split of this
    # size where the user set it (load_config), else every image (None)
    n_train: int | None = 2000
    n_val: int | None = 400
    n_test: int | None = 600
    # The sizes sample real data (load_config sets it for real data). False: real data uses every image whatever
    # the sizes say, as runs recorded before the sizes applied to real data did
    subsample_real: bool = False
    val_fraction: float = 0.15  # real data without an official split
    test_fraction: float = 0.15
    duplicates: str = "exact"  # real data: keep exact (or near) duplicate slices in one split; "off" to skip
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
    lr_step_epoch: int = 0  # schedule "step": the rate drops tenfold after this many epochs (Rice et al.'s decay)
    # sample perturbation (eps on the [0,1] pixel scale; strings like "8/255" are accepted)
    eps: float | str = 8 / 255
    step_size: float | str = 2 / 255
    attack_steps: int = 10
    # Ramp the attack steps up from 1 in epoch 1 to attack_steps in epoch attack_warmup_epochs (epochs counted from
    # 1, as CAP counts them: 18 with 10 steps is CAP's min(10, 1 + epoch // 2)); 0: no ramp
    attack_warmup_epochs: int = 0
    tau: int = 0  # FAT's extra steps after the first misclassified iterate
    # method components (None: the method's value, see METHODS and COMPONENT_DEFAULTS)
    attack: str | None = None
    feedback: str | None = None
    weight_noise: str | None = None
    loss: str | None = None
    prior: bool | None = None
    beta: float = 6.0
    smooth: float = 0.03  # weight of p(x_aug) in the soft target (CAP's code reuses the attack eps, 0.03)
    # Backpropagate through p(x_aug) in the soft target, as CAP's code does (cap, robustmed: true; false is the
    # stop-gradient ablation, which treats the soft target as fixed)
    target_grad: bool | None = None
    # Weight noise, each left at None taking the method's own published value (PUBLISHED_SETTINGS: cap and
    # robustmed CAP's, awp TRADES-AWP's; epoch counts scaled to the run by scale_epochs): the scale gamma, and the
    # first epoch with noise (counted from 1, as CAP and AWP count: 1 = from the start)
    gamma: float | None = None
    weight_noise_warmup: int | None = None
    # The proxy's optimizer: adamw (CAP's: one AdamW for the run, moments kept across batches; cap, robustmed) or
    # sgd (AWP's: stateless; awp). See perturbation.py.
    proxy_optimizer: str | None = None
    proxy_lr: float | None = None  # None: adamw at the model's initial lr (CAP, not scheduled); sgd at 0.01
    proxy_weight_decay: float | None = None  # the AdamW proxy's (None: CAP's 1e-4); the SGD proxy has none
    # Reading 1 of the abstract (weight-level feedback): halve gamma for the batch, up to weight_feedback_halvings
    # times, while the perturbed model (eval mode) misclassifies more than weight_feedback_share of the clean batch
    weight_feedback: bool | None = None
    weight_feedback_share: float = 0.25
    weight_feedback_halvings: int = 3
    # Reading 2 of the abstract (training on the prior view): the prior views of this share of each batch join it
    # as extra training samples, labelled as their images (0: off; 1: every image's view)
    prior_samples: float | None = None
    # lung prior
    prior_view: str | None = None  # cap: CAP's code (2x2 box, bicubic, whole-image q); package: earlier variant
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
    # Under torchrun on GPUs: BatchNorm normalises with the statistics of the global batch (SyncBatchNorm), not
    # each rank's share. No effect in one process; refused on CPUs (PyTorch's SyncBatchNorm is GPU-only)
    sync_batchnorm: bool = False
    out_dir: str = "runs/{method}-{model}-{img_size}px-seed{seed}"
    init_from: str | None = None  # warm start: weights of a checkpoint (CAP starts from a clean model)
    progress: bool = True
    # resolved component values, filled by `resolve()`
    _resolved: bool = field(default=False, repr=False)

    def resolve(self) -> TrainConfig:
        """Fills the method's components, parses eps, and checks every value; returns self."""
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}: choose one of {sorted(METHODS)}")
        row = METHODS[self.method]
        unknown = sorted(set(row) - set(METHOD_FIELDS))
        if unknown:
            raise ValueError(f"method {self.method!r} sets {unknown}, which are not method fields {METHOD_FIELDS}")
        for key in METHOD_FIELDS:
            if getattr(self, key) is None:
                setattr(self, key, row.get(key, COMPONENT_DEFAULTS[key]))
        if self.weight_noise != "none":  # the method's own weight-noise settings where nobody set them
            for key in SETTING_FIELDS:
                if getattr(self, key) is None and not (key == "proxy_weight_decay" and self.proxy_optimizer == "sgd"):
                    setattr(self, key, self._setting(key))
        for key, options in CHOICES.items():
            if getattr(self, key) not in options:
                raise ValueError(f"{key}={getattr(self, key)!r} is not one of {options}")
        self.eps, self.step_size = parse_eps(self.eps), parse_eps(self.step_size)
        for key in (
            "eps",
            "step_size",
            "lr",
            "weight_decay",
            "beta",
            "gamma",
            "smooth",
            "proxy_lr",
            "prior_eps",
            "proxy_weight_decay",
            "weight_feedback_halvings",
            "weight_noise_warmup",
            "attack_warmup_epochs",
        ):
            if getattr(self, key) is not None and getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        for key in ("weight_feedback_share", "prior_samples"):
            if not 0 <= getattr(self, key) <= 1:
                raise ValueError(f"{key} is a share of the batch in [0, 1], got {getattr(self, key)}")
        if self.weight_feedback and self.weight_noise == "none":
            raise ValueError("weight_feedback scales the weight noise: set a weight_noise (awp or proxy_attention)")
        if self.prior_samples > 0 and not self.prior:
            raise ValueError("prior_samples trains on the lung-prior views: set --prior true (or use cap/robustmed)")
        if not 0 <= self.acq_aug <= 1 or not 1 <= self.acq_aug_severity <= 5:
            raise ValueError(
                f"acq_aug is a probability in [0, 1] and acq_aug_severity in 1..5, got {self.acq_aug} "
                f"and {self.acq_aug_severity}"
            )
        if self.extra_data is not None and self.data == "phantom":
            raise ValueError("extra_data pools another real site into training: train on real data (--data)")
        if self.schedule == "step" and not 0 < self.lr_step_epoch < self.epochs:
            raise ValueError(
                f"schedule 'step' needs 0 < lr_step_epoch < epochs ({self.epochs}), got "
                f"{self.lr_step_epoch}. Fix: pass --lr_step_epoch, e.g. {max(1, self.epochs // 4)}"
            )
        if self.cosine_period < 0:
            raise ValueError(f"cosine_period must be >= 0 epochs (0: the whole run), got {self.cosine_period}")
        for key in ("epochs", "batch_size", "img_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}. Fix: pass --{key} 1 or more")
        self._check_sizes()
        if self.attack != "none" and (self.eps == 0 or self.attack_steps < 1):
            raise ValueError(f"method {self.method!r} perturbs samples: it needs eps > 0 and attack_steps >= 1")
        if self.feedback != "none" and self.attack == "none":
            raise ValueError("a feedback rule needs a sample attack (attack='pgd' or 'trades')")
        if LOSSES.entry(self.loss).info.get("needs_attack") and self.attack == "none":
            raise ValueError(f"loss {self.loss!r} compares clean and adversarial predictions: set an attack")
        if self.data is None:
            raise ValueError(
                "data is not set: this preset trains on real CT. Fix: pass --data with the folder "
                "holding your slices (e.g. the Kaggle SARS-CoV-2 COVID/ and non-COVID/ folders)"
            )
        if self.data != "phantom":
            check_link(Path(self.data), ROOT_LINK_TARGET, "--data")
            if not Path(self.data).exists():
                raise FileNotFoundError(
                    f"data root {self.data!r} does not exist: pass --data phantom or the folder "
                    "holding your CT slices (e.g. the Kaggle COVID/ and non-COVID/ folders)"
                )
        for key in ("ood_data", "extra_data"):
            value = getattr(self, key)
            if value is None:
                continue
            check_link(Path(split_spec(value)[0]), ROOT_LINK_TARGET, f"--{key}")
            if not Path(split_spec(value)[0]).exists():
                raise FileNotFoundError(
                    f"{key} {value!r} does not exist: pass an existing folder (optionally "
                    "with :train, :val or :test for one split of it)"
                )
        self._resolved = True
        return self

    def _check_sizes(self) -> None:
        """Each split size is a count >= 1 where it is used (the phantom's n_test may be 0); None, every image,
        exists for real data only."""
        real = self.data != "phantom"
        for key in SIZE_KEYS:
            value = getattr(self, key)
            if value is None and not real:
                raise ValueError(
                    f"{key} none (every image) applies to real data; the phantom draws a number of images. Fix: "
                    f"pass --{key} with a number, e.g. --{key} 200"
                )
            if value is not None and value < (0 if key == "n_test" and not real else 1):
                raise ValueError(f"{key} must be >= 1, got {value}. Fix: pass --{key} 1 or more")

    def _setting(self, key: str):
        """A weight-noise setting nobody set: the method's own (``method_setting``); the SGD proxy's lr: 0.01."""
        if key == "proxy_lr":  # follows the proxy's optimizer, which a user may change apart from the method
            return self.lr if self.proxy_optimizer == "adamw" else 0.01
        value = method_setting(self.method, key, self.weight_noise, self.epochs, self.lr)
        if key == "proxy_weight_decay" and value is None:  # an AdamW proxy where the method's code has none (AWP)
            return PUBLISHED_SETTINGS["cap"]["proxy_weight_decay"].value
        return value

    def run_dir(self) -> Path:
        """The output folder, with {method}, {model}, {img_size} and {seed} filled in."""
        return Path(self.out_dir.format(**self.to_dict()))

    def to_dict(self) -> dict:
        """Plain values (eps also as 'k/255' text) for YAML and logs."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.startswith("_")}
        if isinstance(d["eps"], float):
            d["eps_text"] = format_eps(d["eps"])
        return d


# Fields added after runs had been saved without them (config_differences): for each, the value with which today's
# code trains as the code did before the field existed, and when the field has no effect at all. A saved run that
# lacks one of these keys matches only where the current value is that one or has no effect; any other missing
# key is a difference.
ADDED_FIELDS = {
    "prior_view": ("package", lambda c: not c.prior),
    "proxy_optimizer": ("sgd", lambda c: c.weight_noise == "none"),
    "proxy_weight_decay": (None, lambda c: c.weight_noise == "none" or c.proxy_optimizer == "sgd"),
    "weight_feedback": (False, lambda c: c.weight_noise == "none"),
    "weight_feedback_share": (None, lambda c: not c.weight_feedback),
    "weight_feedback_halvings": (None, lambda c: not c.weight_feedback),
    "prior_samples": (0.0, lambda c: False),
    "sync_batchnorm": (False, lambda c: False),
    "lr_step_epoch": (0, lambda c: c.schedule != "step"),
    "duplicates": ("off", lambda c: c.data == "phantom"),  # the phantom's splits are drawn apart by seed
    "subsample_real": (False, lambda c: all(getattr(c, k) is None for k in SIZE_KEYS)),  # see upgrade_record
}


def upgrade_record(saved: dict) -> dict:
    """A run's saved config as today's code reads it: a run of real data recorded before the sizes applied to
    real data (no ``subsample_real`` key) used every image, so its sizes read as None (every image)."""
    if "subsample_real" in saved or saved.get("data") in ("phantom", None):
        return saved
    return {**saved, **dict.fromkeys(SIZE_KEYS, None)}


# Settings that only some methods, losses or switches read: (settings, ignored(cfg), what reads them, the fix). A
# setting the user sets explicitly (command line or a YAML file of their own) where the resolved config ignores
# it is an error (``ignored_settings``); a preset's values, which serve every method, stay silent. Loss rules
# cover the built-in losses only: a registered loss may read any setting.
_BUILTIN_LOSS_READS = {"ce": (), "trades": ("beta",), "mart": ("beta",), "score": ("beta",)}
_BUILTIN_LOSS_READS["square_kl"] = ("beta", "smooth", "target_grad")
# The settings of the weight noise (with its proxy and its feedback switch): read only where there is weight noise.
WEIGHT_NOISE_KEYS = (
    "gamma",
    "weight_noise_warmup",
    "proxy_optimizer",
    "proxy_lr",
    "proxy_weight_decay",
    "weight_feedback",
)
_IGNORE_RULES = (
    (
        ("smooth", "target_grad"),
        lambda c: c.loss in _BUILTIN_LOSS_READS and c.loss != "square_kl",
        "the square_kl loss (cap, robustmed)",
        "drop it, or pass --loss square_kl",
    ),
    (
        ("tau",),
        lambda c: c.feedback != "fat",
        "the fat feedback rule (method fat, or --feedback fat)",
        "drop it, or pass --feedback fat",
    ),
    (
        WEIGHT_NOISE_KEYS,
        lambda c: c.weight_noise == "none",
        "a weight noise (awp, or cap's and robustmed's proxy_attention)",
        "drop it, or choose a method with weight noise (awp, cap, robustmed) or pass --weight_noise",
    ),
    (
        ("weight_feedback_share", "weight_feedback_halvings"),
        lambda c: not c.weight_feedback,
        "the weight-level feedback (--weight_feedback true)",
        "drop it, or pass --weight_feedback true",
    ),
    (
        ("proxy_weight_decay",),
        lambda c: c.weight_noise != "none" and c.proxy_optimizer == "sgd",
        "the AdamW proxy (--proxy_optimizer adamw; the SGD proxy, AWP's, has no weight decay)",
        "drop it, or pass --proxy_optimizer adamw",
    ),
    (
        ("prior_view", "prior_threshold", "prior_radius", "prior_eps", "prior_s"),
        lambda c: not c.prior,
        "the lung-prior view (--prior true; cap, robustmed)",
        "drop it, or pass --prior true",
    ),
)


def ignored_settings(cfg: TrainConfig) -> dict[str, str]:
    """Setting -> why the resolved ``cfg`` ignores it ("read only by ..., and ..."), for every setting of the
    rules above that its method, loss and switches leave unread."""
    out = {}
    for keys, ignored, reader, fix in _IGNORE_RULES:
        if ignored(cfg):
            for key in keys:
                out.setdefault(key, f"only {reader} reads it; here method={cfg.method!r}. Fix: {fix}")
    return out


def refuse_ignored(cfg: TrainConfig, explicit) -> None:
    """Raises if a setting in ``explicit`` (the keys the user set) would be ignored by ``cfg``.

    Raises:
        ValueError: Names the option, what would read it, and the fix.
    """
    explicit = set(explicit)
    ignored = ignored_settings(cfg)
    found = [f"{key}={getattr(cfg, key)!r} is set, but {ignored[key]}" for key in sorted(explicit & set(ignored))]
    # proxy_attention's proxy loss is -CE + beta * KL(p(x) || p(x_aug)): with no prior view x_aug is x and the KL
    # term is zero, so the weight noise quietly becomes AWP's -CE direction on attention weights.
    if cfg.weight_noise == "proxy_attention" and not cfg.prior and explicit & {"prior", "weight_noise"}:
        said = (
            "weight_noise='proxy_attention' with prior=False: its proxy loss compares each image with its lung-prior "
            "view, which is the image itself without a prior, so it reduces to -CE"
        )
        if "weight_noise" in explicit:  # asked for the proxy attention noise while removing what defines it
            found.append(f"{said}. Fix: keep --prior true, or pass --weight_noise awp")
        else:  # switching the prior off is what the ablation's no-prior row means: said, not refused
            warnings.warn(f"{said} (the no-prior ablation)", stacklevel=3)
    if found:
        raise ValueError("; ".join(found))


def method_row(method: str) -> dict:
    """A method's value of every ``METHOD_FIELDS`` field (its own, else ``COMPONENT_DEFAULTS``)."""
    row = METHODS[method]
    return {key: row.get(key, COMPONENT_DEFAULTS[key]) for key in METHOD_FIELDS}


def methods_table(methods=None):
    """The methods and their parts, read from the registries: one row per method, one column per part (with the
    registered part's description in ``describe``). ``methods``: names (default all registered)."""
    import pandas as pd

    registries = {
        "attack": ATTACKS,
        "feedback": FEEDBACK,
        "weight_noise": WEIGHT_NOISE,
        "loss": LOSSES,
        "prior_view": PRIOR_VIEWS,
    }
    rows = []
    for name in methods or list(METHODS):
        row = method_row(name)
        out = {"method": name}
        for key in METHOD_FIELDS:
            value = row[key]
            if key == "proxy_optimizer" and row["weight_noise"] == "none":
                value = "-"
            if key == "target_grad" and row["loss"] != "square_kl":
                value = "-"
            if key == "prior_view" and not row["prior"]:
                value = "-"
            out[key] = value
        out["describe"] = "; ".join(
            f"{key}: {registries[key].entry(row[key]).description}"
            for key in registries
            if out[key] not in ("-", "none") and registries[key].entry(row[key]).description
        )
        rows.append(out)
    return pd.DataFrame(rows)


# Why a preset departs from the published values scaled to its length (a test checks that every per-method
# setting a preset sets has its reason here).
PRESET_CHANGES = {
    ("cpu-demo", "weight_noise_warmup"): (
        "noise from epoch 3 for every method: scaled to 6 epochs both codes' warm-ups start in epoch 1, and weight "
        "noise from the first step of a random network made AWP (noise on every layer) collapse to a constant model"
    ),
    ("cpu-demo", "attack_warmup_epochs"): "no ramp: scaled to 6 epochs CAP's ramp ends in epoch 1 (the same)",
}
SETTINGS_TABLE_FIELDS = ("gamma", "weight_noise_warmup", "proxy_optimizer", "proxy_lr", "proxy_weight_decay")


def settings_table(presets=PRESETS):
    """The weight-noise settings of every method with weight noise, and the attack-step ramp of every method with
    an attack: per setting its published value and source (``PUBLISHED_SETTINGS``, ``ATTACK_RAMP``), the value
    each preset trains with, and what a preset changes and why (``PRESET_CHANGES``; otherwise the published
    value, an epoch count scaled to the preset's length by ``scale_epochs``).

    Returns:
        A DataFrame: method, setting, published, source, one column per preset, ``preset changes``.
    """
    import pandas as pd

    with_noise = [m for m in METHODS if method_row(m)["weight_noise"] != "none"]
    configs = {  # the paper preset has no data of its own: the phantom stands in (data does not change these)
        (p, m): load_config(p, {"method": m}, defaults={"data": "phantom"}) for p in presets for m in METHODS
    }

    def changes(key: str, published: Published) -> str:
        notes = []
        for p in presets:
            epochs = configs[(p, "erm")].epochs
            if (p, key) in PRESET_CHANGES:
                notes.append(f"{p}: {PRESET_CHANGES[(p, key)]}")
            elif published.run_epochs and epochs != published.run_epochs:
                notes.append(f"{p}: scaled to {epochs} of {published.run_epochs} epochs (scale_epochs)")
        return "; ".join(notes)

    rows = []
    for method in with_noise:
        source = METHOD_SETTINGS.get(method) or SETTINGS_OF_NOISE.get(method_row(method)["weight_noise"])
        for key in SETTINGS_TABLE_FIELDS:
            published = PUBLISHED_SETTINGS[source][key]
            value = "the model's lr" if published.value == "lr" else published.value
            rows.append(
                {
                    "method": method,
                    "setting": key,
                    "published": "-" if value is None else value,
                    "source": published.source,
                    **{p: _shown(getattr(configs[(p, method)], key)) for p in presets},
                    "preset changes": changes(key, published),
                }
            )
    attackers = [m for m in METHODS if method_row(m)["attack"] != "none"]
    rows.append(
        {
            "method": "every method with an attack (" + ", ".join(attackers) + ")",
            "setting": "attack_warmup_epochs",
            "published": f"{ATTACK_RAMP.value} (10 steps)",
            "source": ATTACK_RAMP.source,
            **{p: _shown(configs[(p, attackers[0])].attack_warmup_epochs) for p in presets},
            "preset changes": changes("attack_warmup_epochs", ATTACK_RAMP),
        }
    )
    return pd.DataFrame(rows)


def _shown(value):
    return "-" if value is None else value


def settings_markdown(presets=PRESETS) -> str:
    """``settings_table`` as a Markdown table (for the README and the book)."""
    table = settings_table(presets)
    lines = ["| " + " | ".join(table.columns) + " |", "|" + " --- |" * len(table.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n\n" + SOURCES + "\n"


def paper_additions_table(methods=("awp", "cap", "robustmed")):
    """The method fields of ``methods`` side by side (default TRADES-AWP, CAP, the paper's method), with a
    column saying which fields are the paper's additions to CAP (``PAPER_ADDITIONS``) and what they mean."""
    table = methods_table(list(methods)).set_index("method")[list(METHOD_FIELDS)].T  # "-": does not apply
    table.index.name = "field"
    table["paper's addition to CAP"] = [PAPER_ADDITIONS[k][1] if k in PAPER_ADDITIONS else "" for k in table.index]
    return table


# How a command-line or YAML value is read, one rule per kind of field (``field_kinds``):
#   bool       true/false, yes/no, 1/0 (any case), a YAML boolean or the integers 0 and 1; nothing else
#   int        an integer ('3', 3, 3.0); never a boolean, never '1.5'
#   float      a finite number; never a boolean
#   eps        a finite number >= 0 or a fraction 'k/d' with d > 0 (eps, step_size), kept as written
#   threshold  a number or 'otsu' (prior_threshold)
#   str        any text
# 'none' / 'null' (or YAML null) is None where a field may be None, except in a component whose choices include
# the word 'none' (--feedback none means no feedback, not the method's default).
_SPECIAL_KINDS = {"eps": "eps", "step_size": "eps", "prior_threshold": "threshold"}
_KIND_HELP = {
    "bool": "true or false",
    "int": "an integer",
    "float": "a number",
    "eps": "a number or a fraction such as 8/255",
    "threshold": "a number or 'otsu'",
    "str": "text",
}
_NULLS = ("none", "null")


def field_kinds() -> dict[str, tuple[str, bool]]:
    """Field name -> (kind, may be None), from the declared types of ``TrainConfig`` (see the rules above)."""
    out = {}
    for f in dataclasses.fields(TrainConfig):
        if f.name.startswith("_"):
            continue
        declared = str(f.type)
        first = declared.split("|")[0].strip()
        kind = _SPECIAL_KINDS.get(f.name, first if first in ("bool", "int", "float") else "str")
        # str fields without a default value of their own (data: null in the paper preset) may be None too.
        optional = "None" in declared or kind == "str"
        out[f.name] = (kind, optional)
    return out


def _bad(key: str, kind: str, value) -> ValueError:
    shown = repr(value)
    return ValueError(f"{key} takes {_KIND_HELP[kind]}, got {shown}. Fix: pass --{key} with {_KIND_HELP[kind]}")


def _parse_int(key: str, value):
    if isinstance(value, bool):
        raise _bad(key, "int", value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                raise _bad(key, "int", value) from None
            if not number.is_integer():
                raise _bad(key, "int", value) from None
            return int(number)
    if isinstance(value, numbers.Real):
        number = float(value)
        if not math.isfinite(number) or not number.is_integer():
            raise _bad(key, "int", value)
        return int(number)
    raise _bad(key, "int", value)


def _parse_float(key: str, value):
    if isinstance(value, bool) or not isinstance(value, (str, numbers.Real)):
        raise _bad(key, "float", value)
    try:
        number = float(value)
    except ValueError:
        raise _bad(key, "float", value) from None
    if not math.isfinite(number):
        raise ValueError(f"{key} takes a finite number, got {value!r}. Fix: pass --{key} with a finite number")
    return number


def _parse_radius(key: str, value):
    """An eps-kind value (a number or k/d on the [0,1] pixel scale, >= 0), kept as written."""
    if isinstance(value, bool) or not isinstance(value, (str, numbers.Real)):
        raise _bad(key, "eps", value)
    if value.strip().startswith("-") if isinstance(value, str) else value < 0:
        raise ValueError(
            f"{key} must be >= 0 (a radius on the [0,1] pixel scale), got {value!r}. Fix: pass --{key} with a "
            f"number >= 0 or k/255, e.g. --{key} 8/255 (= 0.0314) or --{key} 0.03"
        )
    try:
        parse_eps(value)  # checks the number, or the fraction and its denominator
    except ValueError as err:
        raise ValueError(f"{key}: {err}. Fix: pass --{key} with {_KIND_HELP['eps']}") from None
    return value.strip() if isinstance(value, str) else float(value)


def _parse_bool(key: str, value):
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral) and value in (0, 1):  # as the strings '0' and '1'
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.strip().lower() in ("true", "yes", "1")
    raise _bad(key, "bool", value)


def coerce(key: str, value):
    """A command-line string or YAML value converted by the field's declared kind (rules above).

    Raises:
        ValueError: An unknown key, or a value the field's kind does not take; the message names both.
    """
    kinds = field_kinds()
    if key not in kinds:
        raise ValueError(f"unknown config key {key!r}; known keys: {', '.join(sorted(kinds))}")
    kind, optional = kinds[key]
    none_is_a_choice = "none" in CHOICES.get(key, ())
    if value is None or (isinstance(value, str) and value.strip().lower() in _NULLS and not none_is_a_choice):
        if optional:
            return None
        raise _bad(key, kind, value)
    if kind == "bool":
        return _parse_bool(key, value)
    if kind == "int":
        return _parse_int(key, value)
    if kind == "float":
        return _parse_float(key, value)
    if kind == "eps":
        return _parse_radius(key, value)
    if kind == "threshold":
        if isinstance(value, str) and value.strip().lower() == "otsu":
            return "otsu"
        try:
            return _parse_float(key, value)
        except ValueError:
            raise _bad(key, kind, value) from None
    if isinstance(value, bool):  # a YAML 'true' in a text field is a typo, not the text 'True'
        raise _bad(key, kind, value)
    if none_is_a_choice and isinstance(value, str) and value.strip().lower() == "none":
        return "none"
    return str(value) if isinstance(value, numbers.Real) else value


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} is given twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def load_config(
    preset: str | Path | None = None, overrides: dict | None = None, defaults: dict | None = None
) -> TrainConfig:
    """A resolved config from a preset name or YAML path plus overrides.

    Args:
        preset: A preset name (``PRESETS``) or the path of a YAML file.
        overrides: Values the user set (the command line's): one that the method, loss or switches would ignore
            is an error (``refuse_ignored``), as is one in a YAML file of the user's own.
        defaults: Values that apply like the preset's own, on top of it (a study's or a test's settings for every
            method): silent where a method ignores them. ``overrides`` win.
    """
    values, explicit, is_record = {}, set(), False
    if preset:
        path = Path(preset)
        if not path.suffix:
            path = CONFIG_DIR / f"{preset}.yaml"
        if not path.exists():
            raise FileNotFoundError(f"config {preset!r} not found: use one of {PRESETS} or a path to a YAML file")
        try:
            values = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ValueError(f"config {path} is not valid YAML: {problem}{where}. Fix: correct the file") from None
        if not isinstance(values, dict):
            raise ValueError(
                f"config {path} holds a {type(values).__name__}, not a mapping of config keys. Fix: "
                "write one 'key: value' per line"
            )
        # A run's config.yaml (it carries the derived eps_text) records every resolved value: a record, not choices.
        is_record = values.pop("eps_text", None) is not None
        if is_record:
            values = upgrade_record(values)
        unknown = set(values) - set(field_kinds())
        if unknown:
            raise ValueError(
                f"unknown config keys {sorted(unknown)} in {path}. Fix: remove them; known keys: "
                f"{', '.join(sorted(field_kinds()))}"
            )
        try:  # the preset is read by the same rules as the command line
            values = {key: coerce(key, value) for key, value in values.items()}
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
        if path.parent.resolve() != CONFIG_DIR.resolve() and not is_record:
            explicit |= set(values)  # the user's own YAML file: each key is a choice
    for key, value in (defaults or {}).items():
        values[key] = coerce(key, value)
    for key, value in (overrides or {}).items():
        values[key] = coerce(key, value)
        explicit.add(key)
    if not is_record and values.get("data", TrainConfig.data) not in ("phantom", None):
        # Real data: a size the user set samples its split; a preset's sizes are the phantom's and do not apply.
        values.update({key: None for key in SIZE_KEYS if key not in explicit})
        if "subsample_real" not in explicit:
            values["subsample_real"] = True
    cfg = TrainConfig(**values).resolve()
    refuse_ignored(cfg, explicit)
    return cfg
