"""Where a classifier looks: saliency maps, how much of them falls on the lungs and lesions, and the proxy
attention noise seen per layer and head.

Saliency methods (``saliency(model, x, method)``), all batched, returned as (N,1,H,W) maps at the input's size:

* ``"gradcam"`` (Selvaraju et al. 2017): ReLU(sum_c alpha_c A_c) on a layer's feature map A, with alpha_c the
  spatial mean of d logit / d A_c. Default layers: a CNN's last stage, Visformer's stage 3, and for ViT/DeiT
  the input of the last block's attention (``blocks[-1].norm1``: after the last block only the class token
  reaches the head, so the patch tokens' gradients there are zero).
* ``"attention"``: the softmax attention itself, class-agnostic. Visformer has no class token: the map is the
  attention each position *receives* (the column mean of the attention matrix over queries), averaged over
  heads and over the blocks of a stage. ViT/DeiT: the class token's attention to the patches in one block,
  averaged over heads.
* ``"rollout"`` (Abnar and Zuidema 2020), ViT/DeiT only: R = prod_l (0.5 A_l + 0.5 I), A_l the head-averaged
  attention of block l, rows renormalised; the class token's row over the patches.
* ``"input_grad"``: |d logit / d x|, summed over channels (Simonyan et al. 2014).

The attention matrices are read from timm's own attention modules: during the forward pass their fused kernel
(which never forms the matrix) is switched off and a hook on ``attn_drop`` (identity in eval mode) takes its
input, the softmax probabilities. Flags and hooks are restored afterwards, also on errors.

Conventions: the model runs in eval mode and every module's mode is restored; only input/activation gradients
are taken (no parameter ``.grad`` is touched); coarse maps are upsampled bilinearly; every map is clipped at 0 and
normalised to **sum 1** (a map with no positive mass, which Grad-CAM can give, becomes uniform: no localisation).
``for_display`` rescales maps to a maximum of 1 for plotting.

Metrics: ``mass_ratio`` (the share of a map's mass inside a mask) and ``pointing_game`` (is the map's maximum in
the mask); ``attention_ratios`` and ``attention_summary`` tabulate them per model and method, with the share a
uniform map would get (the mask's area) beside them as the chance level.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ..common import eval_mode, model_device
from ..models import attention_weights

METHODS = ("gradcam", "attention", "rollout", "input_grad")
_TIE_RTOL = 1e-6  # pixels within this relative distance of the maximum tie for it (flat tops of upsampled maps)


# ------------------------------------------------------------------------------------------- architectures
def _backbone(model: nn.Module) -> nn.Module:
    return getattr(model, "backbone", model)


def _family(model: nn.Module) -> str:
    from timm.models.visformer import Visformer
    from timm.models.vision_transformer import VisionTransformer

    backbone = _backbone(model)
    if isinstance(backbone, Visformer):
        return "visformer"
    if isinstance(backbone, VisionTransformer):
        return "vit"
    return "cnn"


def _prefix(model: nn.Module) -> str:
    return "backbone." if hasattr(model, "backbone") else ""


def _attention_modules(module: nn.Module) -> list[nn.Module]:
    """timm attention modules (a ``qkv`` projection and an ``attn_drop``) inside ``module``, in order."""
    return [m for m in module.modules() if hasattr(m, "qkv") and isinstance(getattr(m, "attn_drop", None), nn.Module)]


def supported_methods(model: nn.Module) -> tuple[str, ...]:
    """The saliency methods a model supports: Grad-CAM and input gradients always, attention maps for
    Visformer (stages with attention) and ViT/DeiT, rollout for ViT/DeiT."""
    family = _family(model)
    if family == "vit":
        return METHODS
    if family == "visformer" and _attention_modules(_backbone(model)):
        return ("gradcam", "attention", "input_grad")
    return ("gradcam", "input_grad")


def _get(model: nn.Module, name) -> nn.Module:
    """A submodule by name, relative to the model or to its backbone (``"stage2"`` = ``"backbone.stage2"``), or
    the module itself."""
    if isinstance(name, nn.Module):
        return name
    if not isinstance(name, str):
        raise ValueError(f"layer must be a module or its name, got {name!r}")
    for full in (name, _prefix(model) + name):
        try:
            return model.get_submodule(full)
        except AttributeError:
            continue
    names = [n for n, _ in model.named_modules() if n]
    raise ValueError(f"the model has no module {name!r}; modules include {names[:12]}...")


def feature_grid(model: nn.Module, layer, x: torch.Tensor) -> tuple[int, int]:
    """Height and width of ``layer``'s output for images like ``x``: the grid a Grad-CAM or attention map of that
    layer is computed on before it is upsampled to the image (a Visformer's stage 3 at 64 px: 2 x 2, which can
    only say which quadrant holds the mass).

    Args:
        model: The model.
        layer: A module or its name (``"stage3"``).
        x: One or more images (N, C, H, W) in [0, 1]; only their shape matters.
    """
    shapes = []
    handle = _get(model, layer).register_forward_hook(lambda module, inputs, out: shapes.append(out.shape[-2:]))
    try:
        with torch.no_grad(), eval_mode(model):
            model(x[:1].to(model_device(model)))
    finally:
        handle.remove()
    return tuple(shapes[0])


def _gradcam_layer(model: nn.Module, layer) -> nn.Module:
    if layer is not None:
        return _get(model, layer)
    backbone, family = _backbone(model), _family(model)
    if family == "visformer":
        return backbone.stage3
    if family == "vit":
        return backbone.blocks[-1].norm1
    if hasattr(backbone, "features"):  # SmallCNN
        return backbone.features
    info = getattr(backbone, "feature_info", None)
    if info:  # timm CNNs name their last stage here (resnet18: layer4)
        last = info[-1]["module"] if isinstance(info, list) else info.module_name()[-1]
        return backbone.get_submodule(last)
    raise ValueError(f"no default Grad-CAM layer for {type(backbone).__name__}: pass layer='<module name>'")


def _attention_blocks(model: nn.Module, layer) -> list[nn.Module]:
    """The attention modules whose maps ``"attention"`` averages: a Visformer stage, or one ViT block."""
    backbone, family = _backbone(model), _family(model)
    if family == "visformer":
        if layer is None:
            stages = [s for s in (backbone.stage1, backbone.stage2, backbone.stage3) if _attention_modules(s)]
            return _attention_modules(stages[-1])
        found = _attention_modules(_get(model, layer))
        if not found:
            raise ValueError(
                f"{layer!r} holds no attention: Visformer's attention is in its stages 2 and 3 "
                "(layer='stage2' or 'stage3')"
            )
        return found
    if layer is None:
        layer = len(backbone.blocks) - 1
    block = backbone.blocks[layer] if isinstance(layer, int) else _get(model, layer)
    found = _attention_modules(block)[:1]
    if not found:
        raise ValueError(f"{layer!r} holds no attention: pass a block index or a block's name ('blocks.0')")
    return found


def _require(model: nn.Module, method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown saliency method {method!r}: use one of {METHODS}")
    if method not in supported_methods(model):
        need = {
            "attention": "a transformer with attention (tiny_visformer, visformer_tiny, vit_tiny, deit_tiny)",
            "rollout": "a ViT/DeiT with a class token (vit_tiny, deit_tiny)",
        }[method]
        raise ValueError(
            f"{method!r} needs {need}; {type(_backbone(model)).__name__} supports {supported_methods(model)}"
        )


# ------------------------------------------------------------------------------------------ capture hooks
@contextmanager
def _captured_output(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collects the module's outputs during the forward passes inside the block."""
    outputs: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, out: outputs.append(out))
    try:
        yield outputs
    finally:
        handle.remove()


