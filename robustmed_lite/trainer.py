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

import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .checkpoints import (
    acquire_lock,
    check_run_dir,
    check_writable,
    checkpoint_bytes,
    load_checkpoint,
    load_weights,
    note_resumed,
    release_lock,
    repair_log,
    save_epoch,
    write_run_record,
)
from .common import eval_mode, model_device
from .components import ATTACKS, LOSSES, WEIGHT_NOISE, Batch
from .config import TrainConfig
from .data.augment import acquisition_augment
from .data.loaders import stratified_subset
from .data.splits import DataSplits, build_data, check_split_classes
from .evaluation.attacks import PGD
from .evaluation.metrics import predict_logits
from .method.prior import lung_prior
from .models import check_input_size, create_model
from .runinfo import get_device, progress_options, seed_everything

# Validation predicts in blocks of VAL_BLOCK images and attacks in chunks of VAL_ATTACK_CHUNK; a distributed run
# shares the blocks out whole, so that every rank computes exactly what one process computes for them.
VAL_BLOCK, VAL_ATTACK_CHUNK = 256, 128


def validation_attack(cfg: TrainConfig) -> PGD:
    """The PGD a run validates with (and ``compare_methods`` tests with): eval_attack_steps at the training eps,
    step eps/4, seeded with the run."""
    return PGD(cfg.eps, alpha=cfg.eps / 4, steps=cfg.eval_attack_steps, loss="ce", seed=cfg.seed)


def attack_steps_at(cfg: TrainConfig, epoch: int) -> int:
    """Attack steps in an epoch (``epoch`` counted from 0, as the loop counts): ramped linearly from 1 in the first
    epoch to ``attack_steps`` in epoch ``attack_warmup_epochs``, both counted from 1 as CAP counts them. With 10
    steps over 18 epochs this is CAP's ``min(10, 1 + e // 2)`` for its 1-based epoch e (src/utils/schedules.py)."""
    if cfg.attack_warmup_epochs <= 0:
        return cfg.attack_steps
    ramp = 1 + (cfg.attack_steps - 1) * (epoch + 1) // cfg.attack_warmup_epochs
    return max(1, min(cfg.attack_steps, ramp))


