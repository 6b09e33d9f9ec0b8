"""Lesion insertion into a radiograph, deterministic by seed, each with its ground-truth box.

Tissue is added with a transmission model, ``u' = 1 - (1 - u) exp(-a)``: ``a`` is the extra
attenuation (thickness x density, arbitrary units) so a lesion brightens dark lung more than it
brightens bone, and saturates instead of clipping. Sizes are in mm, converted with the
background's pixel spacing. Every renderer draws in a local window and returns a
:class:`Lesion` with its box in the image's pixels (``x0, y0, x1, y1``, pixel edges).

Findings rendered (keys of :mod:`cxrkit.labels`): nodule (6-30 mm, soft-tissue sphere: attenuation linear in diameter, see
:func:`render_nodule`), mass (30-70 mm,
lobulated), calcification (3-8 mm, dense, sharp), cavity (thick-walled hollow sphere with air),
consolidation (dense irregular textured patch with air bronchograms), opacity (faint ground-glass
patch), pleural_effusion (dependent fluid with a meniscus rising to the lateral costophrenic
angle), pneumothorax (visceral pleural line, lung markings removed and lucency beyond it),
cardiomegaly (heart shadow widened to a cardiothoracic ratio of 0.55-0.7).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ._ops import Patch, blend_attenuation, blend_toward, box_of, gaussian_blur, smooth_noise
from .backgrounds import Background

__all__ = ["Lesion", "RENDERERS", "SYNTH_LABELS", "insert_lesion", "synthesize"]


@dataclass(frozen=True)
class Lesion:
    label: str
    box_xyxy: tuple[float, float, float, float]
    center_xy: tuple[float, float]
    size_mm: float
    renderer: str = ""  # which renderer drew it (the nodule renderers of cxrkit.synth.nodules)

    def to_dict(self) -> dict:
        return {"label": self.label, "box_xyxy": [round(v, 2) for v in self.box_xyxy],
                "center_xy": [round(v, 2) for v in self.center_xy], "size_mm": round(self.size_mm, 2),
                **({"renderer": self.renderer} if self.renderer else {})}


Renderer = Callable[[np.ndarray, np.ndarray, float, np.random.Generator], "Lesion | None"]
RENDERERS: dict[str, Renderer] = {}


def _renderer(label: str):
    def deco(fn):
        RENDERERS[label] = fn
        return fn
    return deco


# --- geometry helpers -----------------------------------------------------------------------

def _lung_rho(lung: np.ndarray, x, y, p: float = 3.0):
    """Superellipse radius of (x, y) in a lung box: < 1 inside the lung field's rounded box."""
    x0, y0, x1, y1 = lung
    return (np.abs((x - (x0 + x1) / 2) / ((x1 - x0) / 2)) ** p
            + np.abs((y - (y0 + y1) / 2) / ((y1 - y0) / 2)) ** p) ** (1.0 / p)


def _point_in_lung(lung: np.ndarray, rng: np.random.Generator, rho_max: float = 0.8) -> tuple[float, float]:
    x0, y0, x1, y1 = (float(v) for v in lung)
    for _ in range(100):
        x, y = x0 + (x1 - x0) * rng.random(), y0 + (y1 - y0) * rng.random()
        if _lung_rho(lung, x, y) < rho_max:
            return x, y
    return (x0 + x1) / 2, (y0 + y1) / 2


def _lateral_sign(lungs: np.ndarray, i: int) -> int:
    """-1 when lung ``i``'s lateral wall is toward smaller x (the image-left lung), else +1."""
    return -1 if i == 0 else 1


def _chord(r: np.ndarray, radius) -> np.ndarray:
    """Normalised chord length through a sphere of ``radius`` at distance ``r`` from its axis."""
    return np.sqrt(np.clip(1.0 - (r / radius) ** 2, 0.0, 1.0))


def _lobulated_radius(theta: np.ndarray, radius: float, rng: np.random.Generator, amount: float) -> np.ndarray:
    rr = np.ones_like(theta)
    for k in (2, 3, 5):
        rr = rr + amount * rng.random() * np.cos(k * theta + 2 * np.pi * rng.random())
    return radius * rr


