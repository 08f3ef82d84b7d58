"""evaluation/saliency.py: saliency maps, attention ratios and the proxy-noise view: shapes, normalisation,
localisation on a model with a known answer, exact metrics on synthetic masks, and exact restoring."""

import pandas as pd
import pytest
import torch
from torch import nn

from robustmed_lite.evaluation import saliency as explain
from robustmed_lite.evaluation.saliency import (
    attention_noise_magnitudes,
    attention_ratios,
    attention_summary,
    for_display,
    mass_ratio,
    pointing_game,
    saliency,
    saliency_maps,
    saliency_under_noise,
    supported_methods,
)
from robustmed_lite.method.weight_perturbation import WeightPerturbation
from robustmed_lite.models import attention_weights, create_model

SIZE = 32


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {
        "small_cnn": create_model("small_cnn"),
        "tiny_visformer": create_model("tiny_visformer", img_size=2 * SIZE),
        "vit": create_model("vit_tiny", img_size=SIZE, patch_size=8, depth=2),
        "resnet18": create_model("resnet18"),
    }


@pytest.fixture(scope="module")
def images():
    return torch.rand(6, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def _size(name):
    return 2 * SIZE if name == "tiny_visformer" else SIZE  # Visformer needs 64 px for a 2x2 last stage


CASES = [
    (name, method)
    for name, methods in (
        ("small_cnn", ("gradcam", "input_grad")),
        ("resnet18", ("gradcam", "input_grad")),
        ("tiny_visformer", ("gradcam", "attention", "input_grad")),
        ("vit", explain.METHODS),
    )
    for method in methods
]


@pytest.mark.parametrize("name,method", CASES)
def test_maps_shape_nonnegative_normalised(models, images, name, method):
    model = models[name].train()
    x = torch.nn.functional.interpolate(images, size=_size(name)) if _size(name) != SIZE else images
    before = {k: v.clone() for k, v in model.state_dict().items()}
    maps = saliency(model, x, method, batch_size=4)  # two batches
    assert maps.shape == (len(x), 1, *x.shape[-2:]) and maps.dtype == torch.float32
    assert (maps >= 0).all() and torch.isfinite(maps).all()
    torch.testing.assert_close(maps.sum((1, 2, 3)), torch.ones(len(x)))
    assert model.training and all(m.training for m in model.modules()), "modes restored"
    assert all(p.grad is None for p in model.parameters()), "no parameter gradients"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()), "BatchNorm stats untouched"
    peak = for_display(maps).flatten(1).amax(1)
    torch.testing.assert_close(peak, torch.ones(len(x)))


def test_supported_methods_and_errors(models, images):
    assert supported_methods(models["small_cnn"]) == ("gradcam", "input_grad")
    assert supported_methods(models["tiny_visformer"]) == ("gradcam", "attention", "input_grad")
    assert supported_methods(models["vit"]) == explain.METHODS
    with pytest.raises(ValueError, match="vit_tiny, deit_tiny"):
        saliency(models["small_cnn"], images, "rollout")
    with pytest.raises(ValueError, match="attention"):
        saliency(models["small_cnn"], images, "attention")
    with pytest.raises(ValueError, match="stage2"):
        saliency(models["tiny_visformer"], images, "attention", layer="stage1")
    with pytest.raises(ValueError, match="unknown saliency method"):
        saliency(models["vit"], images, "lime")
    with pytest.raises(ValueError, match="no module"):
        saliency(models["small_cnn"], images, "gradcam", layer="nope")
    with pytest.raises(ValueError, match="block index"):
        saliency(models["vit"], images, "attention", layer="patch_embed")


def test_fused_attention_flags_restored(models, images):
    vit = models["vit"]
    flags = [b.attn.fused_attn for b in vit.backbone.blocks]
    saliency(vit, images, "rollout")
    assert [b.attn.fused_attn for b in vit.backbone.blocks] == flags
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in vit.modules()), "hooks removed"


def _qkv_outputs(model, attention_modules, x):
    """The qkv projections' outputs of the given attention modules in one forward pass."""
    outputs = []
    handles = [a.qkv.register_forward_hook(lambda m, i, o: outputs.append(o)) for a in attention_modules]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return outputs


