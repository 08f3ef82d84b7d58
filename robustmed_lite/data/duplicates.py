"""Split hygiene: the same slice in two splits leaks the answer from training into evaluation.

Exact duplicates share every pixel after decoding (a content hash of the decoded grayscale slice, so a copy saved
under another name or format is found too). Near duplicates (opt-in) have 256-bit difference hashes (dHash: the
signs of horizontal gradients of a 17 x 16 thumbnail) within ``near_bits`` bits of each other: re-encoded,
slightly shifted or denoised copies, and neighbouring slices of one scan. Duplicates are then kept in one split
(the split of the group's first image in file order), and how many moved is reported.

On the Soares SARS-CoV-2 set (2,481 slices at 224 px): 2 exact pairs, and 10 pairs within 12 of 256 bits; none
of them crosses the two classes.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

DUPLICATE_MODES = ("exact", "near", "off")
NEAR_BITS = 12  # of 256: about 5 % of the gradient signs may differ


@dataclass
class DuplicateReport:
    """What the duplicate check found and did.

    Attributes:
        mode: ``exact``, ``near`` or ``off``.
        groups: Groups of two or more images that are duplicates of each other.
        images_in_groups: Images in those groups.
        moved: Images moved to the split of their group's first image.
        crossing_classes: Groups whose images carry different labels (a labelling error to look at).
        examples: Up to five groups, as lists of image indices (or paths where known).
    """

    mode: str
    groups: int = 0
    images_in_groups: int = 0
    moved: int = 0
    crossing_classes: int = 0
    examples: list | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        if self.mode == "off":
            return "duplicate check off"
        return (
            f"{self.groups} {self.mode}-duplicate group(s) ({self.images_in_groups} images), {self.moved} moved "
            "so that each group lies in one split"
        )


class SplitIndices(dict):
    """Split name -> index array, with the duplicate check's report as ``.duplicates``."""

    def __init__(self, parts: dict, duplicates: DuplicateReport | None = None):
        super().__init__(parts)
        self.duplicates = duplicates


def content_hashes(images: torch.Tensor) -> list[str]:
    """One hash per image of its pixels (any dtype and shape per image)."""
    flat = images.detach().cpu().contiguous()
    return [hashlib.blake2b(flat[i].numpy().tobytes(), digest_size=16).hexdigest() for i in range(len(flat))]


def difference_hashes(images: torch.Tensor) -> np.ndarray:
    """256-bit dHash per image, packed as (N, 32) uint8: signs of horizontal differences of a 17 x 16 thumbnail."""
    x = images.detach().float().cpu()
    if x.dim() == 3:
        x = x.unsqueeze(1)
    thumb = F.interpolate(x.mean(1, keepdim=True), size=(16, 17), mode="area")[:, 0]
    bits = (thumb[:, :, 1:] > thumb[:, :, :-1]).reshape(len(x), -1).numpy()
    return np.packbits(bits, axis=1)


def _union_find_groups(n: int, pairs) -> list[list[int]]:
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in pairs:
        ra, rb = root(int(a)), root(int(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def duplicate_groups(images: torch.Tensor, mode: str = "exact", near_bits: int = NEAR_BITS) -> list[list[int]]:
    """Groups (sorted index lists, two or more each) of images that duplicate each other.

    Args:
        images: (N, C, H, W) or (N, H, W).
        mode: ``exact`` (same pixels), ``near`` (exact, or dHash within ``near_bits`` of 256 bits), ``off``.
        near_bits: Hamming radius of the near-duplicate test.

    Raises:
        ValueError: An unknown mode.
    """
    if mode not in DUPLICATE_MODES:
        raise ValueError(f"duplicates must be one of {DUPLICATE_MODES}, got {mode!r}")
    if mode == "off" or len(images) < 2:
        return []
    first: dict[str, int] = {}
    pairs = []
    for i, h in enumerate(content_hashes(images)):
        if h in first:
            pairs.append((first[h], i))
        else:
            first[h] = i
    if mode == "near":
        codes = difference_hashes(images)
        for i in range(len(codes) - 1):  # one row of the distance matrix at a time: O(N) memory
            distance = np.unpackbits(codes[i] ^ codes[i + 1 :], axis=1).sum(1)
            pairs += [(i, i + 1 + int(j)) for j in np.flatnonzero(distance <= near_bits)]
    return _union_find_groups(len(images), pairs)


def keep_together(
    parts: dict[str, np.ndarray], groups: list[list[int]], labels=None, mode: str = "exact", names=None
) -> tuple[dict[str, np.ndarray], DuplicateReport]:
    """Moves every image of a duplicate group into the split of the group's first image.

    Args:
        parts: Split name -> index array (disjoint).
        groups: From ``duplicate_groups``.
        labels: One label per image, to count groups that cross classes.
        mode: Recorded in the report.
        names: One name per image (paths) for the report's examples.

    Returns:
        The new parts (sorted index arrays, the same images in all) and the report.
    """
    split_of = {int(i): name for name, idx in parts.items() for i in np.asarray(idx)}
    moved = 0
    for group in groups:
        home = split_of.get(group[0])
        for i in group[1:]:
            if i in split_of and split_of[i] != home:
                split_of[i] = home
                moved += 1
    new = {name: np.array(sorted(i for i, s in split_of.items() if s == name), dtype=np.int64) for name in parts}
    labels = None if labels is None else np.asarray(labels).reshape(-1)
    crossing = 0 if labels is None else sum(len(set(labels[g].tolist())) > 1 for g in groups)
    examples = [
        [names[i] if names is not None else i for i in g[:3]] + (["..."] if len(g) > 3 else []) for g in groups[:5]
    ]
    report = DuplicateReport(mode, len(groups), sum(map(len, groups)), moved, crossing, examples)
    return new, report
