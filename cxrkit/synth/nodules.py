"""Five different nodule renderers, for augmentation and for leave-one-renderer-out evaluation.

A model trained on lesions of one renderer learns that renderer (issue 14: cxr29-demo scored 0.97
on its own renderer's nodules and 0.24 on another's). So nodules come from five renderers that
differ in profile, outline, internal density and edge, and each varies its size, contrast, edge
sharpness, blur and texture; a model is tested on a renderer it never saw
(``renderers=`` excludes it from training, :func:`insert_nodule` draws only from the rest).

=============  ==================================================================================
renderer       what it draws
=============  ==================================================================================
sphere         homogeneous soft-tissue sphere: chord profile ``sqrt(1 - (r/R)^2)``, edge blur 3-25 % R
gaussian       ill-defined, Gaussian density ``exp(-r^2 / 2 s^2)`` with s = R/2 (no plateau, no edge)
lobulated      plateau profile with an outline ``R(theta)`` of 2-6 lobes (10-30 % of R), textured inside
spiculated     denser core (55-80 % of R) with 6-18 thin tapering spicules reaching 1.3-2.2 R
calcified      soft-tissue sphere holding calcium (2-4x denser): central, laminated or popcorn; sharp edge
=============  ==================================================================================

Contrast: attenuation ``a = k d`` at the centre, k ~ U(0.022, 0.05) per mm of diameter (a soft-tissue
sphere's central chord is linear in its diameter; see :func:`cxrkit.synth.lesions.render_nodule`),
added with the transmission blend ``u' = 1 - (1 - u) exp(-a)``. Boxes are where the lesion's
attenuation is >= 15 % of its peak (spicule tips may stick out; the box is the nodule's body).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from ._ops import Patch, blend_attenuation, box_of, gaussian_blur, smooth_noise
from .lesions import Lesion, _lung_rho

__all__ = ["NODULE_RENDERERS", "insert_nodule", "nodule_attenuation"]

# (patch xx - cx, patch yy - cy, radius px, spacing mm/px, rng) -> (attenuation map, body map for the box)
_Shape = Callable[[np.ndarray, np.ndarray, float, float, np.random.Generator], "tuple[np.ndarray, np.ndarray]"]
NODULE_RENDERERS: dict[str, _Shape] = {}


def _shape(name: str):
    def deco(fn):
        NODULE_RENDERERS[name] = fn
        return fn
    return deco


def _chord(r: np.ndarray, radius) -> np.ndarray:
    return np.sqrt(np.clip(1.0 - (r / radius) ** 2, 0.0, 1.0))


@_shape("sphere")
def _sphere(dx, dy, R, spacing, rng):
    a = _chord(np.hypot(dx, dy), R)
    a = gaussian_blur(a.astype(np.float32), max(0.4, float(rng.uniform(0.03, 0.25)) * R))
    return a, a


@_shape("gaussian")
def _gaussian(dx, dy, R, spacing, rng):
    s = 0.5 * R * float(rng.uniform(0.85, 1.15))
    e = float(rng.uniform(0.8, 1.25))  # mildly elliptical
    th = float(rng.uniform(0, np.pi))
    u, v = dx * np.cos(th) + dy * np.sin(th), -dx * np.sin(th) + dy * np.cos(th)
    a = np.exp(-0.5 * ((u * e) ** 2 + (v / e) ** 2) / s ** 2).astype(np.float32)
    return a, a


@_shape("lobulated")
def _lobulated(dx, dy, R, spacing, rng):
    theta = np.arctan2(dy, dx)
    rr = np.ones_like(theta)
    for k in rng.choice(np.arange(2, 7), size=int(rng.integers(2, 4)), replace=False):
        rr = rr + float(rng.uniform(0.1, 0.3)) / 2 * np.cos(k * theta + 2 * np.pi * rng.random())
    Rt = R * rr
    rho = np.hypot(dx, dy) / Rt
    a = np.clip(1.0 - rho ** float(rng.uniform(2.5, 5.0)), 0, 1) ** 0.5  # flatter top than a sphere
    tex = 1.0 + float(rng.uniform(0.05, 0.2)) * smooth_noise(rng, a.shape, max(1.0, 0.25 * R))
    a = gaussian_blur((a * tex).astype(np.float32), max(0.4, float(rng.uniform(0.04, 0.15)) * R))
    return a, a


@_shape("spiculated")
def _spiculated(dx, dy, R, spacing, rng):
    core_r = R * float(rng.uniform(0.55, 0.8))
    r = np.hypot(dx, dy)
    core = _chord(r, core_r)
    theta = np.arctan2(dy, dx)
    spic = np.zeros_like(core)
    width = max(0.6, float(rng.uniform(0.4, 1.0)) / spacing)  # 0.4-1 mm wide
    for _ in range(int(rng.integers(6, 19))):
        ang = 2 * np.pi * rng.random()
        length = R * float(rng.uniform(1.3, 2.2))
        # distance from the ray at angle `ang`, only beyond the core and up to `length`
        along = dx * np.cos(ang) + dy * np.sin(ang)
        across = np.abs(-dx * np.sin(ang) + dy * np.cos(ang))
        taper = np.clip(1.0 - (along - core_r) / (length - core_r), 0, 1) * (along > 0.5 * core_r)
        w = width * (0.4 + 0.6 * taper)
        spic = np.maximum(spic, float(rng.uniform(0.3, 0.6)) * taper * np.exp(-0.5 * (across / w) ** 2))
    del theta
    a = gaussian_blur(np.maximum(core, spic).astype(np.float32), max(0.4, 0.05 * R))
    return a, gaussian_blur(core.astype(np.float32), max(0.4, 0.05 * R))


@_shape("calcified")
def _calcified(dx, dy, R, spacing, rng):
    r = np.hypot(dx, dy)
    soft = _chord(r, R)
    dense = float(rng.uniform(2.0, 4.0))
    kind = int(rng.integers(0, 3))
    if kind == 0:  # central nidus
        calc = _chord(r, R * float(rng.uniform(0.3, 0.55)))
    elif kind == 1:  # laminated: a dense ring
        rc = R * float(rng.uniform(0.45, 0.75))
        calc = np.exp(-0.5 * ((r - rc) / max(0.6, 0.08 * R)) ** 2)
    else:  # popcorn: several small dense blobs
        calc = np.zeros_like(soft)
        for _ in range(int(rng.integers(3, 8))):
            ang, rad = 2 * np.pi * rng.random(), R * 0.6 * np.sqrt(rng.random())
            cx, cy = rad * np.cos(ang), rad * np.sin(ang)
            calc = np.maximum(calc, _chord(np.hypot(dx - cx, dy - cy), R * float(rng.uniform(0.12, 0.25))))
    a = soft + (dense - 1.0) * calc * (soft > 0)
    a = gaussian_blur(a.astype(np.float32), max(0.4, float(rng.uniform(0.02, 0.08)) * R))
    return a, gaussian_blur(soft.astype(np.float32), max(0.4, 0.05 * R))


def nodule_attenuation(renderer: str, d_mm: float, spacing_mm: float, rng: np.random.Generator,
                       k_per_mm: "tuple[float, float]" = (0.022, 0.05)) -> "tuple[np.ndarray, np.ndarray]":
    """The attenuation map (centred, float32) of one nodule and the body map its box is taken from."""
    R = 0.5 * d_mm / spacing_mm
    half = int(np.ceil(2.3 * R + 4))
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1].astype(np.float32)
    a, body = NODULE_RENDERERS[renderer](xx, yy, R, spacing_mm, rng)
    peak = min(1.4, float(rng.uniform(*k_per_mm)) * d_mm)
    m = float(body.max()) or 1.0
    return (a * (peak / m)).astype(np.float32), body


def _pick_center(img: np.ndarray, lungs: np.ndarray, rng: np.random.Generator, tries: int = 40) -> "tuple[float, float]":
    """A point well inside a lung box that is not brighter than that lung's median (not on the
    heart, a rib crossing or outside the lung when the box is loose)."""
    h, w = img.shape
    best = None
    for t in range(tries):
        i = int(rng.integers(0, len(lungs)))
        x0, y0, x1, y1 = (float(v) for v in lungs[i])
        x, y = x0 + (x1 - x0) * rng.random(), y0 + (y1 - y0) * rng.random()
        if _lung_rho(lungs[i], x, y) >= 0.8:
            continue
        xi, yi = int(np.clip(x, 0, w - 1)), int(np.clip(y, 0, h - 1))
        r = max(2, int(0.02 * w))
        local = float(img[max(0, yi - r):yi + r + 1, max(0, xi - r):xi + r + 1].mean())
        ref = float(np.median(img[int(max(0, y0)):int(min(h, y1)), int(max(0, x0)):int(min(w, x1))]))
        if local <= ref:
            return x, y
        best = best or (x, y)
    return best if best is not None else ((lungs[0, 0] + lungs[0, 2]) / 2, (lungs[0, 1] + lungs[0, 3]) / 2)


def insert_nodule(img: np.ndarray, lungs: np.ndarray, spacing_mm: float, rng: np.random.Generator, *,
                  renderers: Sequence[str] | None = None, d_mm: "tuple[float, float]" = (6.0, 30.0),
                  center_xy: "tuple[float, float] | None" = None, label: str | None = None) -> Lesion:
    """Draw one nodule (a random renderer of ``renderers``, default all five) into ``img`` (float32
    unit intensity, modified in place); returns its :class:`Lesion` (label "nodule", or "mass" above
    30 mm, unless ``label`` is given; ``renderer`` names the renderer)."""
    names = list(NODULE_RENDERERS) if renderers is None else list(renderers)
    unknown = [n for n in names if n not in NODULE_RENDERERS]
    if unknown or not names:
        raise ValueError(f"unknown nodule renderers {unknown or names}; known: {', '.join(NODULE_RENDERERS)}")
    name = names[int(rng.integers(0, len(names)))]
    d = float(rng.uniform(*d_mm))
    a, body = nodule_attenuation(name, d, spacing_mm, rng)
    cx, cy = center_xy if center_xy is not None else _pick_center(img, np.asarray(lungs, np.float32), rng)
    half = a.shape[0] // 2
    h, w = img.shape
    X0, Y0 = int(np.floor(cx)) - half, int(np.floor(cy)) - half  # map index 0 -> this pixel
    ix0, iy0 = max(0, X0), max(0, Y0)
    ix1, iy1 = min(w, X0 + a.shape[1]), min(h, Y0 + a.shape[0])
    if ix1 <= ix0 or iy1 <= iy0:
        raise RuntimeError(f"nodule centre {(cx, cy)} is outside the {w}x{h} image")
    patch = Patch(img.shape, cx, cy, 1, 1)
    patch.x0, patch.x1, patch.y0, patch.y1 = ix0, ix1, iy0, iy1
    sl = (slice(iy0 - Y0, iy1 - Y0), slice(ix0 - X0, ix1 - X0))
    a_p, body_p = a[sl], body[sl]
    box = box_of(patch, body_p)
    if box is None:
        raise RuntimeError("empty nodule")
    blend_attenuation(img, patch, a_p)
    lab = label or ("mass" if d > 30.0 else "nodule")
    return Lesion(lab, box, (float(cx), float(cy)), d, renderer=name)
