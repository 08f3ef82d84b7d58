"""data/preprocess.py: the components against the cross-site shift that act on the images: lung crop and
intensity standardisation."""

import pytest
import torch

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