def test_visformer_attention_is_the_column_mean_of_softmax_qk(models):
    model = models["tiny_visformer"].eval()
    x = torch.rand(3, 1, 2 * SIZE, 2 * SIZE, generator=torch.Generator().manual_seed(2))
    blocks = [b.attn for b in model.backbone.stage2]
    qkv_out = _qkv_outputs(model, blocks, x)
    expected = []
    for a, out in zip(blocks, qkv_out):  # timm's layout: (B, 3, heads, head_dim, H*W)
        b, _, hh, ww = out.shape
        q, k, _ = out.reshape(b, 3, a.num_heads, a.head_dim, hh * ww).permute(1, 0, 2, 4, 3)
        attn = (q @ k.transpose(-2, -1) * a.scale).softmax(-1)
        expected.append(attn.mean(1).mean(1).reshape(b, 1, hh, ww))
    raw = torch.stack(expected).mean(0)
    want = explain._normalise(raw, x.shape[-2:])
    torch.testing.assert_close(saliency(model, x, "attention", layer="stage2"), want, rtol=1e-4, atol=1e-7)


def test_rollout_of_one_block_is_its_class_attention():
    # One block: rollout = 0.5 A + 0.5 I, whose class-token row over the patches is 0.5 A[cls, patches].
    torch.manual_seed(0)
    vit = create_model("deit_tiny", img_size=SIZE, patch_size=8, depth=1)
    x = torch.rand(4, 1, SIZE, SIZE)
    torch.testing.assert_close(saliency(vit, x, "rollout"), saliency(vit, x, "attention"))


def test_rollout_of_two_blocks_by_hand():
    # Attention recomputed from each block's qkv output: R = (0.5 A_2 + 0.5 I)(0.5 A_1 + 0.5 I), class-token row.
    torch.manual_seed(0)
    vit = create_model("vit_tiny", img_size=SIZE, patch_size=8, depth=2).eval()
    x = torch.rand(3, 1, SIZE, SIZE)
    blocks = [b.attn for b in vit.backbone.blocks]
    qkv_out = _qkv_outputs(vit, blocks, x)
    steps = []
    for a, out in zip(blocks, qkv_out):
        b, n, _ = out.shape
        q, k, _ = out.reshape(b, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * a.scale).softmax(-1).mean(1)
        steps.append(0.5 * attn + 0.5 * torch.eye(n))
    rollout = steps[1] @ steps[0]
    grid = vit.backbone.patch_embed.grid_size
    raw = rollout[:, 0, vit.backbone.num_prefix_tokens :].reshape(b, 1, *grid)
    torch.testing.assert_close(saliency(vit, x, "rollout"), explain._normalise(raw, x.shape[-2:]), rtol=1e-4, atol=1e-7)


class RegionModel(nn.Module):
    """Logit 1 = +s, logit 0 = -s, s = mean of ReLU features of the image masked to a fixed square: the logits
    depend on the pixels of that square only."""

    def __init__(self, region: torch.Tensor):
        super().__init__()
        self.register_buffer("region", region.float())
        gen = torch.Generator().manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2))
        with torch.no_grad():
            self.features[0].weight.copy_(torch.rand(8, 1, 3, 3, generator=gen))  # positive: evidence for class 1

    def forward(self, x):
        s = self.features(x * self.region).mean((1, 2, 3))
        return torch.stack([-s, s], 1)


@pytest.mark.parametrize("method,layer", [("input_grad", None), ("gradcam", "features")])
def test_maps_find_the_region_the_logit_depends_on(method, layer):
    size = 64
    region = torch.zeros(size, size, dtype=torch.bool)
    region[20:36, 36:52] = True  # 16 x 16: 6 % of the image
    model = RegionModel(region)
    x = torch.rand(8, 1, size, size, generator=torch.Generator().manual_seed(3))
    maps = saliency(model, x, method, target=1, layer=layer)
    ratio = mass_ratio(maps, region.expand(8, 1, size, size))
    assert (ratio >= 0.8).all(), ratio


def test_mass_ratio_exact_on_synthetic_maps():
    maps = torch.zeros(3, 1, 4, 4)
    maps[0, 0, 0, 0], maps[0, 0, 3, 3] = 3.0, 1.0  # 3/4 of the mass at (0,0)
    maps[1] = 1.0  # uniform: the ratio is the mask's area
    maps[2, 0, 1, 1] = 2.0
    masks = torch.zeros(3, 1, 4, 4, dtype=torch.bool)
    masks[0, 0, 0, 0] = True
    masks[1, 0, :2] = True  # half the image
    ratio = mass_ratio(maps, masks)
    torch.testing.assert_close(ratio[:2], torch.tensor([0.75, 0.5]))
    assert torch.isnan(ratio[2]), "an empty mask gives NaN"
    assert ((ratio[:2] >= 0) & (ratio[:2] <= 1)).all()
    with pytest.raises(ValueError, match="non-negative"):
        mass_ratio(-maps, masks)
    with pytest.raises(ValueError, match="shape"):
        mass_ratio(maps, masks[:, :, :2])


