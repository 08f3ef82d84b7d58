"""The trainer: every method of the book in one loop, with validation-chosen checkpoints and exact resume.

One training step, whatever the method (components from ``config.METHODS``, each part from its registry in
``components``)::

    x, x_aug, y             a batch and its lung-prior view (the same flips); with prior_samples > 0 the views of
                            a share of the batch join it as extra samples
    x_adv = attack(x, y)    sample perturbation in eval mode: PGD (CE), TRADES (KL), optionally early-stopped
    w += gamma * d          weight noise from a one-step proxy adversary (AWP or proxy attention); with
                            weight_feedback, gamma is halved while the perturbed model gets too much of x wrong
    loss(model, batch)      CE, TRADES, MART, SCORE, the method's square loss + KL, or any registered loss
    optimizer step, then the weight noise is taken out again

Each epoch ends with a validation pass (clean accuracy on the whole validation split, PGD accuracy on ``eval_n``
of its images, a stratified sample); the best clean and best robust checkpoints are chosen there, never on the
test split. The last checkpoint holds the optimizer, scheduler and RNG states and the weight-noise proxy's
optimizer state (CAP's AdamW moments), so a resumed run is bitwise the uninterrupted one on a CPU. The run
directory records the config, the seed, the library versions and a per-epoch log.

Launched by ``torchrun``, one run is shared by the launched processes (``distributed``): each rank trains on its
share of every global batch, DistributedDataParallel averages the gradients, the weight noise's proxy steps on
the averaged gradients (the same noise on every rank), validation adds up the ranks' counts, and rank 0 alone
writes the run directory.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .attacks import PGD
from .augment import acquisition_augment
from .common import CLASS_NAMES, eval_mode, model_device
from .components import ATTACKS, LOSSES, WEIGHT_NOISE, Batch
from .config import ADDED_FIELDS, TrainConfig
from .data import SPLITS, DataError, load_images, stratified_subset
from .dataset import PriorDataset
from .evaluate import predict_logits
from .models import create_model
from .phantom import make_phantom_dataset
from .preprocess import domain_label, load_domain, prepare, resolve_spec, source_size
from .prior import lung_prior
from .runinfo import environment_info, get_device, progress_options, seed_everything
from .slicestore import SliceStore, is_slice_store

CHECKPOINTS = ("last.pt", "best_clean.pt", "best_robust.pt")
# What each use of a checkpoint reads from it.
MODEL_KEYS = ("model", "config")
RESUME_KEYS = ("model", "config", "optimizer", "scheduler", "rng_cpu", "epoch", "history", "best")
# A finished run restored from a shipped one (``bookruns``) has no optimizer state: it can be loaded, not continued.
RESTORED_KEYS = ("model", "config", "epoch", "history", "best")
MIN_EVAL_PER_CLASS = 10  # fewer images of a class in a validation or test split give meaningless rates
# Validation predicts in blocks of VAL_BLOCK images and attacks in chunks of VAL_ATTACK_CHUNK; a distributed run
# shares the blocks out whole, so that every rank computes exactly what one process computes for them.
VAL_BLOCK, VAL_ATTACK_CHUNK = 256, 128


class CheckpointError(ValueError):
    """A file that cannot be used as a robustmed_lite checkpoint; the message names it and the cause."""


@dataclass
class DataSplits:
    """Training dataset (with prior views) and held-out tensors: val (model selection), test, a shifted test set
    (another phantom site, or another hospital) where one exists, and the pooled site's own test split when
    training on several sites. Every split went through the same preparation (``preprocess.prepare``).

    Attributes:
        crop_fallbacks: Per split, slices a lung crop could not frame (kept whole) or a lung-region test
            blanked; empty without either.
    """

    train: PriorDataset
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    shift: tuple[torch.Tensor, torch.Tensor] | None
    shift_name: str | None
    extra_test: tuple[torch.Tensor, torch.Tensor] | None = None
    extra_name: str | None = None
    crop_fallbacks: dict[str, int] = field(default_factory=dict)


def build_data(cfg: TrainConfig) -> DataSplits:
    """The splits a config asks for. Phantom data uses fixed data seeds (0, 1, 2: train, val, test), so the
    training seed changes only the training; the shifted test set shows the test patients at ``ood_site``.
    Real data are split by the data set's own split where it has one, else stratified with seed 0; with
    ``extra_data`` the other site's train and val parts join training and validation (``site_balanced``:
    each site fills half of every epoch) and its test part is reported as ``extra_test``."""
    prior_kwargs = dict(threshold=cfg.prior_threshold, radius=cfg.prior_radius, eps=cfg.prior_eps, s=cfg.prior_s,
                        view=cfg.prior_view)
    fallbacks = {}

    def prepared(name: str, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images, report = prepare(images, cfg.img_size, cfg.lung_crop, cfg.intensity, cfg.lung_region)
        if report is not None:
            fallbacks[name] = report.n_fallback
        return images, labels

    extra_test = extra_name = None
    if cfg.data == "phantom":
        train = prepared("train", *make_phantom_dataset(cfg.n_train, cfg.img_size, cfg.site, seed=0)[:2])
        val = prepared("val", *make_phantom_dataset(cfg.n_val, cfg.img_size, cfg.site, seed=1)[:2])
        test = prepared("test", *make_phantom_dataset(cfg.n_test, cfg.img_size, cfg.site, seed=2)[:2])
        shift = prepared("shift", *make_phantom_dataset(cfg.n_test, cfg.img_size, cfg.ood_site, seed=2)[:2])
        shift_name = f"phantom site {cfg.ood_site}"
    else:
        if is_slice_store(cfg.data):  # larger than memory: training slices are read from disk batch by batch
            store = open_training_store(cfg)
            parts = store.splits(val=cfg.val_fraction, test=cfg.test_fraction, seed=0)
            train = (store.view(parts["train"]), store.labels[parts["train"]])
            val, test = (prepared(k, store.load(parts[k]), store.labels[parts[k]]) for k in ("val", "test"))
        else:
            data = load_images(cfg.data, source_size(cfg.img_size, cfg.lung_crop), progress=cfg.progress)
            parts = data.splits(val=cfg.val_fraction, test=cfg.test_fraction, seed=0)
            train, val, test = (prepared(k, data.images[parts[k]], data.labels[parts[k]]) for k in SPLITS)
        shift, shift_name = None, None
        if cfg.ood_data:
            images, labels, report = load_domain(cfg.ood_data, cfg.img_size, cfg.lung_crop, cfg.intensity,
                                                 cfg.lung_region, progress=cfg.progress)
            shift, shift_name = (images, labels), domain_label(cfg.ood_data)
            if report is not None:
                fallbacks["shift"] = report.n_fallback
    sites = None
    if cfg.extra_data:
        other = load_images(cfg.extra_data, source_size(cfg.img_size, cfg.lung_crop), progress=cfg.progress)
        other_parts = other.splits(val=cfg.val_fraction, test=cfg.test_fraction, seed=0)
        extra = {k: prepared(f"extra {k}", other.images[other_parts[k]], other.labels[other_parts[k]])
                 for k in SPLITS}
        sites = torch.cat([torch.zeros(len(train[1]), dtype=torch.long), torch.ones(len(extra["train"][1]),
                                                                                    dtype=torch.long)])
        train = tuple(torch.cat([a, b]) for a, b in zip(train, extra["train"]))
        val = tuple(torch.cat([a, b]) for a, b in zip(val, extra["val"]))
        extra_test, extra_name = extra["test"], f"{Path(cfg.extra_data).name} (test)"
    check_split_classes({"train": train[1], "val": val[1], "test": test[1]}, cfg.data, cfg.extra_data)
    # Training never reads the phantom's masks, so the dataset does not gather and flip them every batch.
    dataset = PriorDataset(*train, prior=cfg.prior, hflip=cfg.hflip, vflip=cfg.vflip, seed=cfg.seed,
                           prior_kwargs=prior_kwargs, sites=sites if cfg.site_balanced else None)
    return DataSplits(dataset, val, test, shift, shift_name, extra_test, extra_name, fallbacks)


def validation_attack(cfg: TrainConfig) -> PGD:
    """The PGD a run validates with (and ``compare_methods`` tests with): eval_attack_steps at the training eps,
    step eps/4, seeded with the run."""
    return PGD(cfg.eps, alpha=cfg.eps / 4, steps=cfg.eval_attack_steps, loss="ce", seed=cfg.seed)


def raw_test_split(cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The test split of a config *before* its preparation (crop, standardisation, lung region), at the size the
    preparation starts from (``preprocess.source_size``): what a scanner change acts on. ``prepare`` turns it into
    ``build_data(cfg).test``."""
    if cfg.data == "phantom":
        return make_phantom_dataset(cfg.n_test, cfg.img_size, cfg.site, seed=2)[:2]
    if is_slice_store(cfg.data):
        store = open_training_store(cfg)
        test = store.splits(val=cfg.val_fraction, test=cfg.test_fraction, seed=0)["test"]
        return store.load(test), store.labels[test]
    data = load_images(cfg.data, source_size(cfg.img_size, cfg.lung_crop), progress=False)
    test = data.splits(val=cfg.val_fraction, test=cfg.test_fraction, seed=0)["test"]
    return data.images[test], data.labels[test]


