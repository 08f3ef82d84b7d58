"""The on-disk slice store: what it stores, bit for bit the same batches as in memory, shared by DataLoader workers
and ranks, an interrupted write resumed, training from it, and clear errors."""

import json
import pickle

import numpy as np
import pytest
import torch
from _distributed_workers import launch, store_batches
from PIL import Image
from torch.utils.data import DataLoader

from robustmed_lite.cli import main
from robustmed_lite.config import load_config
from robustmed_lite.data import phantom, slicestore
from robustmed_lite.data.dataset import PriorDataset
from robustmed_lite.data.loaders import DataError, load_images
from robustmed_lite.data.slicestore import SliceStore, dequantize, quantize, write_folder_store, write_phantom_store
from robustmed_lite.data.splits import DataSplits, build_data
from robustmed_lite.trainer import Trainer

SIZE = 32
COUNTS = (200, 64, 64)  # train, val, test


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> SliceStore:
    return write_phantom_store(tmp_path_factory.mktemp("store") / "phantom", SIZE, *COUNTS, chunk=64, progress=False)


def _in_memory_twin(dataset: PriorDataset, images: torch.Tensor) -> PriorDataset:
    return PriorDataset(
        images,
        dataset.labels,
        prior=dataset.prior,
        hflip=dataset.hflip,
        vflip=dataset.vflip,
        seed=dataset.seed,
        prior_kwargs=dataset.prior_kwargs,
    )


def test_a_phantom_store_holds_the_phantom_in_eight_bits(store):
    assert len(store) == sum(COUNTS) and store.array.dtype == np.uint8
    assert store.array.shape == (sum(COUNTS), 1, SIZE, SIZE)
    parts = store.splits()
    assert [len(parts[k]) for k in ("train", "val", "test")] == list(COUNTS)
    for (name, n), seed in zip(zip(("train", "val", "test"), COUNTS), (0, 1, 2)):  # build_data's data seeds
        exact = phantom.make_phantom_dataset(n, SIZE, "A", seed=seed)
        stored = store.load(parts[name])
        assert torch.equal(stored, dequantize(quantize(exact.images)))
        assert (stored - exact.images).abs().max() <= 0.5 / 255 + 1e-7  # rounding to the nearest 1/255
        assert torch.equal(store.labels[parts[name]], exact.labels)
    assert store.paths[0] == "phantom:A:seed0#0" and store.info["environment"]["packages"]


def test_eight_bit_images_at_the_store_size_are_stored_exactly(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("COVID", "non-COVID"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 256, (24, 24), dtype=np.uint8)).save(tmp_path / "data" / cls / f"{i}.png")
    loaded = load_images(tmp_path / "data", 24, cache=False, progress=False)
    stored = write_folder_store(tmp_path / "data", tmp_path / "store", 24, chunk=3, progress=False)
    assert torch.equal(stored.load(), loaded.images)  # bit for bit: k/255 either way
    assert torch.equal(stored.labels, loaded.labels) and stored.paths == loaded.paths
    assert stored.info["plan"]["layout"] == loaded.layout == "kaggle"  # COVID/ and non-COVID/


@pytest.mark.parametrize("view", ["cap", "package"])
@pytest.mark.parametrize("prior", [True, False])
def test_batches_read_from_disk_equal_the_batches_in_memory(store, view, prior):
    train = store.splits()["train"]
    on_disk = PriorDataset(
        store.view(train), store.labels[train], prior=prior, vflip=True, seed=5, prior_kwargs={"view": view}
    )
    in_memory = _in_memory_twin(on_disk, store.load(train))
    assert on_disk.on_demand and not in_memory.on_demand
    for epoch in (0, 1):
        pairs = list(zip(on_disk.batches(48, epoch=epoch), in_memory.batches(48, epoch=epoch), strict=True))
        assert len(pairs) == 5
        for a, b in pairs:
            for u, w in zip(a, b, strict=True):
                assert torch.equal(u, w)
    x, x_aug, _ = on_disk[7]
    assert torch.equal(x, in_memory[7][0]) and torch.equal(x_aug, in_memory[7][1])


