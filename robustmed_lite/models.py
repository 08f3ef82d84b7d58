"""Classifiers over timm, with the input normalisation inside the model so that inputs stay in [0,1]."""

from __future__ import annotations

import difflib

import timm
import torch
from torch import nn

# Short names used across the book -> timm architecture names.
MODEL_NAMES = {
    "visformer_tiny": "visformer_tiny",
    "deit_tiny": "deit_tiny_patch16_224",
    "vit_tiny": "vit_tiny_patch16_224",
    "resnet18": "resnet18",
    "small_cnn": "small_cnn",
    "tiny_visformer": "tiny_visformer",
}
# ImageNet mean/std converted to one grey channel (timm sums the RGB filters of pretrained stems).
GRAY_MEAN, GRAY_STD = 0.449, 0.226


class SmallCNN(nn.Module):
    """A four-block CNN (about 0.1 M parameters) for tests and minute-long CPU demos."""

    def __init__(self, num_classes: int = 2, in_chans: int = 1, width: int = 16):
        super().__init__()
        layers, c = [], in_chans
        for i in range(4):
            out = width * 2**i
            layers += [nn.Conv2d(c, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            if i < 3:
                layers.append(nn.MaxPool2d(2))
            c = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def tiny_visformer(num_classes: int = 2, img_size: int = 64, in_chans: int = 1) -> nn.Module:
    """visformer_tiny's architecture, narrower and shallower (about 0.9 M parameters): convolutional stage 1,
    attention in stages 2 and 3, BatchNorm. Trains in minutes on a CPU, and has the attention weights that the
    proxy attention noise perturbs."""
    from timm.models.visformer import Visformer

    return Visformer(
        img_size=img_size,
        in_chans=in_chans,
        num_classes=num_classes,
        init_channels=16,
        embed_dim=96,
        depth=(1, 2, 2),
        num_heads=3,
        mlp_ratio=2.0,
        group=8,
        attn_stage="011",
        spatial_conv="100",
        norm_layer=nn.BatchNorm2d,
        conv_init=True,
        embed_norm=nn.BatchNorm2d,
    )


class NormalizedClassifier(nn.Module):
    """Wraps a backbone: inputs in [0,1] with one channel are normalised (and repeated to ``in_chans``) inside."""

    def __init__(self, backbone: nn.Module, in_chans: int = 1, mean: float = GRAY_MEAN, std: float = GRAY_STD):
        super().__init__()
        self.backbone = backbone
        self.in_chans = in_chans
        self.register_buffer("mean", torch.tensor(mean).view(1, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"expected images (N,C,H,W), got shape {tuple(x.shape)}")
        x = (x - self.mean) / self.std
        if x.shape[1] == 1 and self.in_chans != 1:
            x = x.expand(-1, self.in_chans, -1, -1)
        return self.backbone(x)


def create_model(
    name: str, num_classes: int = 2, img_size: int = 224, in_chans: int = 1, pretrained: bool = False, **kwargs
) -> NormalizedClassifier:
    """Builds a classifier that takes (N,1,S,S) images in [0,1].

    Args:
        name: A short name of ``MODEL_NAMES`` or any timm architecture.
        num_classes: Number of output logits.
        img_size: Input side length (used by the transformers' position embeddings).
        in_chans: Channels the backbone sees; grey inputs are repeated to match.
        pretrained: Load timm's ImageNet weights (needs internet or a filled Hugging Face cache).
        **kwargs: Passed to ``timm.create_model``.
    """
    arch = MODEL_NAMES.get(name, name)
    if arch == "small_cnn":
        return NormalizedClassifier(SmallCNN(num_classes, in_chans), in_chans)
    if arch == "tiny_visformer":
        return NormalizedClassifier(tiny_visformer(num_classes, img_size, in_chans), in_chans)
    if not timm.is_model(arch):
        close = difflib.get_close_matches(name, list(MODEL_NAMES) + timm.list_models(), n=3)
        raise ValueError(
            f"unknown model {name!r}: use one of {sorted(MODEL_NAMES)} or a timm architecture "
            f"(timm.list_models()); did you mean {close}?"
        )
    args = dict(num_classes=num_classes, in_chans=in_chans, pretrained=pretrained, **kwargs)
    try:
        try:
            backbone = timm.create_model(arch, img_size=img_size, **args)
        except TypeError:  # CNNs take no img_size
            backbone = timm.create_model(arch, **args)
    except (OSError, RuntimeError) as err:
        if not pretrained:
            raise
        raise RuntimeError(
            f"could not load pretrained weights for {arch!r} ({err}). This needs internet access "
            "(Colab has it) or the weights in the Hugging Face cache; otherwise use "
            "pretrained=False."
        ) from err
    return NormalizedClassifier(backbone, in_chans)


MAX_IMG_SIZE = 2048  # 16 MB a float32 slice: beyond, one batch of activations outgrows any single machine


def check_input_size(name: str, img_size: int) -> None:
    """Refuses an image size the model cannot take, before any data is loaded: builds the model and runs one
    blank image through it (on the CPU, without touching the global random state).

    Raises:
        ValueError: ``img_size`` above ``MAX_IMG_SIZE``, or one the architecture rejects (too small for its
            patches and downsampling); the message names the model and a size that works.
    """
    if img_size > MAX_IMG_SIZE:
        raise ValueError(
            f"img_size {img_size} needs {4 * img_size**2 / 2**30:.1f} GiB per slice in float32 alone. Fix: use "
            f"at most {MAX_IMG_SIZE} (224 is the papers' size, 64 the CPU profile's)"
        )
    with torch.random.fork_rng(devices=[]):
        try:
            model = create_model(name, num_classes=2, img_size=img_size).eval()
            with torch.no_grad():
                model(torch.zeros(1, 1, img_size, img_size))
        except (AssertionError, RuntimeError, ValueError) as err:
            if isinstance(err, ValueError) and "unknown model" in str(err):
                raise
            detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(
                f"model {name!r} cannot take {img_size} x {img_size} images ({detail}). Fix: use a larger "
                "--img_size, e.g. 32 or more (64 for the CPU profile, 224 for the papers' setting)"
            ) from None


def attention_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The attention projection weights (qkv and output projection) of a transformer, by parameter name.

    For Visformer these are the qkv and proj of stages 2 and 3; for ViT/DeiT those of every block. CNNs have
    none, and an empty dict is returned.
    """
    found = {}
    for module_name, module in model.named_modules():
        leaf = module_name.rsplit(".", 1)[-1]
        parent = module_name.rsplit(".", 1)[0] if "." in module_name else ""
        if (
            leaf in ("qkv", "q", "k", "v", "proj")
            and parent.endswith("attn")
            and isinstance(module, (nn.Linear, nn.Conv2d))
        ):
            found[f"{module_name}.weight"] = module.weight
    return found
