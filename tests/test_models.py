"""Model factory: every supported architecture takes grey [0,1] inputs; attention weights are found."""

import pytest
import torch

from robustmed_lite.models import GRAY_MEAN, GRAY_STD, attention_weights, create_model


@pytest.mark.parametrize(
    "name,n_attn", [("visformer_tiny", 16), ("deit_tiny", 24), ("vit_tiny", 24), ("resnet18", 0), ("small_cnn", 0)]
)
def test_models_take_gray_inputs(name, n_attn):
    model = create_model(name, num_classes=2, img_size=64).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 1, 64, 64))
    assert out.shape == (2, 2) and torch.isfinite(out).all()
    found = attention_weights(model)
    assert len(found) == n_attn
    assert all(".attn." in k and k.endswith("weight") for k in found)


def test_visformer_attention_is_stages_2_and_3():
    names = attention_weights(create_model("visformer_tiny", img_size=64))
    assert {k.split(".")[1] for k in names} == {"stage2", "stage3"}
    assert {k.split(".")[-2] for k in names} == {"qkv", "proj"}


def test_normalisation_lives_inside_the_model():
    model = create_model("small_cnn").eval()
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        expected = model.backbone((x - GRAY_MEAN) / GRAY_STD)
        assert torch.allclose(model(x), expected)


def test_three_channel_backbone_gets_repeated_gray():
    model = create_model("resnet18", in_chans=3).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 1, 64, 64)).shape == (1, 2)


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown model 'visformer_tinyy'.*visformer_tiny"):
        create_model("visformer_tinyy")


def test_wrong_input_shape_is_a_clear_error():
    with pytest.raises(ValueError, match=r"expected images \(N,C,H,W\)"):
        create_model("small_cnn")(torch.rand(1, 32, 32))
