"""Components against the cross-site shift: lung crop, intensity standardisation, acquisition augmentation,
multi-source training and test-time adaptation (AdaBN, TENT)."""

import copy

import pytest
import torch
from torch import nn

from robustmed_lite.config import load_config
from robustmed_lite.data.augment import ACQUISITION, acquisition_augment
from robustmed_lite.data.dataset import PriorDataset
from robustmed_lite.data.phantom import make_phantom_dataset
from robustmed_lite.data.preprocess import (
    AIR_LEVEL,
    INTENSITY_MODES,
    TISSUE_LEVEL,
    lung_boxes,
    lung_crop,
    prepare,
    split_spec,
    standardise,
)
from robustmed_lite.data.splits import build_data
from robustmed_lite.evaluation.adapt import UnlabeledImages, adabn, adapt, tent
from robustmed_lite.models import create_model
from robustmed_lite.trainer import Trainer


@pytest.fixture(scope="module")
def phantom():
    return make_phantom_dataset(12, 96, "A", seed=0)


# ---------------------------------------------------------------------------------------------- lung crop
def test_the_crop_box_contains_the_phantom_lungs(phantom):
    boxes, fallback = lung_boxes(phantom.lung_masks)
    assert fallback == []
    for (top, left, side), mask in zip(boxes.tolist(), phantom.lung_masks):
        inside = torch.zeros_like(mask)
        inside[:, top : top + side, left : left + side] = True
        assert mask[~inside].sum() == 0, "lung pixels outside the crop"
        assert side < mask.shape[-1]  # the phantom has body around the lungs: the crop is a real crop


def test_lung_crop_frames_the_lungs_found_in_the_image(phantom):
    # On the images themselves (Otsu lung masks), the estimated box must still hold the true lungs.
    x = phantom.images
    cropped, report = lung_crop(x, 64)
    assert cropped.shape == (12, 1, 64, 64) and report.n == 12 and report.n_fallback == 0
    assert 0 <= cropped.min() and cropped.max() <= 1
    from robustmed_lite.data.preprocess import lungs

    boxes, _ = lung_boxes(lungs(x))
    for (top, left, side), mask in zip(boxes.tolist(), phantom.lung_masks):
        covered = mask[:, top : top + side, left : left + side].sum() / mask.sum()
        assert covered > 0.98


def test_a_slice_without_lungs_keeps_its_frame_and_is_counted():
    flat = torch.full((2, 1, 64, 64), 0.7)
    flat[1, :, 20:24, 20:24] = 0.1  # a small dark patch is not a pair of lungs
    out, report = lung_crop(flat, 32)
    assert report.fallback == [0, 1]
    assert torch.allclose(out[0], torch.full((1, 32, 32), 0.7))


# ------------------------------------------------------------------------------------ intensity standard
@pytest.mark.parametrize("mode", [m for m in INTENSITY_MODES if m != "none"])
def test_standardisation_is_invariant_to_affine_intensity_changes(mode, phantom):
    x = phantom.images
    # Ranks (histeq) move by a few pixels where a * x + b rounds two nearly equal floats onto one value.
    atol = 1e-3 if mode == "histeq" else 2e-5
    for a, b in ((0.5, 0.2), (1.7, -0.3), (0.9, 0.05)):
        torch.testing.assert_close(standardise(a * x + b, mode), standardise(x, mode), atol=atol, rtol=0)


def test_histogram_equalisation_is_invariant_to_any_increasing_map(phantom):
    x = phantom.images
    torch.testing.assert_close(standardise(x**2.2, "histeq"), standardise(x, "histeq"), atol=1e-6, rtol=0)


def test_anchor_puts_lung_air_and_soft_tissue_where_a_lung_window_does(phantom):
    from robustmed_lite.data.preprocess import _masked_median

    out = standardise(phantom.images, "anchor")
    lung_air = _masked_median(out, phantom.lung_masks)
    assert torch.allclose(lung_air, torch.full_like(lung_air, AIR_LEVEL), atol=0.06)
    assert AIR_LEVEL < out.mean() < TISSUE_LEVEL
    with pytest.raises(ValueError, match="intensity='zscore'"):
        standardise(phantom.images, "zscore")