def test_dataloader_workers_share_the_file_not_the_pixels(store):
    view = store.view(store.splits()["train"])
    assert len(pickle.dumps(view)) < 20_000  # paths and labels, no pixels (200 slices are 200 KB)
    dataset = PriorDataset(view, store.labels[view.indices], seed=1)
    twin = _in_memory_twin(dataset, view[torch.arange(len(view))])
    loaded = list(DataLoader(dataset, batch_size=50, num_workers=2))
    for a, b in zip(loaded, DataLoader(twin, batch_size=50), strict=True):
        for u, w in zip(a, b, strict=True):
            assert torch.equal(u, w)


def test_ranks_read_their_shares_of_the_same_batches(store, tmp_path):
    """Two gloo ranks each open the store as the trainer does and take their halves of every global batch."""
    cfg = {"data": str(store.root), "img_size": SIZE, "batch_size": 40, "progress": False}
    launch(store_batches, 2, tmp_path, cfg)
    shares = [torch.load(tmp_path / f"store-batches-{rank}.pt", weights_only=True) for rank in (0, 1)]
    whole = build_data(load_config("cpu-demo", dict(cfg, out_dir=str(tmp_path / "one"))))
    twin = _in_memory_twin(whole.train, store.load(whole.train.images.indices))
    batches = list(twin.batches(40, epoch=0))
    assert len(shares[0]) == len(shares[1]) == len(batches) == 5
    for k, (x, x_aug, y) in enumerate(batches):
        for part, name in enumerate(("x", "x_aug", "y")):
            merged = torch.stack([shares[0][k][name], shares[1][k][name]], 1).flatten(0, 1)
            assert torch.equal(merged, (x, x_aug, y)[part])  # rank r holds positions r, r + 2, ...


def test_an_interrupted_write_resumes_where_it_stopped(tmp_path, monkeypatch):
    render = phantom._render_chunk
    calls = []

    def failing(chunk, *args):
        calls.append(chunk)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return render(chunk, *args)

    monkeypatch.setattr(phantom, "_render_chunk", failing)
    out = tmp_path / "store"
    with pytest.raises(KeyboardInterrupt):
        write_phantom_store(out, 16, 300, 64, 64, chunk=128, progress=False)
    partial = tmp_path / "store.partial"
    assert not out.exists() and json.loads((partial / "progress.json").read_text())["done"] == 128
    with pytest.raises(DataError, match="unfinished write of another store"):
        write_phantom_store(out, 16, 299, 64, 64, chunk=128, progress=False)
    with pytest.raises(DataError, match="unfinished write"):
        SliceStore(partial)
    monkeypatch.setattr(phantom, "_render_chunk", render)
    calls.clear()
    resumed = write_phantom_store(out, 16, 300, 64, 64, chunk=128, progress=False)
    assert not partial.exists()
    whole = write_phantom_store(tmp_path / "whole", 16, 300, 64, 64, chunk=128, progress=False)
    assert np.array_equal(resumed.array, whole.array) and resumed.paths == whole.paths
    assert torch.equal(resumed.labels, whole.labels)
    # Written once: the same command again reuses it; another one is refused, nothing overwritten.
    assert write_phantom_store(out, 16, 300, 64, 64, progress=False).root == resumed.root
    with pytest.raises(DataError, match="already exists"):
        write_phantom_store(out, 16, 100, 64, 64, progress=False)