def soft_tissue_level(img: np.ndarray, lungs: np.ndarray) -> float:
    """Unit intensity of soft tissue (water density) in this image: the mediastinum/heart between
    the lungs' lower halves, or the dense end of the lung boxes' union when they touch."""
    h, w = img.shape
    xa, xb = int(max(0, lungs[0, 2])), int(min(w, lungs[1, 0]))
    ya, yb = int(np.mean(lungs[:, 1] + lungs[:, 3]) / 2), int(min(h, np.max(lungs[:, 3])))
    if xb - xa >= 4 and yb - ya >= 4:
        return float(np.percentile(img[ya:yb, xa:xb], 60))
    x0, y0 = int(max(0, lungs[:, 0].min())), int(max(0, lungs[:, 1].min()))
    x1, y1 = int(min(w, lungs[:, 2].max())), int(min(h, lungs[:, 3].max()))
    return float(np.percentile(img[y0:y1, x0:x1], 85))


# --- focal lesions --------------------------------------------------------------------------

def _sphere_lesion(img, lungs, spacing, rng, label, d_mm, peak, lobes, edge, cavity_wall_mm=None):
    i = int(rng.integers(0, 2))
    cx, cy = _point_in_lung(lungs[i], rng)
    r = 0.5 * d_mm / spacing  # px
    patch = Patch(img.shape, cx, cy, 1.5 * r + 3, 1.5 * r + 3)
    dx, dy = patch.xx - cx, patch.yy - cy
    rad = np.hypot(dx, dy)  # (h, w)
    rtheta = _lobulated_radius(np.arctan2(dy, dx), r, rng, lobes)
    a = peak * _chord(rad, rtheta)
    if cavity_wall_mm is not None:
        ri = np.maximum(rtheta - cavity_wall_mm / spacing, 0.5)
        inner = _chord(rad, ri) * (ri / rtheta)
        a = peak * (_chord(rad, rtheta) - inner) - 0.35 * peak * inner  # shell minus the air it holds
    a = gaussian_blur(a, max(0.4, edge * r))
    box = box_of(patch, np.maximum(a, 0) if cavity_wall_mm is None else a)
    if box is None:
        return None
    blend_attenuation(img, patch, a)
    return Lesion(label, box, (cx, cy), d_mm)


@_renderer("nodule")
def render_nodule(img, lungs, spacing, rng):
    """Solid nodule, 6-30 mm: a soft-tissue sphere, so the central chord attenuation grows LINEARLY
    with the diameter, ``a_peak = k d`` with k ~ U(0.03, 0.05) per mm (capped at 1.2), falling off
    as the sphere's chord ``sqrt(1 - (r/R)^2)`` and blurred at the edge by 5-20 % of the radius.

    Contrast measured at 256x256 model input (val backgrounds, nodule centre minus the same image
    without it, vs the intensity std of a ring around it): 10 mm, k = 0.03..0.05: +0.11..0.17 unit
    intensity (28-43 of 255 gray levels), median 2.2-3.4x the ring std: visible by eye, as real
    solid nodules >= 10 mm usually are; 5 mm: +0.05..0.09 (subtle); 20 mm: +0.20..0.28. The previous
    profile ``U(0.2, 0.45) sqrt(d / 20)`` gave 10 mm nodules +0.06..0.12 (median 1.1-2.3x the ring
    std): its faint half was invisible by eye at 256x256, i.e. unrealistically faint labels. At
    384x384 the contrast ratio of >= 10 mm nodules is the same as at 256x256 (a 10 mm nodule is
    7.4 px at 256x256), so input resolution was not the limit.
    """
    d = float(rng.uniform(6, 30))
    return _sphere_lesion(img, lungs, spacing, rng, "nodule", d, min(1.2, float(rng.uniform(0.03, 0.05)) * d),
                          lobes=0.05, edge=float(rng.uniform(0.05, 0.2)))


