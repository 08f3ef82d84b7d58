"""evaluation/adapt.py: test-time adaptation (AdaBN, TENT) changes only what it should, on a copy, never sees
labels, and leaves a checkpoint alone when evaluating with it."""

import copy

import pytest
import torch
from _small import SIZES, options
from torch import nn

from robustmed_lite.data.phantom import make_phantom_dataset
from robustmed_lite.evaluation.adapt import UnlabeledImages, adabn, adapt, tent
from robustmed_lite.models import create_model


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
    tiny = options(**SIZES, epochs=1, progress=False, lung_crop=True, intensity="anchor")
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