def test_training_from_the_store_equals_training_in_memory(store, tmp_path):
    overrides = {
        "data": str(store.root),
        "img_size": SIZE,
        "method": "pgd_at",
        "model": "small_cnn",
        "epochs": 1,
        "batch_size": 50,
        "eval_n": 32,
        "attack_steps": 2,
        "eval_attack_steps": 2,
        "progress": False,
        "prior": True,
    }
    splits = build_data(load_config("cpu-demo", dict(overrides, out_dir=str(tmp_path / "unused"))))
    memory = DataSplits(
        _in_memory_twin(splits.train, store.load(splits.train.images.indices)), splits.val, splits.test, None, None
    )
    on_disk = Trainer(load_config("cpu-demo", dict(overrides, out_dir=str(tmp_path / "disk"))))
    assert isinstance(on_disk.data.train.images, slicestore.StoredImages)
    on_disk.fit()
    in_memory = Trainer(load_config("cpu-demo", dict(overrides, out_dir=str(tmp_path / "memory"))), data=memory)
    in_memory.fit()
    for (name, a), b in zip(on_disk.model.state_dict().items(), in_memory.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert on_disk.history[0]["train_loss"] == in_memory.history[0]["train_loss"]


@pytest.mark.parametrize(
    "override, match",
    [
        ({"img_size": 24}, "write the store at --size 24"),
        ({"lung_crop": True}, "set lung_crop false"),
        ({"intensity": "percentile"}, "set intensity none"),
    ],
)
def test_settings_a_store_cannot_serve_are_clear_errors(store, tmp_path, override, match):
    cfg = load_config(
        "cpu-demo",
        {"data": str(store.root), "img_size": SIZE, "progress": False, "out_dir": str(tmp_path / "r"), **override},
    )
    with pytest.raises(DataError, match=match):
        build_data(cfg)


def test_broken_stores_are_clear_errors(store, tmp_path):
    with pytest.raises(DataError, match="does not exist. Fix: write it first"):
        SliceStore(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is not a slice store"):
        SliceStore(tmp_path / "empty")
    broken = tmp_path / "broken"
    broken.mkdir()
    np.save(broken / "slices.npy", np.zeros((3, 1, 8, 8), dtype=np.uint8))
    index = dict(store.info, count=4, size=8, labels=[0, 1, 0, 1], paths=["a", "b", "c", "d"])
    (broken / "index.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match=r"holds uint8 \(3, 1, 8, 8\).*4 uint8 slices of 8 px"):
        SliceStore(broken)
    (broken / "index.json").write_text("{not json")
    with pytest.raises(DataError, match="cannot read .*index.json"):
        SliceStore(broken)
    with pytest.raises(IndexError, match="out of range"):
        store.read([len(store)])
    with pytest.raises(ValueError, match="size takes an integer >= 16"):
        write_phantom_store(tmp_path / "tiny", 8, 10, progress=False)
    with pytest.raises(ValueError, match="n_train takes an integer >= 1"):
        write_phantom_store(tmp_path / "none", 16, 0, progress=False)
    with pytest.raises(DataError, match="no class folders|does not exist"):
        write_folder_store(tmp_path / "empty", tmp_path / "out", 16, progress=False)
    assert not (tmp_path / "tiny").exists() and not (tmp_path / "out.partial").exists()


def test_the_data_store_command_writes_a_store(tmp_path, capsys):
    out = tmp_path / "cli"
    assert (
        main(
            [
                "data",
                "store",
                "--data",
                "phantom",
                "--size",
                "16",
                "--n_train",
                "64",
                "--n_val",
                "32",
                "--n_test",
                "32",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "128 slices of 16 px" in printed and f"train --data {out}" in printed
    assert len(SliceStore(out)) == 128
    assert (
        main(["data", "store", "--data", str(tmp_path / "missing"), "--size", "16", "--out", str(tmp_path / "other")])
        == 2
    )  # a user's mistake: one line on stderr, exit code 2
    assert "missing" in capsys.readouterr().err


def test_a_reproduction_reads_the_classes_of_a_store_from_its_index(store, tmp_path):
    from robustmed_lite.studies.reproduce import check_classes

    check_classes(str(store.root), SIZE)
    one_class = tmp_path / "one-class"
    one_class.mkdir()
    (one_class / "slices.npy").symlink_to(store.root / "slices.npy")
    (one_class / "index.json").write_text(json.dumps(dict(store.info, labels=[1] * len(store))))
    with pytest.raises(DataError, match="holds only COVID images"):
        check_classes(str(one_class), SIZE)
