"""Procedural scenes and captions of the embedded world.

Images are 32×32 RGB, white background, 1–3 flat-coloured hard-edged shapes (circle,
square, upward triangle) in 6 colours. Every caption carries its structured meaning
(:class:`Meaning`), and :func:`parse_caption` maps any caption of the grammar back to it
(``None`` for out-of-grammar text).

Guarantees:

* Rendering is a pure function of ``(meaning, rng state)``: same seed, same pixels.
* :func:`world.render.render` always produces an image that satisfies its meaning under the rules of
  :mod:`world.checker` (objects never overlap; positions and relations have margin).
* ``parse_caption(caption_text(m, rng)) == m`` for every meaning ``m`` and every template.
* The held-out set (:func:`is_heldout`) is a fixed, seed-independent set of caption
  *combinations*; :func:`train_meanings` never yields one, :func:`heldout_meanings` only
  yields them. Every colour, shape, size, position and relation still occurs in training.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

SIZE = 32
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "yellow": (235, 220, 30),
    "purple": (140, 50, 180),
    "orange": (245, 130, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "centre")
RELATIONS: tuple[str, ...] = ("above", "below", "left of", "right of")
CATEGORIES: tuple[str, ...] = (
    "single_object",  # 1 object, optional size
    "position",  # 1 object at an absolute position
    "counting",  # 2 or 3 objects of the same colour and shape
    "two_objects",  # 2 objects, "a X and a Y"
    "relation",  # 2 objects with a spatial relation
    "attribute_binding",  # 3 objects of distinct colours
)
#: Sampling weights of the categories for training and evaluation.
CATEGORY_WEIGHTS: dict[str, float] = {
    "single_object": 0.2,
    "position": 0.2,
    "counting": 0.15,
    "two_objects": 0.15,
    "relation": 0.15,
    "attribute_binding": 0.15,
}
COUNT_WORDS = {2: "two", 3: "three"}
POSITION_PHRASES = {
    "left": ("on the left", "at the left"),
    "right": ("on the right", "at the right"),
    "top": ("at the top", "on the top"),
    "bottom": ("at the bottom", "on the bottom"),
    "centre": ("in the centre", "in the center", "in the middle"),
}
RELATION_PHRASES = {
    "above": ("above",),
    "below": ("below", "under"),
    "left of": ("to the left of", "left of"),
    "right of": ("to the right of", "right of"),
}
PREFIXES = ("", "", "", "a picture of ", "an image of ", "a drawing of ")
SUFFIXES = ("", "", "", " on a white background", " on white")


@dataclass(frozen=True)
class ObjectSpec:
    """One requested object: colour and shape, optionally a size and absolute position."""

    colour: str
    shape: str
    size: str | None = None
    position: str | None = None


@dataclass(frozen=True)
class Meaning:
    """Structured meaning of a caption.

    ``objects`` lists distinct requested objects; for ``counting`` it holds one object and
    ``count`` is 2 or 3, otherwise ``count == len(objects)``. ``relation`` (``relation``
    category only) reads "objects[0] <relation> objects[1]".
    """

    category: str
    objects: tuple[ObjectSpec, ...]
    count: int = 1
    relation: str | None = None

    def key(self) -> str:
        """Canonical combination key (identical for captions of equal meaning)."""
        return canonical_caption(self)


# --------------------------------------------------------------------------- captions
def _obj_phrase(o: ObjectSpec, article: str = "a") -> str:
    words = ([o.size] if o.size else []) + [o.colour, o.shape]
    if article == "a" and words[0][0] in "aeiou":
        article = "an"
    return " ".join([article, *words])


def canonical_caption(m: Meaning) -> str:
    """The canonical (first-template) caption of a meaning."""
    return _caption(m, variant=0)


def _caption(m: Meaning, variant: int, rng: np.random.Generator | None = None) -> str:
    def pick(options: tuple[str, ...]) -> str:
        return options[0] if rng is None else options[int(rng.integers(len(options)))]

    art = "a" if rng is None else pick(("a", "a", "one"))
    if m.category in ("single_object", "position"):
        o = m.objects[0]
        body = _obj_phrase(o, art)
        if o.position:
            body += " " + pick(POSITION_PHRASES[o.position])
    elif m.category == "counting":
        o = m.objects[0]
        body = f"{COUNT_WORDS[m.count]} {o.colour} {o.shape}s"
    elif m.category == "two_objects":
        a, b = m.objects
        body = f"{_obj_phrase(a)} and {_obj_phrase(b)}"
    elif m.category == "relation":
        a, b = m.objects
        assert m.relation is not None
        body = f"{_obj_phrase(a)} {pick(RELATION_PHRASES[m.relation])} {_obj_phrase(b)}"
    elif m.category == "attribute_binding":
        a, b, c = m.objects
        comma = "," if rng is None else pick((",", ","))
        body = f"{_obj_phrase(a)}{comma} {_obj_phrase(b)} and {_obj_phrase(c)}"
    else:
        raise ValueError(f"unknown category {m.category!r}")
    if rng is None or variant == 0:
        return body
    return pick(PREFIXES) + body + pick(SUFFIXES)


def caption_text(m: Meaning, rng: np.random.Generator) -> str:
    """A caption of ``m`` from a randomly chosen template (prefix, synonyms, suffix)."""
    return _caption(m, variant=1, rng=rng)


_WS = re.compile(r"\s+")
_COL = "|".join(COLOURS)
_SHP = "|".join(SHAPES)
_OBJ = rf"(?:a|an|one)\s+(?:(small|large)\s+)?({_COL})\s+({_SHP})"
_OBJ_NOSIZE = rf"(?:a|an|one)\s+({_COL})\s+({_SHP})"
_POS = {p: pos for pos, ps in POSITION_PHRASES.items() for p in ps}
_REL = {p: rel for rel, ps in RELATION_PHRASES.items() for p in ps}
_RE_SINGLE = re.compile(rf"^{_OBJ}(?:\s+({'|'.join(_POS)}))?$")
_RE_COUNT = re.compile(rf"^(two|three|2|3)\s+({_COL})\s+({_SHP})s$")
_RE_TWO = re.compile(rf"^{_OBJ_NOSIZE}\s+and\s+{_OBJ_NOSIZE}$")
_RE_REL = re.compile(
    rf"^{_OBJ_NOSIZE}\s+({'|'.join(sorted(_REL, key=len, reverse=True))})\s+"
    rf"{_OBJ_NOSIZE}$"
)
_RE_TRIPLE = re.compile(rf"^{_OBJ_NOSIZE}\s*,\s*{_OBJ_NOSIZE}\s*,?\s+and\s+{_OBJ_NOSIZE}$")
_PREFIX_RE = re.compile(r"^(?:(?:a|an)\s+(?:picture|image|drawing|photo)\s+of\s+|there\s+is\s+)")
_SUFFIX_RE = re.compile(r"\s+on\s+(?:a\s+)?white(?:\s+background)?$")


def parse_caption(text: str) -> Meaning | None:
    """Parse a caption of the world's grammar into its meaning; ``None`` if out of grammar.

    Case, surrounding whitespace, a final full stop, the prefixes "a picture/image/drawing/
    photo of" and the suffixes "on (a) white (background)" are ignored. A meaning that
    violates the world's rules (e.g. two objects of the same colour) is out of grammar.
    """
    t = _WS.sub(" ", text.strip().lower()).rstrip(".").strip()
    t = t.replace(" ,", ",")
    t = _PREFIX_RE.sub("", t)
    t = _SUFFIX_RE.sub("", t)
    m: Meaning | None = None
    if g := _RE_SINGLE.match(t):
        size, col, shp, pos = g.groups()
        position = _POS[pos] if pos else None
        m = Meaning(
            "position" if position else "single_object", (ObjectSpec(col, shp, size, position),)
        )
    elif g := _RE_COUNT.match(t):
        n = {"two": 2, "three": 3, "2": 2, "3": 3}[g.group(1)]
        m = Meaning("counting", (ObjectSpec(g.group(2), g.group(3)),), count=n)
    elif g := _RE_TWO.match(t):
        a = ObjectSpec(g.group(1), g.group(2))
        b = ObjectSpec(g.group(3), g.group(4))
        m = Meaning("two_objects", (a, b), count=2)
    elif g := _RE_REL.match(t):
        a = ObjectSpec(g.group(1), g.group(2))
        b = ObjectSpec(g.group(4), g.group(5))
        m = Meaning("relation", (a, b), count=2, relation=_REL[g.group(3)])
    elif g := _RE_TRIPLE.match(t):
        objs = tuple(ObjectSpec(g.group(i), g.group(i + 1)) for i in (1, 3, 5))
        m = Meaning("attribute_binding", objs, count=3)
    if m is None or not _valid(m):
        return None
    return m


def _valid(m: Meaning) -> bool:
    cols = [o.colour for o in m.objects]
    return len(set(cols)) == len(cols)


# --------------------------------------------------------------------------- held-out
def _h(key: str) -> int:
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)


#: Fraction of combinations held out, per category (by a fixed hash of the combination).
HELDOUT_MOD = 10


def combination_key(m: Meaning) -> str:
    """The key that decides held-out membership: the caption combination, minus sizes for
    multi-object categories (which carry none)."""
    return f"{m.category}:{canonical_caption(m)}"


def is_heldout(m: Meaning) -> bool:
    """True if ``m``'s combination is in the fixed held-out set (about 1 in 10 per category).

    The set is fixed by a hash of the canonical caption, not by a seed. For the single-object
    and position categories the key is (colour, shape, size/position); for multi-object
    ones it is the full combination, so every colour, shape, position and relation still
    appears in training in other combinations.
    """
    return _h(combination_key(m)) % HELDOUT_MOD == 0


# --------------------------------------------------------------------------- sampling
def _rand_obj(rng: np.random.Generator, colour: str | None = None) -> ObjectSpec:
    col = colour or list(COLOURS)[int(rng.integers(len(COLOURS)))]
    return ObjectSpec(col, SHAPES[int(rng.integers(len(SHAPES)))])


def random_meaning(rng: np.random.Generator, category: str | None = None) -> Meaning:
    """Draw a meaning (any combination, held-out or not) of ``category`` (weighted if None)."""
    if category is None:
        cats = list(CATEGORY_WEIGHTS)
        p = np.array([CATEGORY_WEIGHTS[c] for c in cats])
        category = cats[int(rng.choice(len(cats), p=p / p.sum()))]
    cols = [str(c) for c in rng.permutation(list(COLOURS))]
    if category == "single_object":
        o = _rand_obj(rng, cols[0])
        size = (None, "small", "large")[int(rng.integers(3))]
        return Meaning(category, (ObjectSpec(o.colour, o.shape, size),))
    if category == "position":
        o = _rand_obj(rng, cols[0])
        pos = POSITIONS[int(rng.integers(len(POSITIONS)))]
        return Meaning(category, (ObjectSpec(o.colour, o.shape, None, pos),))
    if category == "counting":
        return Meaning(category, (_rand_obj(rng, cols[0]),), count=int(rng.integers(2, 4)))
    if category == "two_objects":
        return Meaning(category, (_rand_obj(rng, cols[0]), _rand_obj(rng, cols[1])), count=2)
    if category == "relation":
        rel = RELATIONS[int(rng.integers(len(RELATIONS)))]
        objs = (_rand_obj(rng, cols[0]), _rand_obj(rng, cols[1]))
        return Meaning(category, objs, count=2, relation=rel)
    if category == "attribute_binding":
        return Meaning(category, tuple(_rand_obj(rng, c) for c in cols[:3]), count=3)
    raise ValueError(f"unknown category {category!r}")


def train_meanings(rng: np.random.Generator, category: str | None = None) -> Iterator[Meaning]:
    """Endless stream of training meanings; never yields a held-out combination."""
    while True:
        m = random_meaning(rng, category)
        if not is_heldout(m):
            yield m


def heldout_meanings(rng: np.random.Generator, category: str | None = None) -> Iterator[Meaning]:
    """Endless stream of held-out meanings only."""
    while True:
        m = random_meaning(rng, category)
        if is_heldout(m):
            yield m


def train_captions(n: int, seed: int) -> list[tuple[str, Meaning]]:
    """``n`` (caption, meaning) training pairs with varied templates; no held-out combos."""
    rng = np.random.default_rng(seed)
    it = train_meanings(rng)
    return [(caption_text(m, rng), m) for m in (next(it) for _ in range(n))]


def all_meanings(category: str) -> list[Meaning]:
    """Every meaning (combination) of a category, in a fixed order."""
    if category not in _ALL:
        objs = [ObjectSpec(c, s) for c in COLOURS for s in SHAPES]
        out: list[Meaning] = []
        if category == "single_object":
            out = [
                Meaning(category, (ObjectSpec(o.colour, o.shape, z),))
                for o in objs
                for z in (None, *SIZES)
            ]
        elif category == "position":
            out = [
                Meaning(category, (ObjectSpec(o.colour, o.shape, None, p),))
                for o in objs
                for p in POSITIONS
            ]
        elif category == "counting":
            out = [Meaning(category, (o,), count=n) for o in objs for n in (2, 3)]
        elif category == "two_objects":
            out = [Meaning(category, (a, b), count=2) for a in objs for b in objs]
        elif category == "relation":
            out = [
                Meaning(category, (a, b), count=2, relation=r)
                for a in objs
                for b in objs
                for r in RELATIONS
            ]
        elif category == "attribute_binding":
            out = [Meaning(category, (a, b, c), count=3) for a in objs for b in objs for c in objs]
        else:
            raise ValueError(f"unknown category {category!r}")
        _ALL[category] = [m for m in out if _valid(m)]
    return _ALL[category]


_ALL: dict[str, list[Meaning]] = {}


def heldout_combinations(category: str) -> list[Meaning]:
    """All held-out meanings of a category (fixed; independent of any seed)."""
    return [m for m in all_meanings(category) if is_heldout(m)]


def heldout_captions(n: int, seed: int = 0) -> list[tuple[str, Meaning]]:
    """``n`` held-out (canonical caption, meaning) pairs, stratified evenly over categories
    (category ``i % 6`` for item ``i``); within a category, a seeded permutation of its
    held-out combinations, repeated when ``n`` exceeds their number."""
    rng = np.random.default_rng(seed)
    pools = {c: heldout_combinations(c) for c in CATEGORIES}
    perms = {c: rng.permutation(len(p)) for c, p in pools.items()}
    out: list[tuple[str, Meaning]] = []
    for i in range(n):
        cat = CATEGORIES[i % len(CATEGORIES)]
        j = i // len(CATEGORIES)
        m = pools[cat][int(perms[cat][j % len(pools[cat])])]
        out.append((canonical_caption(m), m))
    return out