def test_prepare_and_domain_specs(phantom):
    out, report = prepare(phantom.images, 48, crop=False, intensity="none")
    assert out.shape[-1] == 48 and report is None
    assert split_spec("/data/ucsd:test") == ("/data/ucsd", "test")
    assert split_spec("C:/data/ucsd") == ("C:/data/ucsd", None)


# -------------------------------------------------------------------------------- acquisition augmentation
def test_acquisition_augmentation_is_seeded_and_changes_only_drawn_slices(phantom):
    x = phantom.images[:, :, ::2, ::2].contiguous()
    a, changed = acquisition_augment(x, 0.5, 2, seed=3)
    b, changed_b = acquisition_augment(x, 0.5, 2, seed=3)
    assert torch.equal(a, b) and torch.equal(changed, changed_b)
    assert 0 < changed.sum() < len(x)
    assert torch.equal(a[~changed], x[~changed])
    assert all((a[i] != x[i]).any() for i in changed.nonzero().flatten())
    assert not torch.equal(acquisition_augment(x, 0.5, 2, seed=4)[0], a)
    from robustmed_lite.evaluation.corruptions import CORRUPTIONS

    # corruption_not_augmented leaves these out of the evaluation corruptions: they must be among them.
    assert set(ACQUISITION) <= set(CORRUPTIONS)


def test_training_with_acquisition_augmentation_is_deterministic(tmp_path):
    tiny = dict(
        img_size=32,
        n_train=64,
        n_val=32,
        n_test=32,
        batch_size=32,
        eval_n=16,
        attack_steps=2,
        eval_attack_steps=2,
        epochs=1,
        progress=False,
        method="robustmed",
        acq_aug=0.5,
        weight_noise_warmup=0,
    )
    weights = []
    for run in ("a", "b"):
        trainer = Trainer(load_config("cpu-demo", dict(tiny, out_dir=str(tmp_path / run))))
        trainer.fit()
        weights.append(trainer.model.state_dict())
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key


# ---------------------------------------------------------------------------------------- multi-source
def test_site_balanced_batches_draw_both_sites_equally():
    images = torch.rand(120, 1, 8, 8)
    sites = torch.cat([torch.zeros(100, dtype=torch.long), torch.ones(20, dtype=torch.long)])
    data = PriorDataset(images, torch.zeros(120, dtype=torch.long), prior=False, sites=sites)
    order = data._site_balanced_order(torch.Generator().manual_seed(0))
    assert len(order) == 120
    share = (sites[order] == 1).float().mean()
    assert 0.45 <= share <= 0.55  # the small site is repeated up to half of the epoch
    assert set(order[sites[order] == 1].tolist()) == set(range(100, 120))  # every item of the small site
    first = torch.cat([b[2] for b in data.batches(32, epoch=0)])
    again = torch.cat([b[2] for b in data.batches(32, epoch=0)])
    assert torch.equal(first, again)


def test_multi_source_pools_the_other_sites_train_split(shared_data):
    cfg = load_config(
        "cpu-demo",
        dict(
            data=str(shared_data / "sarscov2"),
            extra_data=str(shared_data / "ucsd_covidct"),
            ood_data=str(shared_data / "ucsd_covidct") + ":test",
            img_size=32,
            progress=False,
        ),
    )
    splits = build_data(cfg)
    assert splits.extra_name == "ucsd_covidct (test)" and len(splits.extra_test[1]) == 203  # UCSD's official test
    assert splits.train.sites is not None and int((splits.train.sites == 1).sum()) == 425  # its official train
    assert len(splits.shift[1]) == 203 and splits.shift_name == "ucsd_covidct (test)"


def test_bad_component_settings_are_refused():
    with pytest.raises(ValueError, match="acq_aug is a probability"):
        load_config("cpu-demo", {"acq_aug": 1.5})
    with pytest.raises(ValueError, match="intensity='zscore' is not one of"):
        load_config("cpu-demo", {"intensity": "zscore"})
    with pytest.raises(FileNotFoundError, match="ood_data '/nowhere:test' does not exist"):
        load_config("cpu-demo", {"ood_data": "/nowhere:test"})