@_renderer("mass")
def render_mass(img, lungs, spacing, rng):
    d = float(rng.uniform(30, 70))
    return _sphere_lesion(img, lungs, spacing, rng, "mass", d, float(rng.uniform(0.3, 0.65)),
                          lobes=float(rng.uniform(0.04, 0.12)), edge=float(rng.uniform(0.05, 0.15)))


@_renderer("calcification")
def render_calcification(img, lungs, spacing, rng):
    d = float(rng.uniform(3, 8))
    return _sphere_lesion(img, lungs, spacing, rng, "calcification", d, float(rng.uniform(0.7, 1.3)),
                          lobes=0.02, edge=0.04)


@_renderer("cavity")
def render_cavity(img, lungs, spacing, rng):
    d = float(rng.uniform(20, 50))
    return _sphere_lesion(img, lungs, spacing, rng, "cavity", d, float(rng.uniform(0.5, 0.9)),
                          lobes=0.06, edge=0.04, cavity_wall_mm=float(rng.uniform(2.5, 0.2 * d)))


# --- regional lesions -----------------------------------------------------------------------

def _patchy(img, lungs, spacing, rng, label, size_mm, peak, softness, bronchograms, fill=False):
    i = int(rng.integers(0, 2))
    lung = lungs[i]
    cx, cy = _point_in_lung(lung, rng, 0.65)
    rx = 0.5 * size_mm / spacing * float(rng.uniform(0.7, 1.2))
    ry = 0.5 * size_mm / spacing * float(rng.uniform(0.7, 1.2))
    patch = Patch(img.shape, cx, cy, 1.3 * rx + 2, 1.3 * ry + 2)
    rho2 = ((patch.xx - cx) / rx) ** 2 + ((patch.yy - cy) / ry) ** 2  # (h, w)
    field = 0.7 * smooth_noise(rng, patch.shape, max(2.0, 0.3 * min(rx, ry))) + 1.6 * (1.0 - rho2)
    mask = 1.0 / (1.0 + np.exp(np.clip(-(field - 0.5) / softness, -50, 50)))
    mask *= np.clip((1.05 - _lung_rho(lung, patch.xx, patch.yy)) / 0.1, 0.0, 1.0)  # stay in the lung
    tex = 1.0 + 0.15 * smooth_noise(rng, patch.shape, max(1.0, 2.0 / spacing))
    a = peak * mask * tex
    if bronchograms:
        air = np.zeros(patch.shape, np.float32)
        h, w = patch.shape
        for _ in range(int(rng.integers(2, 5))):
            y, x = h / 2 + rng.normal() * h / 6, w / 2 + rng.normal() * w / 6
            ang = 2 * np.pi * rng.random()
            for _step in range(int(1.2 * max(h, w))):
                ang += 0.08 * rng.standard_normal()
                y, x = y + np.sin(ang), x + np.cos(ang)
                if 0 <= int(y) < h and 0 <= int(x) < w:
                    air[int(y), int(x)] = 1.0
        air = np.clip(gaussian_blur(air, max(0.6, 1.0 / spacing)) * 3.0, 0, 1)
        a = a * (1.0 - 0.5 * air)
    a = gaussian_blur(a.astype(np.float32), 0.6)
    box = box_of(patch, a, 0.25)
    if box is None:
        return None
    if fill:  # airspace filled with fluid: toward soft-tissue density, capped there
        blend_toward(img, patch, soft_tissue_level(img, lungs) * float(rng.uniform(0.85, 1.0)), np.clip(a, 0, 1))
    else:
        blend_attenuation(img, patch, a)
    return Lesion(label, box, (cx, cy), size_mm)


@_renderer("consolidation")
def render_consolidation(img, lungs, spacing, rng):
    return _patchy(img, lungs, spacing, rng, "consolidation", float(rng.uniform(35, 90)),
                   float(rng.uniform(0.7, 0.95)), 0.08, bronchograms=True, fill=True)


