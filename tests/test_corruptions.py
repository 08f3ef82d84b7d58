"""Corruptions: seeded, shape- and range-preserving, monotone in severity; a real projection round trip."""

import math

import pytest
import torch

from robustmed_lite.data.phantom import make_phantom_dataset
from robustmed_lite.evaluation.corruptions import (
    CAP_IMAGENET_C,
    CORRUPTIONS,
    FAMILIES,
    SEVERITIES,
    _crop_like,
    _frost_texture,
    _pad_square,
    corrupt,
    fbp,
    n_angles,
    radon,
)
from robustmed_lite.ops import gaussian_blur


@pytest.fixture(scope="module")
def slices():
    return make_phantom_dataset(6, 64, "A", seed=0).images  # the smallest size the book uses


# The issue's families, written out here rather than read from FAMILIES, so that a corruption dropped from the
# package is caught.
@pytest.mark.parametrize(
    "family, names",
    [
        ("noise", "gaussian_noise shot_noise impulse_noise speckle_noise"),
        ("blur", "defocus_blur gaussian_blur motion_blur zoom_blur glass_blur"),
        ("weather", "snow frost fog"),
        (
            "ct_physics",
            "low_dose sparse_view ring beam_hardening window_shift sharp_kernel smooth_kernel slice_thickness",
        ),
    ],
)
def test_every_family_of_the_issue_is_there(family, names):
    assert set(FAMILIES[family]) == set(names.split())


def test_the_26_corruptions_are_named_once_with_five_severities_each():
    assert all(len(SEVERITIES[c]) == 5 for c in CORRUPTIONS)
    assert len(CORRUPTIONS) == len(set(CORRUPTIONS)) == 26


def test_every_imagenet_c_type_of_cap_is_implemented():
    assert len(CAP_IMAGENET_C) == len(set(CAP_IMAGENET_C)) == 15
    assert set(CAP_IMAGENET_C) <= set(CORRUPTIONS), set(CAP_IMAGENET_C) - set(CORRUPTIONS)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_shape_range_determinism_and_identity(name, slices):
    a = corrupt(slices, name, 3, seed=7)
    assert a.shape == slices.shape and a.dtype == slices.dtype
    assert a.min() >= 0 and a.max() <= 1 and torch.isfinite(a).all()
    assert torch.equal(a, corrupt(slices, name, 3, seed=7))
    assert corrupt(slices, name, 0) is slices


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_effect_grows_with_severity(name, slices):
    change = [(corrupt(slices, name, s, seed=1) - slices).abs().mean().item() for s in range(1, 6)]
    assert change[0] > 0, f"{name} at severity 1 changes nothing"
    assert all(b > a for a, b in zip(change, change[1:])), f"{name}: {change}"


RANDOM = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "speckle_noise",
    "motion_blur",
    "glass_blur",
    "snow",
    "frost",
    "fog",
    "elastic",
    "low_dose",
    "ring",
    "window_shift",
)


def test_random_corruptions_depend_on_the_seed_and_the_others_do_not(slices):
    for name in CORRUPTIONS:
        differ = not torch.equal(corrupt(slices, name, 3, seed=1), corrupt(slices, name, 3, seed=2))
        assert differ == (name in RANDOM), name


def test_low_dose_is_a_projection_reconstruction_round_trip(slices):
    padded = _pad_square(slices)
    angles = torch.linspace(0, math.pi, n_angles(slices.shape[-1]) + 1)[:-1]
    sino = radon(padded, angles)
    assert sino.shape == (len(slices), len(angles), padded.shape[-1])
    # Line integrals: every projection carries the image's total mass.
    assert torch.allclose(sino.sum(-1), padded.sum((1, 2, 3)).unsqueeze(1).expand_as(sino.sum(-1)), rtol=0.02)
    recon = _crop_like(fbp(sino, angles), slices)
    assert (recon - slices).abs().mean() < 0.02
    assert torch.corrcoef(torch.stack([recon.flatten(), slices.flatten()]))[0, 1] > 0.99
    # Reconstructing only the image's own pixels is the same as cropping the full reconstruction.
    torch.testing.assert_close(fbp(sino, angles, out_size=slices.shape[-2:]), recon, rtol=0, atol=1e-5)
    # Lower dose, more noise in the reconstruction.
    noise = [(corrupt(slices, "low_dose", s, seed=0) - slices).std().item() for s in (1, 3, 5)]
    assert noise[0] < noise[1] < noise[2]