def open_training_store(cfg: TrainConfig) -> SliceStore:
    """The slice store ``cfg.data`` names, checked against the settings a store supports: slices are used as
    stored (no crop or per-slice standardisation up front, which would need the whole set in memory)."""
    store = SliceStore(cfg.data)
    refused = {"img_size": (cfg.img_size != store.size, f"write the store at --size {cfg.img_size}, or train "
                            f"with img_size {store.size}"),
               "lung_crop": (cfg.lung_crop, "set lung_crop false"),
               "intensity": (cfg.intensity != "none", "set intensity none, or standardise before writing the store"),
               "lung_region": (cfg.lung_region != "all", "set lung_region all"),
               "extra_data": (cfg.extra_data is not None, "train on one store, or on folders held in memory")}
    for key, (bad, fix) in refused.items():
        if bad:
            raise DataError(f"{key}={getattr(cfg, key)!r} is not supported with the slice store {store.root} "
                            f"({store.size} px, {len(store)} slices). Fix: {fix}")
    return store


def check_split_classes(labels: dict, data: str = "the data", extra: str | None = None) -> None:
    """Refuses a training split without both classes; warns when a validation or test split holds fewer than
    ``MIN_EVAL_PER_CLASS`` images of a class.

    Misnamed class folders (both classes under one alias, or one folder missing) would otherwise train a model
    that always answers the same, and every later AUC would be NaN.

    Args:
        labels: Split name -> label tensor (``train`` is required, ``val`` and ``test`` optional).
        data: The data's name for the messages.
        extra: The pooled site (``extra_data``), named in the messages where set.

    Raises:
        DataError: The training split lacks a class.
    """
    source = data if extra is None else f"{data} + {extra}"
    counts = {name: torch.bincount(torch.as_tensor(y).long().reshape(-1), minlength=2)[:2].tolist()
              for name, y in labels.items() if y is not None}
    train = counts["train"]
    if min(train) == 0:
        held = ", ".join(f"{n} {CLASS_NAMES[c]}" for c, n in enumerate(train) if n)
        raise DataError(f"the training split of {source} holds only {held or 'no'} images: a classifier needs both "
                        f"classes ({CLASS_NAMES[0]} and {CLASS_NAMES[1]}). Fix: check the class folder names "
                        "(COVID/, non-COVID/ or the aliases in the README) or the CSV's label column")
    for name in ("val", "test"):
        if name in counts and min(counts[name]) < MIN_EVAL_PER_CLASS:
            shown = ", ".join(f"{n} {CLASS_NAMES[c]}" for c, n in enumerate(counts[name]))
            warnings.warn(f"the {name} split of {source} holds {shown}: fewer than {MIN_EVAL_PER_CLASS} images of a "
                          "class make its accuracy, sensitivity and specificity noisy (or undefined). Use more "
                          "data or a larger --val_fraction / --test_fraction", stacklevel=3)