@_renderer("opacity")
def render_opacity(img, lungs, spacing, rng):
    return _patchy(img, lungs, spacing, rng, "opacity", float(rng.uniform(40, 110)),
                   float(rng.uniform(0.2, 0.4)), 0.25, bronchograms=False)


@_renderer("pleural_effusion")
def render_effusion(img, lungs, spacing, rng):
    i = int(rng.integers(0, 2))
    x0, y0, x1, y1 = (float(v) for v in lungs[i])
    lh, lw = y1 - y0, x1 - x0
    depth = lh * float(rng.uniform(0.15, 0.45))  # fluid height at the lateral wall
    men = depth * float(rng.uniform(0.3, 0.6))  # how far the surface drops medially
    bottom = min(img.shape[0] - 1.0, y1 + 0.06 * lh)
    patch = Patch(img.shape, (x0 + x1) / 2, (y1 - depth + bottom) / 2, 0.55 * lw + 2, (bottom - y1 + depth) / 2 + 4)
    lat = _lateral_sign(lungs, i)
    xrel = np.clip((x1 - patch.xx) / lw if lat < 0 else (patch.xx - x0) / lw, 0, 1)  # 1 at lateral wall
    xrel = 1.0 - xrel  # 0 at the lateral wall, 1 medially
    surface = (y1 - depth) + men * (1.0 - np.exp(-xrel / 0.3))  # (1, w): meniscus highest laterally
    below = patch.yy - surface  # (h, w) px below the surface
    soft = max(1.0, 0.02 * lh)
    fluid = 1.0 / (1.0 + np.exp(-below / soft))
    thick = np.clip(below / max(depth, 1.0), 0, 1) ** 0.5  # more fluid lower down
    medial_fade = np.clip((1.0 - xrel) / 0.15, 0, 1) ** 0.5
    inside_x = np.clip(np.minimum(patch.xx - x0 + 0.05 * lw, x1 + 0.05 * lw - patch.xx) / (0.02 * lw + 1), 0, 1)
    a = fluid * (0.6 + 0.4 * thick) * medial_fade * inside_x
    box = box_of(patch, a, 0.2)
    if box is None:
        return None
    below_diaphragm = img[int(min(y1, img.shape[0] - 2)):int(min(img.shape[0], y1 + 0.15 * lh + 2)),
                          int(max(0, x0)):int(max(x0 + 1, x1))]
    level = max(soft_tissue_level(img, lungs), float(np.percentile(below_diaphragm, 70)))
    level = level * float(rng.uniform(0.92, 1.05)) * (0.93 + 0.07 * thick)
    blend_toward(img, patch, level, np.clip(a * float(rng.uniform(0.85, 1.0)), 0, 1).astype(np.float32))
    return Lesion("pleural_effusion", box, ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), depth * spacing)


@_renderer("pneumothorax")
def render_pneumothorax(img, lungs, spacing, rng):
    i = int(rng.integers(0, 2))
    lung = lungs[i]
    x0, y0, x1, y1 = (float(v) for v in lung)
    lw, lh = x1 - x0, y1 - y0
    lat = _lateral_sign(lungs, i)
    depth = float(rng.uniform(0.12, 0.3))  # rim depth, as a fraction of the superellipse radius
    extent = float(rng.uniform(0.45, 0.85))  # how far down the lateral wall it reaches (fraction of height)
    patch = Patch(img.shape, (x0 + x1) / 2, (y0 + y1) / 2, 0.5 * lw + 2, 0.5 * lh + 2)
    rho = _lung_rho(lung, patch.xx, patch.yy)  # (h, w)
    # Angular weight: full at the apex and upper lateral wall, tapering to 0 down the wall and medially.
    yrel = (patch.yy - y0) / lh  # 0 apex .. 1 base
    xlat = ((x0 - patch.xx) if lat < 0 else (patch.xx - x1)) / lw + 1.0  # 1 at the lateral wall, 0 medially
    reach = np.clip((extent - yrel) / 0.15, 0, 1) * np.clip(xlat / 0.35 + (yrel < 0.15), 0, 1)
    line_rho = 1.0 - depth * reach  # where the visceral pleura now is
    beyond = np.clip((rho - line_rho) / 0.015, 0, 1) * np.clip((1.03 - rho) / 0.03, 0, 1) * (reach > 0.05)
    beyond = gaussian_blur(beyond.astype(np.float32), 0.7)
    if float(beyond.max()) < 0.5:
        return None
    sl = patch.slices
    region = img[sl]
    smooth = gaussian_blur(region, max(1.5, 4.0 / spacing))  # no lung markings beyond the line
    lucent = smooth * float(rng.uniform(0.8, 0.92))
    new = region * (1 - beyond) + lucent * beyond
    line_w = max(0.5, 0.6 / spacing)
    line = np.exp(-0.5 * ((rho - line_rho) * 0.5 * min(lw, lh) / line_w) ** 2) * (reach > 0.05)
    new = 1.0 - (1.0 - new) * np.exp(-float(rng.uniform(0.15, 0.3)) * line)
    img[sl] = np.clip(new, 0, 1)
    box = box_of(patch, np.maximum(beyond, 0.5 * line), 0.3)
    if box is None:
        return None
    return Lesion("pneumothorax", box, ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2),
                  depth * 0.5 * lw * spacing)