def test_bad_arguments_are_clear_errors(slices):
    with pytest.raises(ValueError, match="unknown corruption 'hail'"):
        corrupt(slices, "hail", 1)
    with pytest.raises(ValueError, match="severity"):
        corrupt(slices, "jpeg", 6)
    with pytest.raises(ValueError, match=r"\(N,1,H,W\)"):
        corrupt(slices[:, 0], "jpeg", 1)


def _local_contrast(x):
    return (x - gaussian_blur(x, 2.0)).abs().mean().item()


def test_fog_lowers_local_contrast_and_lifts_the_dark(slices):
    fog = corrupt(slices, "fog", 5, seed=0)
    assert _local_contrast(fog) < 0.85 * _local_contrast(slices)
    dark = slices < 0.3  # air and lungs: the haze shows there
    assert fog[dark].mean() > slices[dark].mean() + 0.02
    # A smooth, image-sized haze: what fog adds varies slowly (little of it is pixel-level texture).
    added = fog - slices * fog.amax((1, 2, 3), keepdim=True) / (1 + SEVERITIES["fog"][4][0])
    assert _local_contrast(added) < 0.35 * added.std().item()  # white noise: 0.84


def test_glass_blur_moves_pixels_but_keeps_the_intensities(slices):
    glass = corrupt(slices, "glass_blur", 5, seed=0)
    assert (glass.mean() - slices.mean()).abs() < 0.01
    # Not just a blur: the swaps make it differ from the same Gaussian blur alone, and rougher than a blur.
    sigma = SEVERITIES["glass_blur"][4][0] * slices.shape[-1] / 224
    blurred = gaussian_blur(gaussian_blur(slices, sigma), sigma)
    assert (glass - blurred).abs().mean() > 0.01
    # The edges are scattered: more pixels in between the dark lungs and the bright tissue than in the blur.
    between = lambda t: ((t > 0.35) & (t < 0.65)).float().mean().item()  # noqa: E731
    assert between(glass) > between(slices)


def test_snow_brightens_with_flakes_and_streaks(slices):
    snow = corrupt(slices, "snow", 5, seed=0)
    assert snow.mean() > slices.mean() + 0.03
    dark = slices < 0.3  # air and lungs
    assert (snow - slices)[dark].mean() > 0.03  # flakes over the dark air and lungs
    # Flakes and streaks: what snow adds has pixel-level texture, not only the smooth brightening.
    brightening = SEVERITIES["snow"][4][3] * (0.5 * slices + 0.5)
    assert _local_contrast(snow - slices) > 10 * _local_contrast(brightening)
    # Flakes cover more of the image with severity.
    cover = [((corrupt(slices, "snow", s, seed=0) - slices)[dark] > 0.1).float().mean().item() for s in (1, 5)]
    assert cover[1] > cover[0] > 0


def test_frost_adds_a_seeded_crystalline_texture(slices):
    texture = _frost_texture(slices, torch.Generator().manual_seed(0))
    assert texture.shape == slices.shape and texture.min() >= 0 and texture.max() <= 1
    assert texture.std() > 0.02 and _local_contrast(texture) > 0.01  # fine, bright structure, not a haze
    c0, c1 = SEVERITIES["frost"][4]
    frost = corrupt(slices, "frost", 5, seed=0)
    torch.testing.assert_close(frost, (c0 * slices + c1 * texture).clamp(0, 1))
    # The same seed draws the same crystals at any image size (a severity looks the same at 64 and 224 px).
    big = _frost_texture(torch.zeros(2, 1, 224, 224), torch.Generator().manual_seed(3))
    small = _frost_texture(torch.zeros(2, 1, 64, 64), torch.Generator().manual_seed(3))
    shrunk = torch.nn.functional.interpolate(big, size=(64, 64), mode="area")
    assert torch.corrcoef(torch.stack([small.flatten(), shrunk.flatten()]))[0, 1] > 0.95


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_corruptions_keep_shape_range_and_seed(slices):
    for name in CORRUPTIONS:
        out = corrupt(slices.cuda(), name, 3, seed=0)
        assert out.is_cuda and out.shape == slices.shape and 0 <= out.min() and out.max() <= 1
        assert torch.equal(out, corrupt(slices.cuda(), name, 3, seed=0)), f"{name} is not seeded on CUDA"
        # A deterministic corruption is the same on both devices up to float order (JPEG's rounding of quantised
        # coefficients can flip there, so it is left out); a random one draws from another generator.
        if name not in RANDOM and name != "jpeg":
            torch.testing.assert_close(out.cpu(), corrupt(slices, name, 3, seed=0), rtol=0, atol=2e-3, msg=name)
