"""Rendering of world scenes: layouts that satisfy a meaning, rasterised flat shapes.

Guarantees: :func:`render` is a pure function of ``(meaning, rng state)``; objects never
overlap (bounding boxes at least 2 px apart); requested positions use the regions of
:mod:`world.checker` with a 1–2 px margin, relations a centre offset of more than 6 px, so
ground-truth renders pass the checker.
"""

from __future__ import annotations

import numpy as np

from world.scenes import (
    COLOURS,
    SIZE,
    Meaning,
    ObjectSpec,
    caption_text,
    heldout_meanings,
    train_meanings,
)

SMALL_R = (4.0, 5.5)
LARGE_R = (8.0, 9.5)
ANY_R = (4.0, 9.5)
OBJ_R = (4.0, 6.5)

_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)


def shape_mask(shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    """Boolean SIZE×SIZE mask of a shape whose bounding box is centred at (cx, cy).

    circle: radius r; square: side 1.8r; triangle: upward, base and height 2r.
    """
    if shape == "circle":
        return bool_((_XX - cx) ** 2 + (_YY - cy) ** 2 <= r * r)
    if shape == "square":
        h = 0.9 * r
        return bool_((np.abs(_XX - cx) <= h) & (np.abs(_YY - cy) <= h))
    if shape == "triangle":
        dy = _YY - (cy - r)
        return bool_((dy >= 0) & (cy + r >= _YY) & (np.abs(_XX - cx) <= dy / 2))
    raise ValueError(f"unknown shape {shape!r}")


def bool_(a: np.ndarray) -> np.ndarray:
    """Cast to a boolean array."""
    return np.asarray(a, dtype=bool)


def half_extent(shape: str, r: float) -> float:
    """Half the bounding-box side of a shape of radius parameter ``r``."""
    return 0.9 * r if shape == "square" else r


def _pos_range(pos: str | None, h: float, axis: str) -> tuple[float, float]:
    lo, hi = h, SIZE - 1 - h
    if pos == "centre":
        return max(lo, 12.0), min(hi, 20.0)
    if axis == "x" and pos == "left":
        return lo, min(hi, 11.0)
    if axis == "x" and pos == "right":
        return max(lo, 21.0), hi
    if axis == "y" and pos == "top":
        return lo, min(hi, 11.0)
    if axis == "y" and pos == "bottom":
        return max(lo, 21.0), hi
    return lo, hi


def _radius(o: ObjectSpec, rng: np.random.Generator, multi: bool) -> float:
    lo, hi = OBJ_R if multi else {"small": SMALL_R, "large": LARGE_R}.get(o.size or "", ANY_R)
    return float(rng.uniform(lo, hi))


def _separate(a: tuple[float, float, float], b: tuple[float, float, float]) -> bool:
    (ax, ay, ah), (bx, by, bh) = a, b
    gap = 2.0
    return abs(ax - bx) > ah + bh + gap or abs(ay - by) > ah + bh + gap


def layout(m: Meaning, rng: np.random.Generator) -> list[tuple[ObjectSpec, float, float, float]]:
    """Sample (object, cx, cy, r) placements for a meaning, satisfying its constraints."""
    objs = list(m.objects) * (m.count if m.category == "counting" else 1)
    multi = len(objs) > 1
    for _ in range(1000):
        placed: list[tuple[ObjectSpec, float, float, float]] = []
        for o in objs:
            r = _radius(o, rng, multi)
            h = half_extent(o.shape, r)
            x0, x1 = _pos_range(o.position, h, "x")
            y0, y1 = _pos_range(o.position, h, "y")
            placed.append((o, float(rng.uniform(x0, x1)), float(rng.uniform(y0, y1)), r))
        boxes = [(cx, cy, half_extent(o.shape, r)) for o, cx, cy, r in placed]
        if any(not _separate(boxes[i], boxes[j]) for i in range(len(boxes)) for j in range(i)):
            continue
        if m.relation is not None and not _relation_ok(m.relation, placed[0], placed[1]):
            continue
        return placed
    raise RuntimeError(f"could not lay out {m}")


def _relation_ok(
    rel: str, a: tuple[ObjectSpec, float, float, float], b: tuple[ObjectSpec, float, float, float]
) -> bool:
    dx, dy = a[1] - b[1], a[2] - b[2]
    margin = 6.0
    return {
        "above": -dy > margin,
        "below": dy > margin,
        "left of": -dx > margin,
        "right of": dx > margin,
    }[rel]


def render(m: Meaning, rng: np.random.Generator) -> np.ndarray:
    """Render a SIZE×SIZE×3 uint8 image satisfying ``m``."""
    img = np.full((SIZE, SIZE, 3), 255, dtype=np.uint8)
    for o, cx, cy, r in layout(m, rng):
        img[shape_mask(o.shape, cx, cy, r)] = COLOURS[o.colour]
    return img


def batch(
    rng: np.random.Generator,
    n: int,
    heldout: bool = False,
) -> tuple[np.ndarray, list[str], list[Meaning]]:
    """``n`` rendered (image, caption, meaning) samples: images as n×3×32×32 float32 in
    [-1, 1]; training combinations only unless ``heldout``."""
    it = heldout_meanings(rng) if heldout else train_meanings(rng)
    ms = [next(it) for _ in range(n)]
    caps = [caption_text(m, rng) for m in ms]
    imgs = np.stack([render(m, rng) for m in ms]).astype(np.float32)
    x = imgs.transpose(0, 3, 1, 2) / 127.5 - 1.0
    return x, caps, ms
