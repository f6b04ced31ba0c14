"""Automatic checker of the embedded world (in the spirit of GenEval).

Colour segmentation to the palette, connected components per colour, shape by IoU against
ideal templates, size by bounding-box extent, position by bounding-box centre.

Guarantees: :func:`check` is deterministic, returns a score in [0, 1] equal to the fraction of
satisfied constraints, and scores ground-truth renders of :mod:`world.scenes` at (almost
always exactly) 1.0 — see ``tests/test_world_checker.py`` and :func:`validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from world.render import render, shape_mask
from world.scenes import COLOURS, SHAPES, SIZE, Meaning

_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)
_NAMES = list(COLOURS)
_WHITE = np.array([255, 255, 255], dtype=np.float32)
MAX_DIST = 90.0
MIN_PIXELS = 6
LEFT, RIGHT, TOP, BOTTOM = 13.0, 19.0, 13.0, 19.0
CENTRE = (11.0, 21.0)
REL_MARGIN = 2.0
SMALL_MAX_EXTENT = 13.0  # bounding-box side ≤ this → small; ≥ LARGE_MIN_EXTENT → large
LARGE_MIN_EXTENT = 14.0


@dataclass(frozen=True)
class Component:
    """One connected component of one palette colour."""

    colour: str
    shape: str
    pixels: int
    cx: float
    cy: float
    extent: float


@dataclass
class CheckResult:
    """Score (fraction of constraints passed) and the pass/fail of each named constraint."""

    score: float
    constraints: dict[str, bool] = field(default_factory=dict)


def segment(image: np.ndarray) -> np.ndarray:
    """Palette index per pixel (-1 = background / unassigned) of an H×W×3 uint8 image."""
    px = image.reshape(-1, 3).astype(np.float32)
    d = np.linalg.norm(px[:, None, :] - _PALETTE[None], axis=-1)
    idx = d.argmin(axis=1)
    dmin = d[np.arange(len(px)), idx]
    dw = np.linalg.norm(px - _WHITE, axis=-1)
    idx = np.where((dmin < MAX_DIST) & (dmin < dw), idx, -1)
    return idx.reshape(image.shape[:2])


def _shape_of(mask: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> str:
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    ext = max(x1 - x0, y1 - y0) + 1
    best, best_iou = SHAPES[0], -1.0
    for shape in SHAPES:
        r0 = ext / (1.8 if shape == "square" else 2.0)
        for r in (r0 - 0.5, r0 - 0.25, r0, r0 + 0.25):
            t = shape_mask(shape, cx, cy, r)
            inter = np.logical_and(t, mask).sum()
            iou = inter / max(np.logical_or(t, mask).sum(), 1)
            if iou > best_iou:
                best, best_iou = shape, float(iou)
    return best


def components(image: np.ndarray) -> list[Component]:
    """All colour components of at least MIN_PIXELS pixels, largest first."""
    seg = segment(image)
    out: list[Component] = []
    for ci, name in enumerate(_NAMES):
        lab, n = ndimage.label(seg == ci)
        for k in range(1, n + 1):
            mask = lab == k
            ys, xs = np.nonzero(mask)
            if len(ys) < MIN_PIXELS:
                continue
            ext = float(max(xs.max() - xs.min(), ys.max() - ys.min()) + 1)
            out.append(
                Component(
                    name,
                    _shape_of(mask, ys, xs),
                    len(ys),
                    float(xs.min() + xs.max()) / 2,
                    float(ys.min() + ys.max()) / 2,
                    ext,
                )
            )
    out.sort(key=lambda c: -c.pixels)
    return out


def _position_ok(c: Component, pos: str) -> bool:
    return {
        "left": c.cx < LEFT,
        "right": c.cx > RIGHT,
        "top": c.cy < TOP,
        "bottom": c.cy > BOTTOM,
        "centre": CENTRE[0] <= c.cx <= CENTRE[1] and CENTRE[0] <= c.cy <= CENTRE[1],
    }[pos]


def _relation_ok(a: Component, b: Component, rel: str) -> bool:
    return {
        "above": b.cy - a.cy > REL_MARGIN,
        "below": a.cy - b.cy > REL_MARGIN,
        "left of": b.cx - a.cx > REL_MARGIN,
        "right of": a.cx - b.cx > REL_MARGIN,
    }[rel]


def _pick(comps: list[Component], colour: str, shape: str) -> Component | None:
    same = [c for c in comps if c.colour == colour]
    if not same:
        return None
    matching = [c for c in same if c.shape == shape]
    return (matching or same)[0]


def check(image: np.ndarray, meaning: Meaning) -> CheckResult:
    """Check an H×W×3 uint8 image (32×32) against a meaning.

    Constraints: per object ``colour:<c>`` (a component of that colour exists) and
    ``shape:<c>`` (it has the shape); single objects add ``count`` (exactly one component in
    the image) and ``size``/``position`` when requested; counting adds ``count`` (exact number
    of components of the colour) and uses the majority shape; relations add ``relation``.
    """
    if image.shape[:2] != (SIZE, SIZE):
        raise ValueError(f"expected {SIZE}x{SIZE} image, got {image.shape}")
    comps = components(image)
    res: dict[str, bool] = {}
    if meaning.category == "counting":
        o = meaning.objects[0]
        same = [c for c in comps if c.colour == o.colour]
        res[f"colour:{o.colour}"] = bool(same)
        shapes = [c.shape for c in same]
        res[f"shape:{o.colour}"] = bool(same) and max(set(shapes), key=shapes.count) == o.shape
        res["count"] = len(same) == meaning.count
    else:
        picked: list[Component | None] = []
        for o in meaning.objects:
            c = _pick(comps, o.colour, o.shape)
            picked.append(c)
            res[f"colour:{o.colour}"] = c is not None
            res[f"shape:{o.colour}"] = c is not None and c.shape == o.shape
            if o.size is not None:
                res["size"] = c is not None and (
                    c.extent <= SMALL_MAX_EXTENT
                    if o.size == "small"
                    else c.extent >= LARGE_MIN_EXTENT
                )
            if o.position is not None:
                res["position"] = c is not None and _position_ok(c, o.position)
        if meaning.category in ("single_object", "position"):
            res["count"] = len(comps) == 1
        if meaning.relation is not None:
            a, b = picked
            res["relation"] = (
                a is not None and b is not None and _relation_ok(a, b, meaning.relation)
            )
    score = sum(res.values()) / len(res)
    return CheckResult(float(score), res)


def check_batch(images: np.ndarray, meanings: list[Meaning]) -> list[CheckResult]:
    """:func:`check` over an N×H×W×3 uint8 batch."""
    return [check(im, m) for im, m in zip(images, meanings, strict=True)]


def validate(n: int = 1000, seed: int = 0) -> float:
    """Mean checker score on ``n`` ground-truth renders of random meanings (should be ~1)."""
    from world.scenes import random_meaning

    rng = np.random.default_rng(seed)
    scores = []
    for _ in range(n):
        m = random_meaning(rng)
        scores.append(check(render(m, rng), m).score)
    return float(np.mean(scores))