def attack_steps_at(cfg: TrainConfig, epoch: int) -> int:
    """Attack steps in an epoch: ramped linearly from 1 over ``attack_warmup_epochs`` (CAP's schedule adds one
    step every second epoch), then ``attack_steps``."""
    if cfg.attack_warmup_epochs <= 0:
        return cfg.attack_steps
    ramp = 1 + (cfg.attack_steps - 1) * epoch // cfg.attack_warmup_epochs
    return max(1, min(cfg.attack_steps, ramp))


def _lr_lambda(cfg: TrainConfig, steps_per_epoch: int):
    """Linear warm-up, then a cosine from the base rate to 0 over ``cosine_period`` epochs (default: the rest of
    the run), or (``schedule: step``) the base rate until ``lr_step_epoch`` and a tenth of it after. A run longer
    than the period follows the cosine on, back up to the base rate: CAP's ``CosineAnnealingLR(T_max=100)``
    stepped for 200 epochs (no restart, no jump)."""
    total, warmup = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch
    period = cfg.cosine_period * steps_per_epoch if cfg.cosine_period else total - warmup

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        if cfg.schedule == "step":  # Rice et al.'s piecewise decay, after which robust overfitting shows
            return 1.0 if step < cfg.lr_step_epoch * steps_per_epoch else 0.1
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, period)))

    return factor