def test_pointing_game_synthetic():
    maps = torch.zeros(4, 1, 9, 9)
    maps[0, 0, 2, 2] = 1  # inside
    maps[1, 0, 8, 8] = 1  # far outside
    maps[2, 0, 2, 5] = 1  # 2 px right of the mask: a hit with tolerance 2, not 1
    maps[3, 0, 0:2, 2] = 1  # a flat top of two pixels, one inside
    masks = torch.zeros(4, 1, 9, 9, dtype=torch.bool)
    masks[:, 0, 1:4, 1:4] = True
    torch.testing.assert_close(pointing_game(maps, masks), torch.tensor([1.0, 0.0, 0.0, 0.5]))
    torch.testing.assert_close(pointing_game(maps, masks, tolerance_px=1)[2], torch.tensor(0.0))
    torch.testing.assert_close(pointing_game(maps, masks, tolerance_px=2)[2], torch.tensor(1.0))
    assert torch.isnan(pointing_game(maps[:1], torch.zeros(1, 1, 9, 9, dtype=torch.bool))).all()


def test_attention_ratios_and_summary():
    lung = torch.zeros(4, 1, 8, 8, dtype=torch.bool)
    lung[:, 0, 2:6, 2:6] = True  # area 1/4
    lesion = torch.zeros_like(lung)
    lesion[:2, 0, 2:4, 2:4] = True  # slices 0, 1
    labels = torch.tensor([1, 0, 1, 0])  # slice 1 has a lesion mask but is not COVID: left out
    uniform = torch.full((4, 1, 8, 8), 1 / 64)
    peaked = torch.zeros(4, 1, 8, 8)
    peaked[:, 0, 3, 3] = 1
    ratios = attention_ratios({("a", "u"): uniform, ("b", "p"): peaked}, lung, lesion, labels)
    assert len(ratios) == 8 and set(ratios.columns) >= {"lung_ratio", "lesion_ratio", "pointing", "lung_area"}
    summary = attention_summary(ratios).set_index(["model", "method"])
    assert summary.loc[("a", "u"), "lung_ratio"] == pytest.approx(0.25)
    assert summary.loc[("a", "u"), "lung_area"] == pytest.approx(0.25)
    assert summary.loc[("b", "p"), "lung_ratio"] == pytest.approx(1.0)
    assert summary.loc[("a", "u"), "n_lesion"] == 1
    assert summary.loc[("a", "u"), "lesion_ratio"] == pytest.approx(4 / 64)
    assert summary.loc[("b", "p"), "pointing_hit_rate"] == pytest.approx(1.0)
    values = ratios[["lung_ratio", "lesion_ratio", "pointing"]].stack().dropna()
    assert ((values >= 0) & (values <= 1)).all()


def test_saliency_maps_skips_unsupported(models, images):
    maps = saliency_maps({"cnn": models["small_cnn"], "vit": models["vit"]}, images, ("gradcam", "rollout"))
    assert set(maps) == {("cnn", "gradcam"), ("vit", "gradcam"), ("vit", "rollout")}
    labelled = saliency_maps({"vit": models["vit"]}, images, {"block 0": dict(method="attention", layer=0)})
    assert labelled["vit", "block 0"].shape == images.shape