@contextmanager
def _captured_attention(modules: list[nn.Module]) -> Iterator[list[dict]]:
    """Collects, per attention module and forward pass, the softmax probabilities (B,heads,N,N) and the spatial
    grid of a 4-D (Visformer) input."""
    records: list[dict] = []
    handles, flags = [], [(m, getattr(m, "fused_attn", None)) for m in modules]

    def pre_hook(_module, args):
        grid = tuple(args[0].shape[-2:]) if args[0].dim() == 4 else None
        records.append({"grid": grid, "attn": None})

    def drop_hook(_module, args, _out):
        records[-1]["attn"] = args[0].detach()

    try:
        for m in modules:
            if getattr(m, "fused_attn", False):
                m.fused_attn = False  # the fused kernel never forms the attention matrix
            handles.append(m.register_forward_pre_hook(pre_hook))
            handles.append(m.attn_drop.register_forward_hook(drop_hook))
        yield records
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags:
            if flag is not None:
                m.fused_attn = flag


# ------------------------------------------------------------------------------------------- raw maps
def _targets(logits: torch.Tensor, target) -> torch.Tensor:
    if target is None:
        return logits.argmax(1)
    t = torch.as_tensor(target, device=logits.device).long()
    return t.expand(len(logits)) if t.dim() == 0 else t


