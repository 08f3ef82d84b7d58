"""data/augment.py: acquisition augmentation is seeded, changes only the slices it draws, and trains
deterministically."""

import pytest
import torch
from _small import SIZES

from robustmed_lite.config import load_config
from robustmed_lite.data.augment import ACQUISITION, acquisition_augment
from robustmed_lite.data.phantom import make_phantom_dataset
from robustmed_lite.trainer import Trainer


@pytest.fixture(scope="module")
def phantom():
    return make_phantom_dataset(12, 96, "A", seed=0)


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
    tiny = dict(SIZES, attack_steps=2, eval_attack_steps=2, epochs=1, progress=False)
    tiny.update(method="robustmed", acq_aug=0.5, weight_noise_warmup=0)
    weights = []
    for run in ("a", "b"):
        trainer = Trainer(load_config("cpu-demo", dict(tiny, out_dir=str(tmp_path / run))))
        trainer.fit()
        weights.append(trainer.model.state_dict())
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key
