"""data.duplicates: exact and near-duplicate slices are found, kept in one split, reported and recorded."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from robustmed_lite.checkpoints import write_run_record
from robustmed_lite.config import load_config
from robustmed_lite.data.duplicates import (
    content_hashes,
    duplicate_groups,
    keep_together,
)
from robustmed_lite.data.loaders import load_images
from robustmed_lite.data.splits import build_data
from robustmed_lite.evaluation.checkpoint_eval import warn_training_overlap


def _distinct_slices(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Smooth random images, far apart in every hash."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 1, 6, 6, generator=gen)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def _tripled_folder(root, n_per_class: int = 10, copies: int = 3):
    """A Kaggle-layout folder where every image is stored ``copies`` times under different names."""
    images = (_distinct_slices(2 * n_per_class) * 255).round().to(torch.uint8)[:, 0].numpy()
    for cls, folder in ((0, "non-COVID"), (1, "COVID")):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            for c in range(copies):
                Image.fromarray(images[cls * n_per_class + i]).save(root / folder / f"img{i}_copy{c}.png")
    return root


def test_exact_duplicates_are_grouped_and_off_finds_none():
    x = _distinct_slices(6)
    batch = torch.cat([x, x[[1, 1, 4]]])  # image 1 three times in all, image 4 twice
    groups = duplicate_groups(batch, "exact")
    assert sorted(groups) == [[1, 6, 7], [4, 8]]
    assert duplicate_groups(batch, "off") == []
    assert len(set(content_hashes(x))) == 6


def test_near_duplicates_need_the_near_mode():
    x = _distinct_slices(5)
    noisy = (x[2:3] + 0.002 * torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    batch = torch.cat([x, noisy])
    assert duplicate_groups(batch, "exact") == []
    assert duplicate_groups(batch, "near") == [[2, 5]]
    assert duplicate_groups(batch, "near", near_bits=-1) == []  # a radius below zero accepts no pair


def test_unknown_mode_is_a_clear_error():
    with pytest.raises(ValueError, match="duplicates must be one of"):
        duplicate_groups(_distinct_slices(2), "fuzzy")


def test_keep_together_moves_members_to_the_first_images_split():
    parts = {"train": np.array([0, 3]), "val": np.array([1]), "test": np.array([2, 4])}
    new, report = keep_together(parts, [[0, 2], [1, 4]], labels=[0, 1, 0, 0, 1], names=list("abcde"))
    assert {k: v.tolist() for k, v in new.items()} == {"train": [0, 2, 3], "val": [1, 4], "test": []}
    assert (report.groups, report.images_in_groups, report.moved, report.crossing_classes) == (2, 4, 2, 0)
    assert report.examples == [["a", "c"], ["b", "e"]]
    _, crossing = keep_together(parts, [[0, 1]], labels=[0, 1, 0, 0, 1])
    assert crossing.crossing_classes == 1


def test_tripled_folder_leaks_nothing_into_test_and_says_so(tmp_path):
    root = _tripled_folder(tmp_path / "tripled")
    data = load_images(root, 32, cache=False, progress=False)
    with pytest.warns(UserWarning, match=r"exact-duplicate group\(s\) \(60 images\), \d+ moved"):
        parts = data.splits(val=0.2, test=0.3, seed=0)
    hashes = content_hashes(data.images)
    train = {hashes[i] for i in parts["train"]}
    assert not any(hashes[i] in train for i in (*parts["val"], *parts["test"]))
    assert parts.duplicates.groups == 20 and parts.duplicates.moved > 0
    assert sum(len(v) for v in parts.values()) == 60  # moved, never dropped

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        off = data.splits(val=0.2, test=0.3, seed=0, duplicates="off")
    assert not caught and off.duplicates.mode == "off"
    leaked = sum(hashes[i] in {hashes[j] for j in off["train"]} for i in off["test"])
    assert leaked > 0  # the split as drawn does leak: the check is what prevents it


def test_the_run_records_the_duplicate_check(tmp_path):
    root = _tripled_folder(tmp_path / "tripled")
    cfg = load_config(
        "cpu-demo", dict(data=str(root), img_size=32, out_dir=str(tmp_path / "run"), progress=False, prior=False)
    )
    with pytest.warns(UserWarning, match="moved"):
        splits = build_data(cfg)
    write_run_record(cfg.run_dir(), cfg, splits.record())
    record = json.loads((cfg.run_dir() / "data.json").read_text())
    assert record["duplicates"][str(root)]["groups"] == 20
    n = {k: v["n"] for k, v in record["splits"].items()}
    assert sum(n.values()) == 60


def test_evaluating_on_training_images_warns(tmp_path):
    root = _tripled_folder(tmp_path / "tripled", copies=1)
    cfg = load_config("cpu-demo", dict(data=str(root), img_size=32, progress=False))
    images = load_images(root, 32, cache=False, progress=False).images
    with pytest.warns(UserWarning, match=r"of 20 images of .* are training images of this run"):
        overlap = warn_training_overlap(images, cfg, str(root))
    assert 0 < overlap < 20
    assert warn_training_overlap(_distinct_slices(4, seed=9), cfg, "new data") == 0


@pytest.mark.real_data
def test_soares_holds_two_exact_duplicate_pairs(shared_data):
    data = load_images(shared_data / "sarscov2", 64, progress=False)
    groups = duplicate_groups(data.images, "exact")
    assert [len(g) for g in groups] == [2, 2]
    assert all(len({int(data.labels[i]) for i in g}) == 1 for g in groups)
