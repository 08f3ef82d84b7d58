"""Training data with the prior view: (x, x_aug, y), plus masks where they exist, flipped together.

The prior view is computed once, up front, with the fast CPU backend. A view that commutes with flips (the
``"package"`` view: a symmetric window with mirrored borders) is then flipped together with ``x``, which gives
exactly the prior view of the flipped image, and no epoch pays for the filter again. CAP's view (``"cap"``, a
2x2 box) does not commute with flips: CAP flips first and filters afterwards, and so does the dataset, computing
the view of each flipped image of a batch afresh (a few milliseconds per batch on a CPU); unflipped images use
the precomputed view.

Images may also be a ``slicestore.StoredImages`` (slices read from disk on demand, for data larger than memory).
The prior view is then computed per batch instead of up front, from the same slices with the same flips, so a
batch is bit for bit the batch of the same slices held in memory.

Flips are drawn per epoch from ``(seed, epoch)`` for the whole dataset, so a sample's augmentation does not
depend on batch size, worker count or where a run was resumed.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Dataset

from ..method.prior import flip_equivariant, lung_prior


class PriorDataset(Dataset):
    """Images with their lung-prior view and labels; optional lung and lesion masks.

    Items (and batches) are tuples ``(x, x_aug, y)``, or ``(x, x_aug, y, lung_mask, lesion_mask)`` when the
    dataset holds masks (missing ones are all-False tensors).

    Args:
        images: (N,1,S,S) in [0,1]: a tensor, or a ``StoredImages`` read batch by batch.
        labels: (N,) class indices.
        lung_masks: Optional (N,1,S,S) bool.
        lesion_masks: Optional (N,1,S,S) bool.
        prior: Compute the prior view; False makes x_aug a copy of x (for methods that do not use it).
        hflip: Random horizontal flips.
        vflip: Random vertical flips (CAP's pipeline uses both).
        seed: Seed of the flips.
        prior_kwargs: Passed to ``lung_prior`` (threshold, radius, eps, s, view; default view ``"cap"``).
        sites: Optional (N,) site index per image: shuffled ``batches`` then draw every site equally often per
            epoch (a smaller site is repeated, a larger one subsampled), so that no hospital dominates training.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        lung_masks: torch.Tensor | None = None,
        lesion_masks: torch.Tensor | None = None,
        *,
        prior: bool = True,
        hflip: bool = True,
        vflip: bool = False,
        seed: int = 0,
        prior_kwargs: dict | None = None,
        sites: torch.Tensor | None = None,
    ):
        if images.dim() != 4 or images.shape[1] != 1:
            raise ValueError(f"images must be (N,1,S,S), got {tuple(images.shape)}")
        if len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        for name, m in (("lung_masks", lung_masks), ("lesion_masks", lesion_masks)):
            if m is not None and m.shape != images.shape:
                raise ValueError(f"{name} must match images {tuple(images.shape)}, got {tuple(m.shape)}")
        if sites is not None and len(sites) != len(images):
            raise ValueError(f"{len(images)} images but {len(sites)} site labels")
        self.images, self.labels, self.sites = images, labels.long(), sites
        self.prior_kwargs = dict(prior_kwargs or {})
        self.prior = prior
        # CAP's view must be computed after the flips; a flip-equivariant one is flipped with x.
        self.refilter_flips = prior and not flip_equivariant(self.prior_kwargs.get("view", "cap"))
        self.on_demand = not isinstance(images, torch.Tensor)
        if self.on_demand:
            if lung_masks is not None or lesion_masks is not None:
                raise ValueError("masks need images in memory: a slice store holds images and labels only")
            self.x_aug = None  # computed per batch in _take
        elif prior:
            self.x_aug = (
                torch.cat(
                    [
                        lung_prior(images[i : i + 512], with_mask=False, **self.prior_kwargs)[0]
                        for i in range(0, len(images), 512)
                    ]
                )
                if len(images)
                else images.clone()
            )
        else:
            self.x_aug = images
        self.has_masks = lung_masks is not None or lesion_masks is not None
        self.lung_masks, self.lesion_masks = lung_masks, lesion_masks
        if self.has_masks and (lung_masks is None or lesion_masks is None):
            blank = torch.zeros_like(images, dtype=torch.bool)
            self.lung_masks = lung_masks if lung_masks is not None else blank
            self.lesion_masks = lesion_masks if lesion_masks is not None else blank
        self.hflip, self.vflip, self.seed = hflip, vflip, seed
        self.epoch = 0
        self._flips_of = (None, None)  # (epoch, flips): items of one epoch share one draw

    def set_epoch(self, epoch: int) -> None:
        """Selects the flips of ``epoch`` (call once per epoch, as with a DistributedSampler)."""
        self.epoch = epoch

    def _flips(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._flips_of[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            draws = torch.rand(2, len(self), generator=gen) < 0.5
            self._flips_of = (epoch, (draws[0] & self.hflip, draws[1] & self.vflip))
        return self._flips_of[1]

    def _apply(self, tensors, h: torch.Tensor, v: torch.Tensor):
        out = []
        for t in tensors:
            t = torch.where(h.view(-1, 1, 1, 1), t.flip(-1), t)
            out.append(torch.where(v.view(-1, 1, 1, 1), t.flip(-2), t))
        return out

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        h, v = (f[index : index + 1] for f in self._flips(self.epoch))
        batch = self._take(torch.tensor([index]), h, v)
        return tuple(t[0] for t in batch)

    def _take(self, idx: torch.Tensor, h: torch.Tensor, v: torch.Tensor):
        if self.on_demand:
            return self._take_on_demand(idx, h, v)
        views = [self.images[idx], self.x_aug[idx]]
        masks = [self.lung_masks[idx], self.lesion_masks[idx]] if self.has_masks else []
        x, x_aug, *masks = self._apply(views + masks, h, v)
        flipped = h | v
        if self.refilter_flips and flipped.any():  # the prior view of the flipped image, as CAP computes it
            x_aug = x_aug.clone()
            x_aug[flipped] = lung_prior(x[flipped], with_mask=False, **self.prior_kwargs)[0]
        return (x, x_aug, self.labels[idx], *masks)

    def _take_on_demand(self, idx: torch.Tensor, h: torch.Tensor, v: torch.Tensor):
        x = self.images[idx]
        if not self.prior:
            (x,) = self._apply([x], h, v)
            return x, x, self.labels[idx]
        if self.refilter_flips:  # CAP's order: flip, then filter (every slice, as the in-memory path ends up doing)
            (x,) = self._apply([x], h, v)
            return x, lung_prior(x, with_mask=False, **self.prior_kwargs)[0], self.labels[idx]
        x, x_aug = self._apply([x, lung_prior(x, with_mask=False, **self.prior_kwargs)[0]], h, v)
        return x, x_aug, self.labels[idx]

    def _site_balanced_order(self, gen: torch.Generator) -> torch.Tensor:
        """len(self) indices, every site (about) the same share: each site's own items in random order, repeated
        as often as needed, cut to the share, then all shuffled together."""
        groups = [torch.nonzero(self.sites == s).flatten() for s in torch.unique(self.sites)]
        share = -(-len(self) // len(groups))
        parts = []
        for group in groups:
            repeats = -(-share // len(group))
            parts.append(torch.cat([group[torch.randperm(len(group), generator=gen)] for _ in range(repeats)])[:share])
        order = torch.cat(parts)
        return order[torch.randperm(len(order), generator=gen)][: len(self)]

    def batch_count(self, batch_size: int, ranks: int = 1) -> int:
        """The number of (global) batches ``batches`` yields per epoch without ``drop_last``."""
        full, tail = divmod(len(self), batch_size)
        return full + int(tail > 0 and tail >= ranks)

    def batches(
        self,
        batch_size: int,
        epoch: int | None = None,
        shuffle: bool = True,
        drop_last: bool = False,
        rank: int = 0,
        ranks: int = 1,
    ) -> Iterator[tuple[torch.Tensor, ...]]:
        """Whole batches, gathered and flipped as tensors (much faster than a per-item DataLoader).

        With ``ranks > 1`` each global batch is shared out as ``DistributedSampler`` shares an epoch: rank r
        takes positions r, r + ranks, ... of it. The global batches, their order and their flips are then the
        same for any number of ranks (and the same as in one process), and the rank batches of a step together
        are that step's global batch. A last batch smaller than ``ranks`` would leave a rank empty and is dropped.

        Args:
            batch_size: Batch size (the global one, when sharded).
            epoch: Epoch of the order and flips (default: the one set by ``set_epoch``).
            shuffle: Shuffle the order (seeded by ``(seed, epoch)``).
            drop_last: Drop a last, smaller batch.
            rank: This process's share (0 .. ranks - 1).
            ranks: Processes sharing each batch.
        """
        epoch = self.epoch if epoch is None else epoch
        h, v = self._flips(epoch)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + 7)
        if self.sites is not None and shuffle:
            order = self._site_balanced_order(gen)
        else:
            order = torch.randperm(len(self), generator=gen) if shuffle else torch.arange(len(self))
        stop = len(order) - (len(order) % batch_size if drop_last else 0)
        for start in range(0, stop, batch_size):
            idx = order[start : start + batch_size]
            if ranks > 1:
                if len(idx) < ranks:
                    return
                idx = idx[rank::ranks]
            yield self._take(idx, h[idx], v[idx])