class Trainer:
    """Trains one config. ``Trainer(cfg).fit()`` runs it; ``resume=True`` continues from ``last.pt``.

    Args:
        cfg: A resolved ``TrainConfig``.
        data: Prebuilt splits (default: built from the config).
        resume: Continue from the run directory's ``last.pt``. Without it an existing run directory with a
            checkpoint is an error: nothing is overwritten silently.
    """

    def __init__(self, cfg: TrainConfig, data: DataSplits | None = None, resume: bool = False):
        if not cfg._resolved:
            cfg.resolve()
        self.cfg = cfg
        seed_everything(cfg.seed, cfg.deterministic)
        self.device = distributed.local_device(get_device(cfg.device))
        self.cuda = self.device.type == "cuda"
        # Under torchrun the run is shared by the launched processes (see ``distributed``); otherwise one process.
        self.distributed = distributed.init_from_env(self.device)
        self.rank, self.ranks = distributed.rank(), distributed.world_size()
        if self.distributed:
            distributed.per_rank_batch(cfg.batch_size, self.ranks)
            if cfg.sync_batchnorm:
                distributed.check_sync_batchnorm(self.device)
        self.run_dir = cfg.run_dir()
        # Everything that can fail is checked before the run directory is made, so that a failed start (a bad
        # model name, unusable data, a checkpoint that does not fit) leaves no half-made run behind.
        last = self._check_run_dir(resume)
        self.data = data or build_data(cfg)
        if data is not None:
            check_split_classes({"train": data.train.labels, "val": data.val[1], "test": data.test[1]}, cfg.data)
        self.model = create_model(cfg.model, num_classes=2, img_size=cfg.img_size, pretrained=cfg.pretrained)
        if cfg.init_from:
            _load_weights(self.model, load_checkpoint(cfg.init_from, required=("model",)), cfg.init_from)
        if self.distributed and cfg.sync_batchnorm:
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.model.to(self.device)
        if self.cuda and cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.optimizer = self._make_optimizer()
        self.steps_per_epoch = self.data.train.batch_count(cfg.batch_size, self.ranks)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(cfg, self.steps_per_epoch))
        make_noise = WEIGHT_NOISE[cfg.weight_noise]  # None for "none"
        self.weight_noise = make_noise(self.model, cfg) if make_noise is not None else None
        if self.distributed and self.weight_noise is not None:
            if not hasattr(self.weight_noise, "gradient_sync"):
                raise ValueError(f"weight noise {cfg.weight_noise!r} has no gradient_sync attribute, so its noise "
                                 "could differ between ranks. Fix: give it one (as perturbation.WeightPerturbation "
                                 "has) or train in one process")
            self.weight_noise.gradient_sync = distributed.average_gradients  # the proxy steps on the global batch
        self.val_attack = validation_attack(cfg)
        self._val_robust_idx = None
        self.start_epoch, self.history = 0, []
        self.best = {"clean": -1.0, "robust": -1.0}
        if resume:
            self._load_last(last)
        elif distributed.is_main():
            self._write_run_dir()
        # One DDP forward per step runs the whole loss; the attacks and the proxy call the plain model.
        self.ddp_loss = distributed.wrap_loss(self.model, LOSSES[cfg.loss], cfg) if self.distributed else None
        distributed.barrier()

    # ------------------------------------------------------------------------------------------------ setup
    def _check_run_dir(self, resume: bool) -> dict | None:
        """Refuses to overwrite a run, or to resume one that is missing or has other settings (before any data
        is built); returns the last checkpoint when resuming."""
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise FileExistsError(f"--out_dir {self.run_dir} is a file. Fix: choose another --out_dir")
        existing = [c for c in CHECKPOINTS if (self.run_dir / c).exists()]
        if resume and "last.pt" not in existing:
            raise FileNotFoundError(f"cannot resume: {self.run_dir / 'last.pt'} does not exist. Fix: drop --resume "
                                    "to start the run, or pass the --out_dir of the run to continue")
        if existing and not resume:
            raise FileExistsError(f"{self.run_dir} already holds {existing}: pass --resume to continue that run, "
                                  "or choose another --out_dir")
        if not resume:
            return None
        state = load_checkpoint(self.run_dir / "last.pt", required=RESTORED_KEYS)
        changed = config_differences(state["config"], self.cfg)
        if changed:
            raise ValueError(f"{self.run_dir} holds a run with other settings ({', '.join(changed)}): resuming would "
                             "mix two configs; choose another --out_dir")
        if not state.get("restored"):
            load_checkpoint(self.run_dir / "last.pt", required=RESUME_KEYS)  # says which keys are missing
        elif state["epoch"] < self.cfg.epochs:
            raise CheckpointError(f"{self.run_dir / 'last.pt'} is a restored run without optimizer state, stopped "
                                  f"at epoch {state['epoch']} of {self.cfg.epochs}: it cannot be continued. Fix: "
                                  "train the run from scratch in another --out_dir")
        return state

    def _write_run_dir(self) -> None:
        """The new run's directory and record; a resumed run keeps its own (fit() notes each resumption)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        (self.run_dir / "env.json").write_text(json.dumps(_run_record(self.cfg), indent=2))

    def _make_optimizer(self) -> torch.optim.Optimizer:
        params = self.model.parameters()
        if self.cfg.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.cfg.lr, momentum=0.9, weight_decay=self.cfg.weight_decay)
        return torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def sample_attack(self, epoch: int):
        """The training attack of an epoch (None for methods without sample perturbation): the registered
        ``cfg.attack`` with the epoch's number of steps (and ``cfg.feedback`` as its early-stopping rule)."""
        return ATTACKS[self.cfg.attack](self.cfg, attack_steps_at(self.cfg, epoch))

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(self.device, non_blocking=True)
        return t.contiguous(memory_format=torch.channels_last) if self.cuda and self.cfg.channels_last else t

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cuda and self.cfg.amp)

    # ------------------------------------------------------------------------------------------------- step
    def train_step(self, x: torch.Tensor, x_aug: torch.Tensor, y: torch.Tensor, epoch: int, attack=None,
                   batch_index: int = 0, global_batch: int | None = None) -> dict:
        """One optimizer step on a batch; returns the loss and attack statistics.

        Args:
            batch_index: Seeds the batch's acquisition augmentation and prior samples.
            global_batch: In a distributed run, the images of this step over all ranks (default: this rank's
                times the ranks): a rank's loss is weighted by its share, so that the averaged gradient is the
                global batch's also when an epoch's last batch does not split evenly.
        """
        cfg, model = self.cfg, self.model
        stats = {}
        share = self.ranks * len(y) / global_batch if self.distributed and global_batch else 1.0
        if cfg.acq_aug > 0:  # a mild scanner change for some slices, and their prior view made afresh
            seed = (cfg.seed * 1_000_003 + epoch) * 100_003 + batch_index
            x, changed = acquisition_augment(x, cfg.acq_aug, cfg.acq_aug_severity, seed)
            if cfg.prior and changed.any():
                x_aug = x_aug.clone()
                x_aug[changed] = lung_prior(x[changed], with_mask=False, **self.data.train.prior_kwargs)[0]
            elif not cfg.prior:
                x_aug = x
            stats["augmented"] = changed.float().mean().item()
        if cfg.prior_samples > 0:
            x, x_aug, y, stats["prior_samples"] = self._with_prior_samples(x, x_aug, y, epoch, batch_index)
        x, x_aug, y = self._to_device(x), self._to_device(x_aug), y.to(self.device)
        with self._autocast():
            x_adv = attack(model, x, y) if attack is not None else None
            if getattr(attack, "last_steps", None) is not None:  # an early-stopped (feedback) attack
                stats["attack_steps"] = attack.last_steps.float().mean().item()
            batch = Batch(x, x_adv, x_aug, y)
            noise = self.weight_noise if epoch >= cfg.weight_noise_warmup else None
            if noise is not None:
                stats.update(self._perturb_weights(noise, batch))
            model.train()
            loss = LOSSES[cfg.loss](model, batch, cfg) if self.ddp_loss is None else self.ddp_loss(batch)
        self.optimizer.zero_grad(set_to_none=True)
        (loss if share == 1.0 else loss * share).backward()
        self.optimizer.step()
        if noise is not None:
            noise.restore()
        self.scheduler.step()
        stats["loss"] = loss.item()
        return stats

    def _with_prior_samples(self, x, x_aug, y, epoch: int, batch_index: int):
        """The batch with the prior views of ``prior_samples`` of it appended as extra samples (reading 2 of the
        abstract: "generate augmented data"). Which images is seeded by (seed, epoch, batch), so a resumed run
        draws the same. An extra sample's own prior view is taken to be itself (the filter of an already
        filtered interior changes it little), so its soft target uses the same view."""
        n = len(y)
        k = n if self.cfg.prior_samples >= 1 else int(round(self.cfg.prior_samples * n))
        if k == 0:
            return x, x_aug, y, 0.0
        if k < n:
            gen = torch.Generator().manual_seed((self.cfg.seed * 1_000_003 + epoch) * 100_003 + batch_index + 7)
            pick = torch.randperm(n, generator=gen)[:k].sort().values
        else:
            pick = torch.arange(n)
        extra = x_aug[pick]
        return torch.cat([x, extra]), torch.cat([x_aug, extra]), torch.cat([y, y[pick]]), k / n

    def _perturb_weights(self, noise, batch: Batch) -> dict:
        """w += gamma * d from the noise's proxy step. With ``weight_feedback`` (reading 1 of the abstract: the
        early-stopping feedback on the weight level too), gamma is halved, up to ``weight_feedback_halvings``
        times, while the perturbed model (eval mode, no gradient, BatchNorm statistics untouched) misclassifies
        more than ``weight_feedback_share`` of the clean batch: the weight noise, like the sample noise, stays
        where the model still predicts correctly. Returns the statistics of the step."""
        cfg = self.cfg
        direction = noise.compute_batch(batch)
        gamma = cfg.gamma
        noise.perturb(direction, gamma)
        if not cfg.weight_feedback:
            return {}
        halvings = 0
        while halvings < cfg.weight_feedback_halvings and self._error_share(batch) > cfg.weight_feedback_share:
            noise.restore()  # no optimizer step in between: bitwise the unperturbed weights
            gamma, halvings = gamma / 2, halvings + 1
            noise.perturb(direction, gamma)
        return {"gamma_scale": gamma / cfg.gamma if cfg.gamma else 1.0}

    @torch.no_grad()
    def _error_share(self, batch: Batch) -> float:
        """The share of the clean batch the model gets wrong (of the global batch in a distributed run, so that
        every rank halves gamma alike)."""
        with eval_mode(self.model):
            wrong = self.model(batch.x).argmax(1) != batch.y
        if not self.distributed:
            return wrong.float().mean().item()
        errors, n = distributed.sum_over_ranks([wrong.sum().item(), len(wrong)])
        return errors / n

    # ------------------------------------------------------------------------------------------- validation
    def validate(self) -> dict:
        """Clean accuracy on the validation split and PGD accuracy on ``eval_n`` of its images, a stratified
        sample drawn once with seed 0 (the first images of a folder layout are all of one class).

        In a distributed run the ranks share the blocks of ``VAL_BLOCK`` images round robin and add up their
        counts. A block's predictions and attack (seeded per chunk of ``VAL_ATTACK_CHUNK``) are the same on any
        rank, so the result is exactly that of one process evaluating the same model."""
        x, y = self.data.val
        if self._val_robust_idx is None:
            self._val_robust_idx = torch.from_numpy(stratified_subset(y.numpy(), self.cfg.eval_n, seed=0))
        xr, yr = x[self._val_robust_idx], y[self._val_robust_idx]
        clean = robust = 0
        with self._autocast():
            for i in self._my_blocks(len(y)):
                clean += self._correct(x[i:i + VAL_BLOCK], y[i:i + VAL_BLOCK])
            for i in self._my_blocks(len(yr)):
                xb, yb = xr[i:i + VAL_BLOCK], yr[i:i + VAL_BLOCK]
                adv = torch.cat([self.val_attack(self.model, self._to_device(xb[j:j + VAL_ATTACK_CHUNK]),
                                                 yb[j:j + VAL_ATTACK_CHUNK].to(self.device))
                                 for j in range(0, len(yb), VAL_ATTACK_CHUNK)])
                robust += self._correct(adv, yb)
        clean, robust = distributed.sum_over_ranks([clean, robust])
        return {"val_clean": _share(clean, len(y)), "val_robust": _share(robust, len(yr)), "val_robust_n": len(yr)}

    def _my_blocks(self, n: int) -> range:
        """Start indices of this rank's validation blocks."""
        return range(self.rank * VAL_BLOCK, n, self.ranks * VAL_BLOCK)

    def _correct(self, images: torch.Tensor, labels: torch.Tensor) -> int:
        return int((predict_logits(self.model, images, VAL_BLOCK).argmax(1) == labels.cpu()).sum())

    # -------------------------------------------------------------------------------------------- the loop
    def fit(self, stop_after: int | None = None) -> list[dict]:
        """Trains the remaining epochs (or up to epoch ``stop_after``, as an interrupted run would stop);
        returns the per-epoch log."""
        cfg = self.cfg
        main = distributed.is_main()
        last = min(cfg.epochs, stop_after or cfg.epochs)
        if 0 < self.start_epoch < last and main:
            with open(self.run_dir / "resumed.jsonl", "a") as f:
                f.write(json.dumps({"from_epoch": self.start_epoch, **_run_record(cfg)}) + "\n")
        if self.start_epoch > 0 and main:
            _repair_log(self.run_dir, self.history)
        for epoch in range(self.start_epoch, last):
            start = time.perf_counter()
            if self.distributed:  # each rank its own attack random starts, independent of where a run resumed
                torch.manual_seed(distributed.epoch_seed(cfg.seed, epoch, self.rank))
            attack = self.sample_attack(epoch)
            totals, count = {}, 0
            batches = self.data.train.batches(cfg.batch_size, epoch=epoch, rank=self.rank, ranks=self.ranks)
            bar = tqdm(batches, total=self.steps_per_epoch, desc=f"{cfg.method} {epoch + 1}/{cfg.epochs}",
                       leave=False, **progress_options(cfg.progress and main))
            for batch_index, (x, x_aug, y, *_) in enumerate(bar):
                # Each rank's batch seeds its acquisition augmentation and prior samples apart (in one process
                # the index is the batch's).
                global_batch = min(cfg.batch_size, len(self.data.train) - batch_index * cfg.batch_size)
                stats = self.train_step(x, x_aug, y, epoch, attack, batch_index * self.ranks + self.rank,
                                        global_batch)
                for k, v in stats.items():
                    totals[k] = totals.get(k, 0.0) + v * len(y)
                count += len(y)
                bar.set_postfix(loss=f"{stats['loss']:.4f}")
            train_time = time.perf_counter() - start
            if self.distributed:  # the epoch's means over all ranks' images; rank 0's buffers for validation
                *sums, count = distributed.sum_over_ranks([*totals.values(), count])
                totals, count = dict(zip(totals, sums)), int(count)
                distributed.broadcast_buffers(self.model)
            row = {"epoch": epoch + 1, **{f"train_{k}": v / count for k, v in totals.items()},
                   "lr": self.optimizer.param_groups[0]["lr"],
                   "sample_attack_steps": attack.steps if attack is not None else 0,
                   "weight_noise_on": bool(self.weight_noise is not None and epoch >= cfg.weight_noise_warmup)}
            row.update(self.validate())
            row.update(train_seconds=train_time, epoch_seconds=time.perf_counter() - start,
                       train_images_per_s=count / train_time)
            self.history.append(row)
            self._save_epoch(row)
            if cfg.progress and main:
                tqdm.write(f"{cfg.method} epoch {epoch + 1}/{cfg.epochs}: loss {row['train_loss']:.4f}, val clean "
                           f"{row['val_clean']:.3f}, val PGD-{cfg.eval_attack_steps} {row['val_robust']:.3f}, "
                           f"{row['epoch_seconds']:.0f} s")
        return self.history

    # ---------------------------------------------------------------------------------------- checkpoints
    def _state(self, epoch: int) -> dict:
        return {"model": self.model.state_dict(), "config": self.cfg.to_dict(), "epoch": epoch,
                "history": self.history, "best": dict(self.best)}

    def _save_epoch(self, row: dict) -> None:
        """Updates the best scores and writes the epoch's checkpoints and log row. In a distributed run only rank
        0 writes, and every rank waits until the files are complete."""
        if distributed.is_main():
            self._write_epoch(row)
        else:
            self.best = {key: max(self.best[key], row[f"val_{key}"]) for key in self.best}
        distributed.barrier()

    def _write_epoch(self, row: dict) -> None:
        epoch = row["epoch"]
        for key, metric in (("clean", "val_clean"), ("robust", "val_robust")):
            if row[metric] > self.best[key]:
                self.best[key] = row[metric]
                _atomic_save(self._state(epoch), self.run_dir / f"best_{key}.pt")
        state = self._state(epoch)
        state.update(optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                     rng_cpu=torch.get_rng_state(),
                     rng_cuda=torch.cuda.get_rng_state_all() if self.cuda else [])
        if self.weight_noise is not None and hasattr(self.weight_noise, "state_dict"):
            state["weight_noise"] = self.weight_noise.state_dict()  # CAP's AdamW proxy keeps moments
        _atomic_save(state, self.run_dir / "last.pt")
        _append_log(self.run_dir, row)

    def _load_last(self, state: dict) -> None:
        _load_weights(self.model, state, self.run_dir / "last.pt")
        self.start_epoch, self.history, self.best = state["epoch"], state["history"], state["best"]
        if state.get("restored"):  # finished: nothing to continue, so no optimizer state to load
            return
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.weight_noise is not None and "weight_noise" in state:
            self.weight_noise.load_state_dict(state["weight_noise"])
        torch.set_rng_state(state["rng_cpu"])
        if self.cuda and state["rng_cuda"]:
            torch.cuda.set_rng_state_all(state["rng_cuda"])