def _token_grid(model: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """ViT tokens (B,N,C) -> the patch tokens as a feature map (B,C,h,w); feature maps pass through."""
    if t.dim() == 4:
        return t
    backbone = _backbone(model)
    h, w = backbone.patch_embed.grid_size
    return t[:, backbone.num_prefix_tokens :].transpose(1, 2).reshape(len(t), -1, h, w)


def _target_score(model, x, target) -> tuple[torch.Tensor, torch.Tensor]:
    """A leaf copy of x (so that the graph exists even with frozen weights) and the sum of the explained
    classes' logits; call under ``torch.enable_grad()``."""
    x = x.detach().requires_grad_(True)
    logits = model(x)
    return x, logits.float().gather(1, _targets(logits, target)[:, None]).sum()


def _gradcam(model, x, target, layer):
    module = _gradcam_layer(model, layer)
    with _captured_output(module) as outputs, torch.enable_grad():
        _, score = _target_score(model, x, target)
        if len(outputs) != 1:
            raise RuntimeError(f"the Grad-CAM layer ran {len(outputs)} times in one forward pass (expected once)")
        (grad,) = torch.autograd.grad(score, outputs[0])
    act, grad = _token_grid(model, outputs[0].detach()), _token_grid(model, grad)
    alpha = grad.float().mean((2, 3), keepdim=True)
    return (alpha * act.float()).sum(1, keepdim=True).clamp(min=0)


def _input_grad(model, x, target, layer):
    if layer is not None:
        raise ValueError("input_grad takes no layer")
    with torch.enable_grad():
        x, score = _target_score(model, x, target)
        (grad,) = torch.autograd.grad(score, x)
    return grad.float().abs().sum(1, keepdim=True)


def _attention(model, x, target, layer):
    modules = _attention_blocks(model, layer)
    with _captured_attention(modules) as records, torch.no_grad():
        model(x)
    if _family(model) == "visformer":
        # Column mean: the attention each position receives, averaged over queries, heads and blocks.
        maps = [r["attn"].float().mean(1).mean(1).reshape(len(x), 1, *r["grid"]) for r in records]
        return torch.stack(maps).mean(0)
    return _cls_row(model, records[-1]["attn"].float().mean(1))


def _rollout(model, x, target, layer):
    if layer is not None:
        raise ValueError("rollout runs over all blocks and takes no layer")
    with _captured_attention(_attention_modules(_backbone(model).blocks)) as records, torch.no_grad():
        model(x)
    rollout = None
    for r in records:
        a = r["attn"].float().mean(1)
        a = 0.5 * a + 0.5 * torch.eye(a.shape[-1], device=a.device)  # the residual path
        a = a / a.sum(-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    return _cls_row(model, rollout)


def _cls_row(model, attn: torch.Tensor) -> torch.Tensor:
    """The class token's row of a (B,N,N) attention, over the patch tokens, as (B,1,h,w)."""
    return _token_grid(model, attn[:, :1].transpose(1, 2))


_RAW = {"gradcam": _gradcam, "attention": _attention, "rollout": _rollout, "input_grad": _input_grad}


def _normalise(raw: torch.Tensor, size) -> torch.Tensor:
    if tuple(raw.shape[-2:]) != tuple(size):
        raw = F.interpolate(raw, size=size, mode="bilinear", align_corners=False)
    raw = raw.clamp(min=0)
    total = raw.sum((2, 3), keepdim=True)
    uniform = torch.full_like(raw, 1.0 / (raw.shape[-1] * raw.shape[-2]))
    return torch.where(total > 0, raw / total.clamp(min=torch.finfo(raw.dtype).tiny), uniform)


def saliency(
    model: nn.Module, x: torch.Tensor, method: str = "gradcam", target=None, layer=None, batch_size: int = 64
) -> torch.Tensor:
    """Saliency maps of a batch, at the input's size.

    Args:
        model: A classifier taking (N,C,H,W) images (e.g. ``create_model``'s ``NormalizedClassifier``).
        x: Images (N,C,H,W).
        method: 'gradcam', 'attention', 'rollout' or 'input_grad' (``supported_methods(model)`` lists what a
            model supports).
        target: Class explained by 'gradcam' and 'input_grad': None for the predicted class, an int for one
            class, or an (N,) tensor. 'attention' and 'rollout' are class-agnostic and ignore it.
        layer: 'gradcam': a module or its name (relative to the model or its backbone, e.g. 'stage2');
            'attention': a Visformer stage ('stage2', 'stage3') or a ViT block index; None for the defaults
            (module docstring).
        batch_size: Images per forward pass.

    Returns:
        (N,1,H,W) float32 maps on the CPU, non-negative, each summing to 1.
    """
    _require(model, method)
    if x.dim() != 4:
        raise ValueError(f"expected images (N,C,H,W), got shape {tuple(x.shape)}")
    per_image = target is not None and torch.as_tensor(target).dim() > 0
    if per_image:
        target = torch.as_tensor(target)
        if len(target) != len(x):
            raise ValueError(f"target has {len(target)} entries for {len(x)} images")
    device = model_device(model)
    out = []
    with eval_mode(model):
        for start in range(0, len(x), batch_size):
            xb = x[start : start + batch_size].to(device)
            tb = target[start : start + batch_size] if per_image else target
            raw = _RAW[method](model, xb, tb, layer)
            out.append(_normalise(raw.float(), x.shape[-2:]).cpu())
    return torch.cat(out)


def for_display(maps: torch.Tensor) -> torch.Tensor:
    """Maps rescaled to a maximum of 1 each (for plotting; the metrics use the sum-normalised maps)."""
    peak = maps.flatten(1).amax(1).view(-1, *[1] * (maps.dim() - 1))
    return maps / peak.clamp(min=torch.finfo(maps.dtype).tiny)


def saliency_maps(
    models: Mapping[str, nn.Module], images: torch.Tensor, methods=("gradcam", "attention"), batch_size: int = 64
) -> dict[tuple[str, str], torch.Tensor]:
    """Maps of several models and methods on the same images.

    Args:
        models: Name -> classifier.
        images: (N,C,H,W).
        methods: Method names, or a mapping label -> ``saliency`` keyword arguments, e.g.
            ``{"Grad-CAM stage 2": dict(method="gradcam", layer="stage2")}``.
        batch_size: Images per forward pass.

    Returns:
        ``{(model name, method label): maps}``, leaving out the methods a model does not support.
    """
    specs = methods if isinstance(methods, Mapping) else {m: {"method": m} for m in methods}
    maps = {}
    for name, model in models.items():
        for label, kwargs in specs.items():
            if kwargs["method"] in supported_methods(model):
                maps[name, label] = saliency(model, images, batch_size=batch_size, **kwargs)
    return maps


# ------------------------------------------------------------------------------------------------ metrics
def _check_pair(maps: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if maps.dim() != 4 or maps.shape[1] != 1:
        raise ValueError(f"maps must be (N,1,H,W), got {tuple(maps.shape)}")
    masks = masks.to(maps.device)
    if masks.dim() == 3:
        masks = masks.unsqueeze(1)
    if masks.shape != maps.shape:
        raise ValueError(f"masks {tuple(masks.shape)} and maps {tuple(maps.shape)} differ in shape")
    if (maps < 0).any():
        raise ValueError("saliency maps must be non-negative")
    return maps.float(), masks.bool()


def mass_ratio(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The share of each map's mass inside its mask, in [0, 1].

    Args:
        maps: Non-negative (N,1,H,W) maps (they need not be normalised).
        masks: Bool (N,1,H,W) or (N,H,W).

    Returns:
        (N,) ratios; NaN where the mask is empty (no region to look at) or the map has no mass.
    """
    maps, masks = _check_pair(maps, masks)
    inside = (maps * masks).flatten(1).sum(1)
    total = maps.flatten(1).sum(1)
    ratio = (inside / total.clamp(min=torch.finfo(maps.dtype).tiny)).clamp(0, 1)
    valid = masks.flatten(1).any(1) & (total > 0)
    return torch.where(valid, ratio, torch.full_like(ratio, float("nan")))


def _dilate(masks: torch.Tensor, radius: int) -> torch.Tensor:
    if radius <= 0:
        return masks
    r = torch.arange(-radius, radius + 1, device=masks.device, dtype=torch.float32)
    disk = ((r[:, None] ** 2 + r[None, :] ** 2) <= radius**2).float()[None, None]
    return F.conv2d(masks.float(), disk, padding=radius) > 0


def pointing_game(maps: torch.Tensor, masks: torch.Tensor, tolerance_px: int = 0) -> torch.Tensor:
    """Pointing game (Zhang et al. 2016): is each map's maximum inside its mask, dilated by a tolerance?

    Upsampled coarse maps have flat tops where several pixels tie for the maximum (within a relative 1e-6);
    the score is then the share of tied pixels inside, i.e. the expected hit of a random tie-break.

    Args:
        maps: Non-negative (N,1,H,W) maps.
        masks: Bool (N,1,H,W) or (N,H,W).
        tolerance_px: Euclidean distance (pixels) by which the mask is grown; 0 for none.

    Returns:
        (N,) hit scores in [0, 1] (0 or 1 without ties); NaN where the mask is empty.
    """
    maps, masks = _check_pair(maps, masks)
    peak = maps.flatten(1).amax(1).view(-1, 1, 1, 1)
    at_max = maps >= peak * (1 - _TIE_RTOL)
    hit = (at_max & _dilate(masks, tolerance_px)).flatten(1).sum(1) / at_max.flatten(1).sum(1)
    return torch.where(masks.flatten(1).any(1), hit.float(), torch.full_like(hit, float("nan"), dtype=torch.float))


def attention_ratios(
    maps: Mapping[tuple[str, str], torch.Tensor],
    lung_masks: torch.Tensor,
    lesion_masks: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    tolerance_px: int = 0,
) -> pd.DataFrame:
    """Per-image lung- and lesion-attention ratios of every (model, method)'s maps.

    The lung mask is the ground truth on the phantom; on real CT, ``prior.lung_mask(images)`` is an *estimate*
    (the dark region inside the body), so its ratios inherit that mask's errors.

    Args:
        maps: ``{(model, method): (N,1,H,W) maps}``, e.g. from ``saliency_maps``.
        lung_masks: Bool (N,1,H,W).
        lesion_masks: Optional bool (N,1,H,W) (the phantom's ground truth).
        labels: Optional (N,) labels; with them the lesion columns use COVID slices (label 1) only.
        tolerance_px: Tolerance of the pointing game on the lesions.

    Returns:
        Long table, one row per model, method and image: ``lung_ratio`` and ``lung_area`` (the mask's share of
        the image: what a uniform map scores), and with lesion masks ``lesion_ratio``, ``lesion_area`` and
        ``pointing`` (NaN on slices without lesions).
    """
    lung_area = lung_masks.flatten(1).float().mean(1).cpu()
    if lesion_masks is not None:
        lesion_area = lesion_masks.flatten(1).float().mean(1).cpu()
        with_lesions = lesion_masks.flatten(1).any(1).cpu()
        if labels is not None:
            with_lesions &= torch.as_tensor(labels).cpu() == 1
    nan = torch.tensor(float("nan"))
    frames = []
    for (model, method), m in maps.items():
        cols = {
            "model": model,
            "method": method,
            "image": range(len(m)),
            "lung_ratio": mass_ratio(m, lung_masks).cpu().numpy(),
            "lung_area": lung_area.numpy(),
        }
        if labels is not None:
            cols["label"] = torch.as_tensor(labels).cpu().numpy()
        if lesion_masks is not None:
            lesion = {
                "lesion_ratio": mass_ratio(m, lesion_masks).cpu(),
                "lesion_area": lesion_area,
                "pointing": pointing_game(m, lesion_masks, tolerance_px).cpu(),
            }
            cols.update({k: torch.where(with_lesions, v, nan).numpy() for k, v in lesion.items()})
        frames.append(pd.DataFrame(cols))
    return pd.concat(frames, ignore_index=True)


def attention_summary(ratios: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation of ``attention_ratios``' columns per model and method.

    Returns:
        One row per model and method: n (slices with a lung mask), lung ratio mean/sd, lung area (chance level),
        and where present n_lesion (slices with lesions), lesion ratio mean/sd, lesion area and the pointing-game
        hit rate.
    """
    groups = ratios.groupby(["model", "method"], sort=False)
    out = pd.DataFrame(
        {
            "n": groups["lung_ratio"].count(),
            "lung_ratio": groups["lung_ratio"].mean(),
            "lung_ratio_sd": groups["lung_ratio"].std(),
            "lung_area": groups["lung_area"].mean(),
        }
    )
    if "lesion_ratio" in ratios:
        out["n_lesion"] = groups["lesion_ratio"].count()
        out["lesion_ratio"] = groups["lesion_ratio"].mean()
        out["lesion_ratio_sd"] = groups["lesion_ratio"].std()
        out["lesion_area"] = groups["lesion_area"].mean()
        out["pointing_hit_rate"] = groups["pointing"].mean()
    return out.reset_index()


# -------------------------------------------------------------------------------------- proxy attention noise
_PARTS = {"qkv": ("q", "k", "v"), "q": ("q",), "k": ("k",), "v": ("v",)}


def attention_noise_magnitudes(
    model: nn.Module, noise: Mapping[str, torch.Tensor], gamma: float = 1.0, by: str = "head"
) -> pd.DataFrame:
    """Sizes of a weight noise on the attention projections, per layer or per head.

    Per-head convention (timm's layouts, Visformer and ViT alike): the qkv weight's output rows are ordered
    (q|k|v, head, head_dim), so head h of part q owns rows ``h*hd:(h+1)*hd``, of k rows ``C' + h*hd ...``, of v
    rows ``2C' + h*hd ...`` (C' = heads * hd); the output projection's input *columns* ``h*hd:(h+1)*hd`` read
    head h's output. These slices partition each weight, so the per-head squared norms add up to the layer's.

    Args:
        model: The model the noise belongs to.
        noise: Parameter name -> noise direction, e.g. ``WeightPerturbation.compute``'s d_l. Entries for
            parameters that are not attention projections are left out.
        gamma: Scale applied to the noise (the perturbation is ``gamma * d``); 1 reports ``noise`` as given.
        by: 'head' (one row per parameter, part and head) or 'layer' (one row per parameter).

    Returns:
        Table with ``parameter``, ``block`` (the attention module), ``part`` (q, k, v or proj), ``head`` (for
        'head'), ``noise_norm`` (||gamma * d|| over the slice), ``weight_norm`` (||w|| over the same slice) and
        ``relative`` (their ratio).
    """
    if by not in ("head", "layer"):
        raise ValueError(f"by must be 'head' or 'layer', got {by!r}")
    weights = attention_weights(model)
    rows = []
    for name, d in noise.items():
        if name not in weights:
            continue
        module_name, leaf = name.removesuffix(".weight").rsplit(".", 1)
        w = weights[name].detach()
        d = gamma * d.detach().to(w.device, torch.float32).reshape(w.shape[0], -1)
        w = w.float().reshape(w.shape[0], -1)
        if by == "layer":
            rows.append(
                {
                    "parameter": name,
                    "block": module_name,
                    "part": leaf,
                    "noise_norm": d.norm().item(),
                    "weight_norm": w.norm().item(),
                }
            )
            continue
        attn = model.get_submodule(module_name)
        heads, hd = attn.num_heads, attn.head_dim
        for h in range(heads):
            if leaf == "proj":
                slices = [("proj", (slice(None), slice(h * hd, (h + 1) * hd)))]
            else:
                slices = [
                    (p, (slice((i * heads + h) * hd, (i * heads + h + 1) * hd), slice(None)))
                    for i, p in enumerate(_PARTS[leaf])
                ]
            for part, index in slices:
                rows.append(
                    {
                        "parameter": name,
                        "block": module_name,
                        "part": part,
                        "head": h,
                        "noise_norm": d[index].norm().item(),
                        "weight_norm": w[index].norm().item(),
                    }
                )
    if not rows:
        raise ValueError("the noise holds no attention projection weights of this model")
    table = pd.DataFrame(rows)
    table["relative"] = table["noise_norm"] / table["weight_norm"]
    return table


def saliency_under_noise(
    model: nn.Module,
    x: torch.Tensor,
    perturbation,
    noise: Mapping[str, torch.Tensor],
    method: str = "attention",
    gamma: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Saliency maps at the model's weights and while a weight noise is injected.

    The noise goes in with ``weight_perturbation.applied(noise, gamma)`` (w += gamma * d) and is taken out after the
    second map, also on errors: no step is taken in between, so the weights come back bitwise.

    Args:
        model: The classifier; ``weight_perturbation.model`` must be it.
        x: Images (N,C,H,W).
        perturbation: A ``weight_perturbation.WeightPerturbation`` of the model.
        noise: Its noise directions, e.g. from ``weight_perturbation.compute(x, x_aug, y)``.
        method: Saliency method.
        gamma: Noise scale (default: the perturbation's own ``gamma``).
        **kwargs: Passed to ``saliency`` (target, layer, batch_size).

    Returns:
        ``(before, with_noise)`` maps.
    """
    if perturbation.model is not model:
        raise ValueError("the perturbation belongs to another model")
    before = saliency(model, x, method, **kwargs)
    with perturbation.applied(noise, gamma):
        with_noise = saliency(model, x, method, **kwargs)
    return before, with_noise