# ------------------------------------------------------------------------------- test-time adaptation
@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = create_model("tiny_visformer", img_size=32).eval()
    target = make_phantom_dataset(48, 32, "B", seed=5).images
    return model, target


def _buffers(model):
    return {k: v.clone() for k, v in model.named_buffers()}


def test_adabn_changes_only_batchnorm_buffers_of_a_copy(trained):
    model, target = trained
    before_params = copy.deepcopy(model.state_dict())
    adapted = adabn(model, target)
    for k, v in model.state_dict().items():  # the source is untouched
        assert torch.equal(v, before_params[k]), k
    params = dict(adapted.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, params[name]), f"AdaBN changed the parameter {name}"
    bn_stats = [k for k in _buffers(model) if k.endswith(("running_mean", "running_var"))]
    assert bn_stats and any(not torch.equal(_buffers(model)[k], _buffers(adapted)[k]) for k in bn_stats)
    assert not adapted.training


def test_tent_changes_only_batchnorm_affine_parameters_of_a_copy(trained):
    model, target = trained
    source = copy.deepcopy(model.state_dict())
    adapted = tent(model, target, steps=2, lr=1e-2, seed=0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, source[k]), k
    bn_affine = {
        f"{n}.{p}"
        for n, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        for p in ("weight", "bias")
    }
    changed = {n for n, p in adapted.named_parameters() if not torch.equal(p, dict(model.named_parameters())[n])}
    assert changed and changed <= bn_affine
    again = tent(model, target, steps=2, lr=1e-2, seed=0)  # deterministic by seed
    for (n, p), (_, q) in zip(adapted.named_parameters(), again.named_parameters()):
        assert torch.equal(p, q), n


def test_adaptation_never_sees_labels(trained):
    model, target = trained
    labels = torch.zeros(len(target), dtype=torch.long)
    for bad in ((target, labels), make_phantom_dataset(4, 32, "B", seed=1), [target]):
        with pytest.raises(TypeError, match="unlabeled images"):
            adabn(model, bad)
        with pytest.raises(TypeError, match="unlabeled images"):
            tent(model, bad)
    assert isinstance(adapt(model, UnlabeledImages(target), "adabn"), nn.Module)


def test_adaptation_errors_are_clear(trained):
    model, target = trained
    with pytest.raises(ValueError, match="target set is empty"):
        adabn(model, target[:0])
    no_bn = create_model("deit_tiny", img_size=32)
    with pytest.raises(ValueError, match="no BatchNorm layer"):
        adabn(no_bn, target)
    with pytest.raises(ValueError, match="unknown adaptation"):
        adapt(model, target, "memo")


def test_evaluate_with_adaptation_leaves_the_checkpoint_alone(tmp_path, capsys):
    import hashlib

    from robustmed_lite.cli import main

    out = str(tmp_path / "run")
    tiny = [
        "--img_size",
        "32",
        "--n_train",
        "64",
        "--n_val",
        "32",
        "--n_test",
        "32",
        "--batch_size",
        "32",
        "--eval_n",
        "16",
        "--epochs",
        "1",
        "--progress",
        "false",
        "--lung_crop",
        "true",
        "--intensity",
        "anchor",
    ]
    assert main(["train", "--method", "erm", "--out_dir", out, *tiny]) == 0
    checkpoint = tmp_path / "run" / "best_clean.pt"
    before = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    capsys.readouterr()
    for method in ("adabn", "tent"):
        assert (
            main(
                [
                    "evaluate",
                    "--checkpoint",
                    str(checkpoint),
                    "--split",
                    "shift",
                    "--attacks",
                    "fgsm",
                    "--adapt",
                    method,
                ]
            )
            == 0
        )
    assert "FGSM" in capsys.readouterr().out
    assert hashlib.sha256(checkpoint.read_bytes()).hexdigest() == before