@pytest.mark.parametrize("name", ["tiny_visformer", "vit"])
def test_noise_magnitudes_add_up(models, name):
    model = models[name]
    gen = torch.Generator().manual_seed(4)
    noise = {n: torch.randn(w.shape, generator=gen) for n, w in attention_weights(model).items()}
    noise["backbone.head.weight"] = torch.ones(1)  # not an attention projection: left out
    heads = attention_noise_magnitudes(model, noise, gamma=0.1)
    layers = attention_noise_magnitudes(model, noise, gamma=0.1, by="layer").set_index("parameter")
    assert set(layers.index) == set(attention_weights(model))
    squared = heads.assign(n2=heads.noise_norm**2, w2=heads.weight_norm**2).groupby("parameter")[["n2", "w2"]].sum()
    for name_, row in layers.iterrows():
        assert squared.loc[name_, "n2"] == pytest.approx(row.noise_norm**2, rel=1e-5)
        assert squared.loc[name_, "w2"] == pytest.approx(row.weight_norm**2, rel=1e-5)
        assert row.noise_norm == pytest.approx(0.1 * noise[name_].norm().item(), rel=1e-5)
    attn = model.get_submodule(heads.block.iloc[0])
    qkv = heads[heads.parameter.str.endswith("qkv.weight")]
    assert set(qkv.part) == {"q", "k", "v"} and set(heads["head"]) == set(range(attn.num_heads))
    first = heads[(heads.parameter == qkv.parameter.iloc[0]) & (heads.part == "k") & (heads["head"] == 1)]
    hd, c = attn.head_dim, attn.num_heads * attn.head_dim  # head 1 of k owns rows C' + hd ... C' + 2 hd
    rows = noise[qkv.parameter.iloc[0]].reshape(3 * c, -1)[c + hd : c + 2 * hd]
    assert first.noise_norm.item() == pytest.approx(0.1 * rows.norm().item(), rel=1e-5)


def test_saliency_under_noise_restores_the_weights(models, images):
    model = models["tiny_visformer"].eval()
    x = torch.nn.functional.interpolate(images, size=2 * SIZE)
    y = torch.tensor([0, 1, 0, 1, 0, 1])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    wp = WeightPerturbation(model, "proxy_attention", gamma=0.5, beta=1.0)
    noise = wp.compute(x, x.flip(-1), y)
    clean, noisy = saliency_under_noise(model, x, wp, noise, layer="stage2")
    assert not torch.equal(clean, noisy), "a large noise changes the attention"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()), "weights bitwise restored"
    torch.testing.assert_close(saliency(model, x, "attention", layer="stage2"), clean, rtol=0, atol=0)
    with pytest.raises(ValueError, match="another model"):
        saliency_under_noise(models["vit"], images, wp, noise)


def test_figures(models, images):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from robustmed_lite.figures import plot_attention_ratios, plot_noise_magnitudes, plot_saliency_grid

    masks = torch.zeros_like(images, dtype=torch.bool)
    masks[:, :, 8:24, 8:24] = True
    maps = saliency_maps({"cnn": models["small_cnn"]}, images, ("gradcam", "input_grad"))
    plot_saliency_grid(images[:2], {m: v[:2] for (_, m), v in maps.items()}, masks[:2], masks[:2])
    plot_attention_ratios(attention_ratios(maps, masks, masks, torch.ones(6)))
    noise = {n: torch.randn(w.shape) for n, w in attention_weights(models["vit"]).items()}
    plot_noise_magnitudes(attention_noise_magnitudes(models["vit"], noise))
    plt.close("all")
    summary = attention_summary(attention_ratios(maps, masks))
    assert isinstance(summary, pd.DataFrame)
    assert list(summary.columns) == ["model", "method", "n", "lung_ratio", "lung_ratio_sd", "lung_area"]
    assert len(summary) == 2 and set(summary["method"]) == {"gradcam", "input_grad"}  # one row per model and map
    assert (summary["n"] == len(images)).all()
    assert summary[["lung_ratio", "lung_area"]].apply(lambda c: c.between(0, 1)).all().all()
    assert (summary["lung_ratio_sd"] >= 0).all()
    assert summary["lung_area"].tolist() == pytest.approx([0.25, 0.25])  # a 16 x 16 mask on 32 x 32 slices
    for method, v in (("gradcam", maps["cnn", "gradcam"]), ("input_grad", maps["cnn", "input_grad"])):
        by_hand = (v[:, 0, 8:24, 8:24].sum((1, 2)) / v.sum((1, 2, 3))).mean().item()  # the mass inside the mask
        row = summary[summary["method"] == method].iloc[0]
        assert row["lung_ratio"] == pytest.approx(by_hand, rel=1e-5)


def test_feature_grid_is_the_size_a_stage_map_has_before_upsampling(models):
    visformer = models["tiny_visformer"].train()
    x = torch.rand(2, 1, 64, 64)
    assert explain.feature_grid(visformer, "stage3", x) == (2, 2)  # 64 px / stride 32
    assert explain.feature_grid(visformer, "stage2", x) == (4, 4)
    at_224 = create_model("tiny_visformer", img_size=224)
    assert explain.feature_grid(at_224, "stage3", torch.rand(1, 1, 224, 224)) == (7, 7)  # the full profile's
    assert visformer.training  # the mode is restored