@_renderer("cardiomegaly")
def render_cardiomegaly(img, lungs, spacing, rng):
    left, right = lungs[0], lungs[1]
    thorax_w = float(right[2] - left[0])
    mid = float(left[2] + right[0]) / 2
    y_base = float(min(left[3], right[3]))
    lh = float(np.mean(lungs[:, 3] - lungs[:, 1]))
    ctr = float(rng.uniform(0.56, 0.7))
    hw = 0.5 * ctr * thorax_w
    hh = float(rng.uniform(0.2, 0.28)) * lh
    cx = mid + float(rng.uniform(0.06, 0.12)) * hw * 2  # apex points to the patient's left (image right)
    cy = y_base - 0.8 * hh
    patch = Patch(img.shape, cx, cy, hw + 3, hh * 1.25 + 3)
    # Rounder below (the ventricles on the diaphragm), tapering above into the mediastinum.
    p = np.where(patch.yy > cy, 3.0, 1.6)
    e = (np.abs((patch.xx - cx) / hw) ** p + np.abs((patch.yy - cy) / hh) ** p) ** (1 / p)
    a = 1.0 / (1.0 + np.exp((e - 1.0) / 0.05))
    box = box_of(patch, a, 0.3)
    if box is None:
        return None
    level = soft_tissue_level(img, lungs) * float(rng.uniform(0.95, 1.05))
    blend_toward(img, patch, level, (a * float(rng.uniform(0.85, 1.0))).astype(np.float32))
    return Lesion("cardiomegaly", box, (cx, cy), 2 * hw * spacing)


SYNTH_LABELS: tuple[str, ...] = tuple(RENDERERS)


def insert_lesion(img: np.ndarray, lungs: np.ndarray, spacing_mm: float, label: str,
                  rng: np.random.Generator, tries: int = 5) -> Lesion:
    """Draw one ``label`` lesion into ``img`` (float32 unit, modified in place) and return it."""
    try:
        fn = RENDERERS[label]
    except KeyError:
        raise ValueError(f"no renderer for {label!r}; renderable findings: {', '.join(SYNTH_LABELS)}") from None
    for _ in range(tries):
        les = fn(img, np.asarray(lungs, np.float32), float(spacing_mm), rng)
        if les is not None:
            return les
    raise RuntimeError(f"could not place a {label!r} lesion in {tries} tries (lung boxes {lungs.tolist()})")


def synthesize(bg: Background, labels: Sequence[str], seed: int) -> tuple[np.ndarray, list[Lesion]]:
    """A copy of ``bg.image`` with one lesion per entry of ``labels``; the same seed gives the same result."""
    rng = np.random.default_rng(seed)
    img = bg.image.astype(np.float32, copy=True)
    lesions = [insert_lesion(img, bg.lungs_xyxy, bg.spacing_mm, lab, rng) for lab in labels]
    return img, lesions