def weight_noise_on(cfg: TrainConfig, epoch: int) -> bool:
    """Whether the weight noise is on in an epoch (counted from 0): from epoch ``weight_noise_warmup`` counted
    from 1, as CAP's and AWP's ``epoch >= warmup`` with their 1-based epochs (20: 19 epochs without noise)."""
    return cfg.weight_noise != "none" and epoch + 1 >= cfg.weight_noise_warmup


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


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``fit``: the message says which epoch ``last.pt`` holds and how to resume."""


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
        last = check_run_dir(self.run_dir, cfg, resume)
        check_input_size(cfg.model, cfg.img_size)
        self.data = data or build_data(cfg)
        if data is not None:
            check_split_classes({"train": data.train.labels, "val": data.val[1], "test": data.test[1]}, cfg.data)
        self.model = create_model(cfg.model, num_classes=2, img_size=cfg.img_size, pretrained=cfg.pretrained)
        if cfg.init_from:
            load_weights(self.model, load_checkpoint(cfg.init_from, required=("model",)), cfg.init_from)
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
                raise ValueError(
                    f"weight noise {cfg.weight_noise!r} has no gradient_sync attribute, so its noise "
                    "could differ between ranks. Fix: give it one (as perturbation.WeightPerturbation "
                    "has) or train in one process"
                )
            self.weight_noise.gradient_sync = distributed.average_gradients  # the proxy steps on the global batch
        self.val_attack = validation_attack(cfg)
        self._val_robust_idx = None
        self.start_epoch, self.history = 0, []
        self.best = {"clean": -1.0, "robust": -1.0}
        if distributed.is_main():  # writable, with room for the checkpoints, and no other live writer
            check_writable(self.run_dir, checkpoint_bytes(self.model))
            acquire_lock(self.run_dir)
        if resume:
            self._load_last(last)
        elif distributed.is_main():
            write_run_record(self.run_dir, cfg, self.data.record())
        # One DDP forward per step runs the whole loss; the attacks and the proxy call the plain model.
        self.ddp_loss = distributed.wrap_loss(self.model, LOSSES[cfg.loss], cfg) if self.distributed else None
        distributed.barrier()

    # ------------------------------------------------------------------------------------------------ setup
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
    def train_step(
        self,
        x: torch.Tensor,
        x_aug: torch.Tensor,
        y: torch.Tensor,
        epoch: int,
        attack=None,
        batch_index: int = 0,
        global_batch: int | None = None,
    ) -> dict:
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
            noise = self.weight_noise if weight_noise_on(cfg, epoch) else None
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
                clean += self._correct(x[i : i + VAL_BLOCK], y[i : i + VAL_BLOCK])
            for i in self._my_blocks(len(yr)):
                xb, yb = xr[i : i + VAL_BLOCK], yr[i : i + VAL_BLOCK]
                adv = torch.cat(
                    [
                        self.val_attack(
                            self.model,
                            self._to_device(xb[j : j + VAL_ATTACK_CHUNK]),
                            yb[j : j + VAL_ATTACK_CHUNK].to(self.device),
                        )
                        for j in range(0, len(yb), VAL_ATTACK_CHUNK)
                    ]
                )
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
        if main:
            acquire_lock(self.run_dir)  # again where an earlier fit() of this trainer released it
        if 0 < self.start_epoch < last and main:
            note_resumed(self.run_dir, cfg, self.start_epoch, self.history)
        elif self.start_epoch > 0 and main:
            repair_log(self.run_dir, self.history)
        try:
            self._fit_epochs(last)
        except KeyboardInterrupt:
            saved = self.history[-1]["epoch"] if self.history else 0
            raise TrainingInterrupted(
                f"stopped by Ctrl-C in epoch {saved + 1} of {cfg.epochs}; {self.run_dir / 'last.pt'} holds "
                + (f"epoch {saved}" if saved else "no epoch yet")
                + f". Continue with: python -m robustmed_lite train --out_dir {self.run_dir} --resume "
                "(and the same settings)"
            ) from None
        finally:
            if main:
                release_lock(self.run_dir)
        return self.history

    def _fit_epochs(self, last: int) -> None:
        """Epochs ``start_epoch`` to ``last``, each saved when it ends."""
        cfg = self.cfg
        main = distributed.is_main()
        for epoch in range(self.start_epoch, last):
            start = time.perf_counter()
            if self.distributed:  # each rank its own attack random starts, independent of where a run resumed
                torch.manual_seed(distributed.epoch_seed(cfg.seed, epoch, self.rank))
            attack = self.sample_attack(epoch)
            totals, count = {}, 0
            batches = self.data.train.batches(cfg.batch_size, epoch=epoch, rank=self.rank, ranks=self.ranks)
            bar = tqdm(
                batches,
                total=self.steps_per_epoch,
                desc=f"{cfg.method} {epoch + 1}/{cfg.epochs}",
                leave=False,
                **progress_options(cfg.progress and main),
            )
            for batch_index, (x, x_aug, y, *_) in enumerate(bar):
                # Each rank's batch seeds its acquisition augmentation and prior samples apart (in one process
                # the index is the batch's).
                global_batch = min(cfg.batch_size, len(self.data.train) - batch_index * cfg.batch_size)
                stats = self.train_step(x, x_aug, y, epoch, attack, batch_index * self.ranks + self.rank, global_batch)
                for k, v in stats.items():
                    totals[k] = totals.get(k, 0.0) + v * len(y)
                count += len(y)
                # No redraw here: the bar's own rate-limited redraws show the loss beside an up-to-date counter.
                bar.set_postfix(loss=f"{stats['loss']:.4f}", refresh=False)
            train_time = time.perf_counter() - start
            if self.distributed:  # the epoch's means over all ranks' images; rank 0's buffers for validation
                *sums, count = distributed.sum_over_ranks([*totals.values(), count])
                totals, count = dict(zip(totals, sums)), int(count)
                distributed.broadcast_buffers(self.model)
            row = {
                "epoch": epoch + 1,
                **{f"train_{k}": v / count for k, v in totals.items()},
                "lr": self.optimizer.param_groups[0]["lr"],
                "sample_attack_steps": attack.steps if attack is not None else 0,
                "weight_noise_on": self.weight_noise is not None and weight_noise_on(cfg, epoch),
            }
            row.update(self.validate())
            row.update(
                train_seconds=train_time,
                epoch_seconds=time.perf_counter() - start,
                train_images_per_s=count / train_time,
            )
            self.history.append(row)
            self._save_epoch(row)
            if cfg.progress and main:
                tqdm.write(
                    f"{cfg.method} epoch {epoch + 1}/{cfg.epochs}: loss {row['train_loss']:.4f}, val clean "
                    f"{row['val_clean']:.3f}, val PGD-{cfg.eval_attack_steps} {row['val_robust']:.3f}, "
                    f"{row['epoch_seconds']:.0f} s"
                )

    # ---------------------------------------------------------------------------------------- checkpoints
    def _state(self, epoch: int) -> dict:
        return {
            "model": self.model.state_dict(),
            "config": self.cfg.to_dict(),
            "epoch": epoch,
            "history": self.history,
            "best": dict(self.best),
        }

    def _save_epoch(self, row: dict) -> None:
        """Updates the best scores and writes the epoch's checkpoints and log row. In a distributed run only rank
        0 writes, and every rank waits until the files are complete."""
        if distributed.is_main():
            self._write_epoch(row)
        else:
            self.best = {key: max(self.best[key], row[f"val_{key}"]) for key in self.best}
        distributed.barrier()

    def _write_epoch(self, row: dict) -> None:
        improved = [key for key in self.best if row[f"val_{key}"] > self.best[key]]
        self.best.update({key: row[f"val_{key}"] for key in improved})
        training_state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if self.cuda else [],
        }
        if self.weight_noise is not None and hasattr(self.weight_noise, "state_dict"):
            training_state["weight_noise"] = self.weight_noise.state_dict()  # CAP's AdamW proxy keeps moments
        save_epoch(self.run_dir, row, self._state(row["epoch"]), improved, training_state)

    def _load_last(self, state: dict) -> None:
        load_weights(self.model, state, self.run_dir / "last.pt")
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


def _share(count: float, n: int) -> float:
    """count / n rounded to float32, as ``metrics.accuracy``'s mean of 0/1 values is."""
    return (torch.tensor(float(count)) / n).item()


def fit_erm(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
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
            idx = order[start : start + batch_size]
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