def config_differences(saved: dict, cfg: TrainConfig) -> list[str]:
    """The settings in which a saved run's config differs from ``cfg``, ignoring how and where a run is looked at
    (progress bars, device, output folder).

    A setting that ``cfg`` has and the saved config lacks (a run saved before the field existed) is a difference
    unless ``config.ADDED_FIELDS`` says that its current value trains as the older code did, or has no effect.
    """
    mine = cfg.to_dict()
    ignored = ("progress", "device", "out_dir")

    def same(key, a, b):  # paths compare as the files they name, however they were written
        if key in PATH_KEYS and isinstance(a, str) and isinstance(b, str) and a != "phantom":
            return resolve_spec(a) == resolve_spec(b)
        return a == b

    def as_before(key):
        if key not in ADDED_FIELDS:
            return False
        former, no_effect = ADDED_FIELDS[key]
        return mine[key] == former or no_effect(cfg)

    changed = {k for k, v in saved.items() if k not in ignored and not same(k, mine.get(k), v)}
    changed |= {k for k in mine if k not in saved and k not in ignored and not as_before(k)}
    return sorted(changed)


PATH_KEYS = ("data", "ood_data", "extra_data", "init_from")



def _run_record(cfg: TrainConfig) -> dict:
    # The world size is recorded here, not in the config: a run may resume on another number of ranks.
    return {"seed": cfg.seed, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "world_size": distributed.world_size(),
            "environment": environment_info()}


