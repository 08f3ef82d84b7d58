"""The embedded default dataset: a procedural lung-CT slice phantom with ground-truth masks.

Each slice is built in Hounsfield-like units from parametric anatomy (body with fat and muscle, two lungs whose
medial border bends around the heart, mediastinum, aorta, trachea, spine, ribs, branching vessels and airways),
then "acquired" by a scanner site: reconstruction kernel, correlated noise, window/level, contrast and field of
view. COVID-like slices carry bilateral, mostly peripheral/subpleural ground-glass opacities, some with
consolidation. Negative slices include confounders (a solid nodule, a dense vascular tree, dependent density)
that also occur, less often, in positives, so no single global intensity cue separates the classes.

Everything is vectorised over a chunk of 64 slices and seeded per chunk, so slice ``i`` depends only on
``(seed, i)``: ``make_phantom_dataset(100)`` is the prefix of ``make_phantom_dataset(2000)``, and the same seed
at two sites gives the same patients seen by two scanners.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from ..ops import gaussian_blur

CHUNK = 64  # slices drawn together; fixed so that a slice depends only on (seed, index)

# Hounsfield-like values of the tissues.
HU_AIR, HU_LUNG, HU_FAT, HU_MUSCLE, HU_BLOOD = -1000.0, -860.0, -100.0, 40.0, 45.0
HU_BONE_CORTEX, HU_BONE_MARROW, HU_VESSEL, HU_NODULE = 900.0, 250.0, 40.0, 60.0


@dataclass(frozen=True)
class Site:
    """How one scanner/hospital acquires and displays a slice.

    Attributes:
        name: Short name.
        level: Window level (HU).
        width: Window width (HU).
        noise_hu: Standard deviation of the image noise (HU).
        noise_corr: Noise correlation length in pixels at 128 px (scaled with the image size).
        kernel: Reconstruction kernel: > 0 blurs with that Gaussian sigma (pixels at 128 px), < 0 sharpens
            with unsharp-mask amount ``-kernel``.
        gamma: Display contrast curve applied after windowing.
        fov: Radius of the reconstruction circle in image coordinates ([-1, 1]); outside is black.
        zoom: Range of the body's scale in the field of view.
    """

    name: str
    level: float
    width: float
    noise_hu: float
    noise_corr: float
    kernel: float
    gamma: float
    fov: float
    zoom: tuple[float, float]


SITES: dict[str, Site] = {
    # Reference hospital: standard lung window, soft kernel, moderate dose.
    "A": Site(
        "A", level=-600, width=1500, noise_hu=15, noise_corr=0.7, kernel=0.5, gamma=1.0, fov=1.45, zoom=(0.88, 1.0)
    ),
    # Low-dose protocol, sharp kernel, narrower window, tighter field of view, brighter display.
    "B": Site(
        "B", level=-450, width=1100, noise_hu=50, noise_corr=0.5, kernel=-0.8, gamma=0.75, fov=0.98, zoom=(1.02, 1.14)
    ),
    # Smooth kernel, wide window, small patient in a large field of view, darker display.
    "C": Site(
        "C", level=-500, width=1900, noise_hu=8, noise_corr=1.0, kernel=1.0, gamma=1.3, fov=1.45, zoom=(0.72, 0.84)
    ),
}


class PhantomSet(NamedTuple):
    """A phantom dataset: images (N,1,S,S) float32 in [0,1], labels (N,) int64 (1 = COVID),
    lung and lesion masks (N,1,S,S) bool."""

    images: torch.Tensor
    labels: torch.Tensor
    lung_masks: torch.Tensor
    lesion_masks: torch.Tensor


def make_phantom_dataset(n: int, size: int = 64, site: str | Site = "A", seed: int = 0) -> PhantomSet:
    """Generates ``n`` lung-CT phantom slices, half of them COVID-like.

    Args:
        n: Number of slices.
        size: Side length in pixels.
        site: A key of ``SITES`` or a ``Site``.
        seed: Seed of the anatomy; the same seed at another site shows the same patients.

    Returns:
        A ``PhantomSet`` (images, labels, lung_masks, lesion_masks).
    """
    if n < 0 or size < 16:
        raise ValueError(f"make_phantom_dataset needs n >= 0 and size >= 16, got n={n}, size={size}")
    if isinstance(site, str):
        if site not in SITES:
            raise ValueError(f"unknown site {site!r}: choose one of {sorted(SITES)} or pass a Site(...)")
        site = SITES[site]
    parts = [_render_chunk(c, size, site, seed) for c in range(math.ceil(n / CHUNK))]
    if not parts:
        empty = torch.zeros(0, 1, size, size)
        return PhantomSet(empty, torch.zeros(0, dtype=torch.long), empty.bool(), empty.bool())
    return PhantomSet(*(torch.cat(p, 0)[:n] for p in zip(*parts)))


def _generator(*key: int) -> torch.Generator:
    seed = int(np.random.SeedSequence([k & 0xFFFFFFFF for k in key]).generate_state(1)[0])
    return torch.Generator().manual_seed(seed)


def _site_code(site: Site) -> int:
    return zlib.crc32(site.name.encode())


class _Rand:
    """Draws per-slice parameters shaped (B,1,1) or (B,K) from one generator."""

    def __init__(self, gen: torch.Generator, batch: int):
        self.gen, self.batch = gen, batch

    def uniform(self, lo, hi, *shape) -> torch.Tensor:
        shape = shape or (1, 1)
        return lo + (hi - lo) * torch.rand(self.batch, *shape, generator=self.gen)

    def normal(self, *shape) -> torch.Tensor:
        return torch.randn(self.batch, *(shape or (1, 1)), generator=self.gen)

    def bernoulli(self, p, *shape) -> torch.Tensor:
        return (torch.rand(self.batch, *(shape or (1, 1)), generator=self.gen) < p).float()


def _polar_radius(c, s, a, b, amp, phase):
    """Boundary radius of an ellipse (semi-axes a, b) with harmonic wobble, at direction (cos, sin) = (c, s).

    ``amp`` and ``phase`` are (B,K) for harmonics 2..K+1; cos(k*theta) is built by complex multiplication
    so no trigonometric function runs per pixel.
    """
    radius = torch.rsqrt((c / a) ** 2 + (s / b) ** 2)
    wobble = torch.ones_like(radius)
    ck, sk = c * c - s * s, 2 * c * s  # cos 2theta, sin 2theta
    for k in range(amp.shape[1]):
        a_k = amp[:, k].view(-1, *([1] * (c.dim() - 1)))
        p_k = phase[:, k].view_as(a_k)
        wobble = wobble + a_k * (ck * torch.cos(p_k) - sk * torch.sin(p_k))
        ck, sk = ck * c - sk * s, sk * c + ck * s
    return radius * wobble


def _soft_shape(X, Y, cx, cy, a, b, amp, phase, edge, tilt=None):
    """Soft inside-mask in [0,1] of a wobbly ellipse; ``edge`` is the transition width (about a pixel)."""
    dx, dy = X - cx, Y - cy
    if tilt is not None:
        ct, st = torch.cos(tilt), torch.sin(tilt)
        dx, dy = dx * ct + dy * st, -dx * st + dy * ct
    r = torch.sqrt(dx * dx + dy * dy + 1e-12)
    boundary = _polar_radius(dx / r, dy / r, a, b, amp, phase)
    return torch.sigmoid((boundary - r) / edge)


def _disc(X, Y, cx, cy, rx, ry, edge):
    """Soft mask of an axis-aligned ellipse."""
    d = torch.sqrt(((X - cx) / rx) ** 2 + ((Y - cy) / ry) ** 2 + 1e-12)
    return torch.sigmoid((1 - d) * torch.minimum(rx, ry) / edge)


def _splat(points, weights, size, zoom):
    """Accumulates weighted points (B,P,2), in body coordinates, bilinearly into (B,1,S,S) images."""
    b = points.shape[0]
    pix = (points * zoom.view(b, 1, 1) + 1) * (size / 2) - 0.5
    x0, y0 = pix[..., 0].floor(), pix[..., 1].floor()
    fx, fy = pix[..., 0] - x0, pix[..., 1] - y0
    out = torch.zeros(b * size * size)
    base = (torch.arange(b) * size * size).view(b, 1)
    for ox, oy, w in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        xi, yi = x0 + ox, y0 + oy
        ok = (xi >= 0) & (xi < size) & (yi >= 0) & (yi < size)
        idx = (base + yi.clamp(0, size - 1).long() * size + xi.clamp(0, size - 1).long())[ok]
        out.index_add_(0, idx, (weights * w)[ok])
    return out.view(b, 1, size, size)


def _smooth_field(rand: _Rand, size: int, cells: int) -> torch.Tensor:
    """Low-frequency noise in about [0,1], (B,1,S,S): a cells x cells random grid, bicubically upsampled."""
    grid = torch.rand(rand.batch, 1, cells, cells, generator=rand.gen)
    return F.interpolate(grid, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)


def _vessel_tree(rand: _Rand, lungs, size, roots=4, generations=4):
    """Points and weights of branching vessel/airway trees growing laterally from each hilum.

    Returns points (B,P,2) in body coordinates and, per point, the line length it stands for in pixels times
    the branch's relative width (1 for the trunk, 0.75 per generation).
    """
    pts, wts = [], []
    seg_points = max(6, size // 16)
    for side, (cx, cy, ax, ay) in zip((-1.0, 1.0), lungs):
        lateral = 0.0 if side > 0 else math.pi
        spread = torch.linspace(-1.35, 1.35, roots).view(1, roots)
        angle = lateral + side * spread + 0.2 * rand.normal(roots)
        start_x = (cx - side * 0.4 * ax).view(-1, 1) + 0.03 * rand.normal(roots)
        start_y = cy.view(-1, 1) + 0.25 * ay.view(-1, 1) * spread / 1.35 + 0.03 * rand.normal(roots)
        length = 0.32 * ay.view(-1, 1) * rand.uniform(0.8, 1.2, roots)
        weight = torch.full_like(angle, 0.8)
        for _ in range(generations):
            t = torch.linspace(0, 1, seg_points).view(1, 1, -1)
            end_x = start_x + length * torch.cos(angle)
            end_y = start_y + length * torch.sin(angle)
            px = start_x.unsqueeze(-1) + t * (end_x - start_x).unsqueeze(-1)
            py = start_y.unsqueeze(-1) + t * (end_y - start_y).unsqueeze(-1)
            pts.append(torch.stack([px, py], -1).flatten(1, 2))
            spacing = (length * size / 2 / seg_points).unsqueeze(-1).expand_as(px)
            wts.append((weight.unsqueeze(-1) * spacing).flatten(1))
            n = angle.shape[1]
            branch = rand.uniform(0.3, 0.6, n) * torch.where(torch.rand(n, generator=rand.gen) < 0.5, 1.0, -1.0)
            angle = torch.cat([angle + branch, angle - branch * rand.uniform(0.6, 1.2, n)], 1)
            angle = angle + 0.12 * rand.normal(2 * n)
            start_x, start_y = torch.cat([end_x, end_x], 1), torch.cat([end_y, end_y], 1)
            length = torch.cat([length, length], 1) * rand.uniform(0.62, 0.8, 2 * n)
            weight = torch.cat([weight, weight], 1) * 0.75
    return torch.cat(pts, 1), torch.cat(wts, 1)


def _render_chunk(chunk: int, size: int, site: Site, seed: int):
    """Renders slices ``chunk*CHUNK ... chunk*CHUNK+CHUNK-1``: images, labels, lung and lesion masks."""
    rand = _Rand(_generator(seed, chunk, 0), CHUNK)
    scan = _Rand(_generator(seed, chunk, 1, _site_code(site)), CHUNK)
    B = CHUNK
    labels = torch.randperm(B, generator=rand.gen) % 2  # exactly balanced per chunk

    # Image grid; the body frame is the image frame divided by the site's zoom.
    zoom = scan.uniform(*site.zoom)
    lin = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    Yi, Xi = torch.meshgrid(lin, lin, indexing="ij")
    X, Y = Xi / zoom, Yi / zoom  # (B,S,S)
    edge = 1.0 / size / zoom  # about half a pixel in body units

    # Body: wobbly ellipse with a subcutaneous fat layer around the muscle.
    bx, by = rand.uniform(-0.03, 0.03), rand.uniform(-0.02, 0.06)
    ba, bb = rand.uniform(0.78, 0.93), rand.uniform(0.55, 0.7)
    body_amp, body_phase = rand.uniform(-0.03, 0.03, 3), rand.uniform(0, 2 * math.pi, 3)
    body = _soft_shape(X, Y, bx, by, ba, bb, body_amp, body_phase, edge)
    fat = rand.uniform(0.88, 0.95)
    muscle = _soft_shape(X, Y, bx, by, ba * fat, bb * fat, body_amp, body_phase, edge)
    chest = _soft_shape(X, Y, bx, by, ba * (fat - 0.06), bb * (fat - 0.09), body_amp, body_phase, edge)

    hu = torch.full((B, size, size), HU_AIR)
    tissue_texture = _smooth_field(rand, size, 12).squeeze(1)
    hu = torch.lerp(hu, HU_FAT + 30 * tissue_texture, body)
    hu = torch.lerp(hu, HU_MUSCLE + 20 * (tissue_texture - 0.5), muscle)

    # Mediastinum: heart (anterior, to the patient's left = image right), aorta, trachea, spine.
    heart_scale = rand.uniform(0.55, 1.1)
    hx, hy = bx + ba * rand.uniform(0.04, 0.14), by + bb * rand.uniform(-0.2, 0.0)
    hrx, hry = ba * 0.24 * heart_scale, bb * 0.36 * heart_scale
    heart = _disc(X, Y, hx, hy, hrx, hry, edge)
    heart_zone = _disc(X, Y, hx, hy, hrx * 1.25 + 0.04, hry * 1.2 + 0.04, edge)
    hu = torch.lerp(hu, HU_BLOOD + 10 * tissue_texture, heart)
    spine_r = bb * rand.uniform(0.14, 0.18)
    sx, sy = bx + 0.01 * rand.normal(), by + bb * 0.72
    spine = _disc(X, Y, sx, sy, spine_r, spine_r * 0.9, edge)
    marrow = _disc(X, Y, sx, sy, spine_r * 0.78, spine_r * 0.7, edge)
    canal = _disc(X, Y, sx, sy + spine_r * 1.25, spine_r * 0.45, spine_r * 0.4, edge)
    posterior = _disc(X, Y, sx, sy + spine_r * 1.3, spine_r * 1.1, spine_r * 0.75, edge)
    hu = torch.lerp(hu, torch.full_like(hu, HU_BONE_CORTEX * 0.7), posterior * muscle)
    hu = torch.lerp(hu, torch.full_like(hu, HU_BONE_CORTEX), spine)
    hu = torch.lerp(hu, HU_BONE_MARROW + 60 * tissue_texture, marrow)
    hu = torch.lerp(hu, torch.full_like(hu, 20.0), canal)
    aorta_r = bb * rand.uniform(0.08, 0.11)
    aorta = _disc(X, Y, sx + spine_r * 1.35, sy - spine_r * 0.9, aorta_r, aorta_r, edge)
    hu = torch.lerp(hu, torch.full_like(hu, HU_BLOOD + 5), aorta)
    spine_zone = _disc(X, Y, sx, sy + 0.3 * spine_r, spine_r * 1.9, spine_r * 2.2, edge)
    mediastinum = torch.maximum(heart_zone, torch.maximum(spine_zone, aorta))

    # Lungs: wobbly ellipses; the heart, aorta and spine carve their medial borders.
    lungs, lung_soft = [], torch.zeros_like(hu)
    for side in (-1.0, 1.0):
        cx = bx + side * ba * rand.uniform(0.4, 0.47)
        cy = by + bb * rand.uniform(-0.1, 0.02)
        ax, ay = ba * rand.uniform(0.36, 0.44), bb * rand.uniform(0.62, 0.78)
        amp, phase = rand.uniform(-0.06, 0.06, 4), rand.uniform(0, 2 * math.pi, 4)
        tilt = rand.uniform(-0.15, 0.15)
        lungs.append((cx, cy, ax, ay, amp, phase, tilt))
        lung_soft = torch.maximum(lung_soft, _soft_shape(X, Y, cx, cy, ax, ay, amp, phase, edge, tilt))
    lung_soft = lung_soft * chest * (1 - mediastinum)

    # Parenchyma: faint texture plus a gravity-dependent (posterior) density gradient in every slice.
    lung_texture = _smooth_field(rand, size, 16).squeeze(1)
    dependent = rand.uniform(0, 50) * ((Y - by) / bb + 0.2).clamp(0, 1.2)
    # Confounder: a dependent subpleural band (atelectasis-like), more often in negatives.
    band_p = torch.where(labels.view(B, 1, 1) == 0, 0.3, 0.12)
    band = (torch.rand(B, 1, 1, generator=rand.gen) < band_p).float() * rand.uniform(80, 200)
    dependent = dependent + band * torch.sigmoid(((Y - by) / bb - rand.uniform(0.35, 0.55)) / 0.04)
    parenchyma = HU_LUNG + 40 * (lung_texture - 0.5) + dependent
    hu = torch.lerp(hu, parenchyma, lung_soft)

    # Trachea near the carina: air with a soft-tissue wall, inside the mediastinum.
    tr_r = bb * rand.uniform(0.06, 0.08)
    tx, ty = bx + 0.02 * rand.normal(), by + bb * rand.uniform(0.15, 0.3)
    trachea_wall = _disc(X, Y, tx, ty, tr_r * 1.3, tr_r * 1.3, edge)
    trachea = _disc(X, Y, tx, ty, tr_r, tr_r, edge)
    hu = torch.lerp(hu, torch.full_like(hu, HU_MUSCLE), trachea_wall * (1 - lung_soft))
    hu = torch.lerp(hu, torch.full_like(hu, HU_AIR), trachea * (1 - lung_soft))

    # Ribs: bright ovals along the chest wall, avoiding the spine; a sternum at the front.
    n_ribs = 12
    rib_angle = torch.linspace(0, 2 * math.pi, n_ribs + 1)[:-1].view(1, -1) + 0.15 * rand.normal(n_ribs)
    rib_keep = ((torch.sin(rib_angle) < 0.85) | (torch.cos(rib_angle).abs() > 0.5)).float()
    rib_r = (fat.view(-1, 1) - 0.035) * torch.rsqrt(
        (torch.cos(rib_angle) / ba.view(-1, 1)) ** 2 + (torch.sin(rib_angle) / bb.view(-1, 1)) ** 2
    )
    ribs_xy = torch.stack(
        [bx.view(-1, 1) + rib_r * torch.cos(rib_angle), by.view(-1, 1) + rib_r * torch.sin(rib_angle)], -1
    )
    sternum = torch.stack([bx.view(-1, 1), by.view(-1, 1) - bb.view(-1, 1) * (fat.view(-1, 1) - 0.04)], -1)
    rib_sigma = 0.022 * size / 2
    bone = _splat(
        torch.cat([ribs_xy, sternum], 1),
        torch.cat([rib_keep, torch.ones(B, 1)], 1) * (2 * math.pi * rib_sigma**2),
        size,
        zoom,
    )
    bone = (gaussian_blur(bone, rib_sigma) * 1.6).clamp(0, 1).squeeze(1)
    hu = torch.lerp(hu, torch.full_like(hu, 600.0), bone * muscle * (1 - lung_soft))

    # Vessels and airway walls: branching trees from each hilum plus vessels cut across (dots).
    many_vessels = torch.rand(B, generator=rand.gen) < torch.where(labels == 0, 0.3, 0.15)
    vessel_gain = torch.where(many_vessels, 1.0, 0.6).view(B, 1) * rand.uniform(0.7, 1.0, 1)
    tree_pts, tree_w = _vessel_tree(rand, [(cx, cy, ax, ay) for cx, cy, ax, ay, *_ in lungs], size)
    # Partial volume: a line's splatted mass is its physical width in pixels, a dot's its area, so vessels
    # thinner than a pixel come out dimmer at low resolution instead of thicker. vsigma is the scanner PSF.
    vsigma = 0.5
    px_per_unit = size / 2
    tree_w = tree_w * vessel_gain * (0.02 * px_per_unit)
    n_dots = 90
    dot_lung = torch.randint(0, 2, (B, n_dots), generator=rand.gen)
    lung_c = torch.stack([torch.stack([lung[0].view(B), lung[1].view(B)], -1) for lung in lungs], 1)  # (B,2,2)
    lung_r = torch.stack([torch.stack([lung[2].view(B), lung[3].view(B)], -1) for lung in lungs], 1)
    centre = torch.gather(lung_c, 1, dot_lung.unsqueeze(-1).expand(-1, -1, 2))
    radius = torch.gather(lung_r, 1, dot_lung.unsqueeze(-1).expand(-1, -1, 2))
    dots = centre + radius * (2 * torch.rand(B, n_dots, 2, generator=rand.gen) - 1) * 0.9
    dots_active = torch.arange(n_dots).view(1, -1) < torch.where(many_vessels, n_dots, 45).view(B, 1)
    dot_w = dots_active * math.pi * (rand.uniform(0.005, 0.013, n_dots) * px_per_unit) ** 2
    vessels = _splat(torch.cat([tree_pts, dots], 1), torch.cat([tree_w, dot_w], 1), size, zoom)
    vessels = gaussian_blur(vessels, vsigma).clamp(0, 1).squeeze(1)
    lung_core = lung_soft * torch.sigmoid((gaussian_blur(lung_soft.unsqueeze(1), 1.0).squeeze(1) - 0.6) * 12)
    hu = hu + (HU_VESSEL - parenchyma) * vessels * lung_core

    # COVID lesions: bilateral, mostly peripheral ground glass, some consolidation; rendered at low resolution.
    lesion_hu = _lesions(rand, labels, lungs, X, Y, size, zoom)
    # Confounder: one solid nodule, in 30 % of negatives and 15 % of positives.
    has_nodule = torch.rand(B, 1, 1, generator=rand.gen) < torch.where(labels == 0, 0.3, 0.15).view(B, 1, 1)
    left = rand.bernoulli(0.5) > 0
    (lx, ly, lax, lay, *_), (rx, ry, rax, ray, *_) = lungs
    nod_x = torch.where(left, lx, rx) + torch.where(left, lax, rax) * rand.uniform(-0.5, 0.5)
    nod_y = torch.where(left, ly, ry) + torch.where(left, lay, ray) * rand.uniform(-0.5, 0.5)
    nod_r = rand.uniform(0.018, 0.04)
    nodule = _disc(X, Y, nod_x, nod_y, nod_r, nod_r, edge) * has_nodule
    hu = hu + (lesion_hu + (HU_NODULE - parenchyma) * nodule) * lung_soft

    lung_mask = lung_soft > 0.5
    lesion_mask = (lesion_hu * lung_soft > 100) & lung_mask

    image = _acquire(hu.unsqueeze(1), site, scan, Xi, Yi, size, ba)
    return image, labels.long(), lung_mask.unsqueeze(1), lesion_mask.unsqueeze(1)


def _lesions(rand: _Rand, labels, lungs, X, Y, size, zoom, patches: int = 8):
    """HU increase of COVID-like opacities, (B,S,S): zero for negatives.

    Patches sit near the pleura (radius 0.6-1.0 of the lung boundary, mostly lateral/posterior), elongated
    along it, with a hazy texture; about a third carry a dense consolidated core.
    """
    B = labels.shape[0]
    low = max(16, size // 4)
    lin = (torch.arange(low, dtype=torch.float32) + 0.5) / low * 2 - 1
    Yl, Xl = torch.meshgrid(lin, lin, indexing="ij")
    Xl, Yl = (Xl / zoom).unsqueeze(1), (Yl / zoom).unsqueeze(1)  # (B,1,l,l)

    n_active = torch.randint(2, patches + 1, (B, 1), generator=rand.gen)
    active = (torch.arange(patches).view(1, -1) < n_active) & (labels.view(B, 1) == 1)
    # Bilateral: the first two patches go one to each lung, the rest at random.
    side = torch.cat(
        [torch.tensor([[0, 1]]).expand(B, 2), torch.randint(0, 2, (B, patches - 2), generator=rand.gen)], 1
    )
    field = torch.zeros(B, low, low)
    for idx, (cx, cy, ax, ay, amp, phase, tilt) in enumerate(lungs):
        lateral = 0.0 if idx == 1 else math.pi  # idx 0 is the image-left lung
        # Angles biased to the lateral and posterior pleura (posterior = +y).
        theta = (
            lateral
            + (math.pi / 2 if idx == 0 else -math.pi / 2) * rand.uniform(-0.4, 1.0, patches)
            + 0.5 * rand.normal(patches)
        )
        c, s = torch.cos(theta), torch.sin(theta)
        boundary = _polar_radius(c, s, ax.view(B, 1), ay.view(B, 1), amp, phase)
        rho = rand.uniform(0.6, 1.0, patches) * boundary
        ct, st = torch.cos(tilt.view(B, 1)), torch.sin(tilt.view(B, 1))
        px = cx.view(B, 1) + rho * (c * ct - s * st)
        py = cy.view(B, 1) + rho * (c * st + s * ct)
        sig_r = rand.uniform(0.03, 0.09, patches)
        sig_t = sig_r * rand.uniform(1.0, 2.2, patches)
        amp_ggo = rand.uniform(220, 480, patches)
        consolidated = rand.bernoulli(0.35, patches) * rand.uniform(350, 650, patches)
        mine = (active & (side == idx)).float()
        for k in range(patches):
            dx, dy = Xl - px[:, k, None, None, None], Yl - py[:, k, None, None, None]
            # Coordinates along (t) and across (r) the pleura at the patch.
            ck, sk = c[:, k, None, None, None], s[:, k, None, None, None]
            along_r, along_t = dx * ck + dy * sk, -dx * sk + dy * ck
            g = torch.exp(
                -0.5 * ((along_r / sig_r[:, k, None, None, None]) ** 2 + (along_t / sig_t[:, k, None, None, None]) ** 2)
            ).squeeze(1)
            w = mine[:, k, None, None]
            core = torch.sigmoid((g - 0.6) / 0.06)
            field = field + w * (amp_ggo[:, k, None, None] * g + consolidated[:, k, None, None] * core)
    haze = 0.55 + 0.45 * _smooth_field(rand, low, 10).squeeze(1)
    field = (field * haze).clamp(max=900).unsqueeze(1)
    return F.interpolate(field, size=(size, size), mode="bicubic", align_corners=False).clamp(min=0).squeeze(1)


def _acquire(hu, site: Site, scan: _Rand, Xi, Yi, size, body_a):
    """Scanner and display: kernel, correlated noise, window/level, contrast and field of view -> [0,1]."""
    scale = size / 128
    if site.kernel > 0:
        hu = gaussian_blur(hu, site.kernel * scale)
    elif site.kernel < 0:
        hu = hu + (-site.kernel) * (hu - gaussian_blur(hu, 1.0 * scale))
    noise = torch.randn(hu.shape, generator=scan.gen)
    if site.noise_corr > 0:
        sigma = site.noise_corr * scale
        noise = gaussian_blur(noise, sigma)
        noise = noise / noise.std(dim=(2, 3), keepdim=True)
    # Larger patients are noisier at the same dose.
    level_jitter = scan.normal().view(-1, 1, 1, 1)
    noise_hu = site.noise_hu * (0.8 + 0.4 * scan.uniform(0, 1).view(-1, 1, 1, 1)) * (body_a.view(-1, 1, 1, 1) / 0.85)
    hu = hu + noise_hu * noise
    level = site.level + 20 * level_jitter
    width = site.width * scan.uniform(0.95, 1.05).view(-1, 1, 1, 1)
    x = ((hu - (level - width / 2)) / width).clamp(0, 1)
    if site.gamma != 1.0:
        x = x.pow(site.gamma)
    outside = (Xi**2 + Yi**2) > site.fov**2
    return x.masked_fill(outside, 0.0).contiguous()