def _share(count: float, n: int) -> float:
    """count / n rounded to float32, as ``evaluate.accuracy``'s mean of 0/1 values is."""
    return (torch.tensor(float(count)) / n).item()


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def _repair_log(run_dir: Path, history: list[dict]) -> None:
    """Rewrites the per-epoch log from a resumed checkpoint's history when they disagree (a run killed between
    writing ``last.pt`` and appending to the log): the checkpoint is the truth."""
    log = run_dir / "log.jsonl"
    logged = [line for line in log.read_text().splitlines() if line.strip()] if log.exists() else []
    if len(logged) == len(history):
        return
    for name in ("log.jsonl", "log.csv"):
        (run_dir / name).unlink(missing_ok=True)
    for row in history:
        _append_log(run_dir, row)


def completed_epochs(run_dir: str | Path) -> int:
    """The epochs a run has finished, read from its ``last.pt`` (0 without one)."""
    path = Path(run_dir) / "last.pt"
    return int(load_checkpoint(path, required=("epoch",))["epoch"]) if path.exists() else 0


def _append_log(run_dir: Path, row: dict) -> None:
    with open(run_dir / "log.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    path = run_dir / "log.csv"
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def load_checkpoint(path: str | Path, map_location="cpu", required: tuple[str, ...] = MODEL_KEYS) -> dict:
    """Loads a checkpoint with ``weights_only=True`` (no arbitrary code from pickles).

    Args:
        path: A file written by the trainer.
        map_location: Where tensors go.
        required: Keys the caller reads (``MODEL_KEYS``; ``RESUME_KEYS`` to resume; ``("model",)`` for weights).

    Raises:
        FileNotFoundError: No such file.
        CheckpointError: A folder, an empty file, a file torch cannot read (text, random bytes, a truncated
            download, a pickle with code in it), or one without the required keys: "X is not a robustmed_lite
            checkpoint (<why>): <cause>".
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist. Fix: pass a .pt file a training run wrote "
                                "(runs/<name>/best_clean.pt, best_robust.pt or last.pt)")

    def refuse(why: str, cause: str, fix: str = "pass a .pt file a training run wrote") -> CheckpointError:
        return CheckpointError(f"{path} is not a robustmed_lite checkpoint ({why}): {cause}. Fix: {fix}")

    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.pt"))
        raise refuse("a folder", f"it holds {found or 'no .pt files'}",
                     f"pass a file inside it, e.g. {path / (found[0] if found else 'best_robust.pt')}")
    if path.stat().st_size == 0:
        raise refuse("empty", "the file has 0 bytes (an interrupted copy or save?)", "copy or train it again")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001
        # torch.load reports a foreign file with whatever its parsers trip over (EOFError, IndexError,
        # UnpicklingError, zipfile errors, RuntimeError), so every failure here means "not a torch file".
        raise refuse("not a torch file", f"{type(err).__name__}: {_first_line(err)}") from err
    if not isinstance(state, dict):
        raise refuse("not a dict of model and config", f"it holds a {type(state).__name__}")
    missing = [k for k in required if k not in state]
    if missing:
        raise refuse(f"missing keys {', '.join(missing)}", f"it has keys {sorted(map(str, state))[:10]}",
                     "pass a checkpoint the trainer wrote (last.pt to resume: best_*.pt hold no optimizer state)")
    return state


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "(no message)"


def _load_weights(model: nn.Module, state: dict, path) -> None:
    """``model.load_state_dict`` with an error that names the checkpoint and the model."""
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, TypeError, AttributeError) as err:
        config = state.get("config") if isinstance(state.get("config"), dict) else {}
        trained = f" (it was trained as {config.get('model')!r} at {config.get('img_size')} px)" if config else ""
        raise CheckpointError(f"the weights in {path} do not fit this model{trained}: {_first_line(err)}. Fix: "
                              "use the same --model and --img_size as the checkpoint") from err


def model_from_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, TrainConfig]:
    """The model of a checkpoint, in eval mode, and the config it was trained with.

    Raises:
        FileNotFoundError, CheckpointError: See ``load_checkpoint``; also a config with unknown keys or weights
            that do not fit the model it names.
    """
    state = load_checkpoint(path)
    if not isinstance(state["config"], dict):
        raise CheckpointError(f"{path} is not a robustmed_lite checkpoint (its config is a "
                              f"{type(state['config']).__name__}, not a dict). Fix: pass a .pt file a training run "
                              "wrote")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in state["config"].items() if k != "eps_text"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise CheckpointError(f"{path} has config keys this version does not know ({', '.join(unknown)}): it was "
                              "written by another version of robustmed_lite. Fix: load it with that version")
    cfg = TrainConfig(**values)
    model = create_model(cfg.model, num_classes=2, img_size=cfg.img_size)
    _load_weights(model, state, path)
    return model.to(device).eval(), cfg


def fit_erm(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, epochs: int = 10, batch_size: int = 64,
            lr: float = 2e-3, weight_decay: float = 1e-4, seed: int = 0, progress: bool = True) -> list[float]:
    """A minimal cross-entropy loop on tensors (AdamW, one-cycle schedule, random horizontal flips), for quick
    experiments and tests that need a trained model but no run directory.

    Returns:
        The mean loss of each epoch.
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * -(-len(labels) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.15)
    device = model_device(model)
    history = []
    for _ in tqdm(range(epochs), desc="erm", **progress_options(progress)):
        model.train()
        order, total = torch.randperm(len(labels), generator=gen), 0.0
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            x, y = images[idx], labels[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            loss = F.cross_entropy(model(x.to(device)), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            total += loss.item() * len(idx)
        history.append(total / len(order))
    return history
