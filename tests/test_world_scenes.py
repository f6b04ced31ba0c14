"""Scenes, captions, held-out split and the checker of the embedded world."""

from __future__ import annotations

import numpy as np
import pytest

from world import scenes
from world.checker import check, validate
from world.render import render
from world.scenes import Meaning, ObjectSpec, parse_caption


def test_caption_meaning_round_trip() -> None:
    rng = np.random.default_rng(1)
    for _ in range(500):
        m = scenes.random_meaning(rng)
        assert parse_caption(scenes.canonical_caption(m)) == m
        assert parse_caption(scenes.caption_text(m, rng)) == m


@pytest.mark.parametrize(
    "text",
    [
        "",
        "hello world",
        "a dog",
        "a red circle and a red square",
        "four red circles",
        "a red circle above",
    ],
)
def test_out_of_grammar_is_none(text: str) -> None:
    assert parse_caption(text) is None


def test_parse_variants() -> None:
    m = parse_caption("  A picture of a Large BLUE square in the center on a white background.")
    assert m == Meaning("position", (ObjectSpec("blue", "square", "large", "centre"),))
    r = parse_caption("an orange circle under a green triangle")
    assert r is not None and r.relation == "below" and r.objects[0].colour == "orange"


def test_heldout_absent_from_training() -> None:
    held = {m for _, m in scenes.heldout_captions(600, 0)}
    assert all(scenes.is_heldout(m) for m in held)
    train = scenes.train_captions(3000, 0)
    assert not any(scenes.is_heldout(m) for _, m in train)
    assert not held & {m for _, m in train}
    # every colour, shape, position and relation still occurs in training
    objs = [o for _, m in train for o in m.objects]
    assert {o.colour for o in objs} == set(scenes.COLOURS)
    assert {o.shape for o in objs} == set(scenes.SHAPES)
    assert {o.position for o in objs} - {None} == set(scenes.POSITIONS)
    assert {m.relation for _, m in train} - {None} == set(scenes.RELATIONS)
    for c in scenes.CATEGORIES:  # small held-out share per category
        assert 0 < len(scenes.heldout_combinations(c)) <= 0.2 * len(scenes.all_meanings(c))


def test_heldout_captions_stratified_and_seeded() -> None:
    a = scenes.heldout_captions(12, 3)
    assert a == scenes.heldout_captions(12, 3)
    assert [m.category for _, m in a[:6]] == list(scenes.CATEGORIES)


def test_render_deterministic() -> None:
    m = scenes.random_meaning(np.random.default_rng(0))
    a = render(m, np.random.default_rng(5))
    b = render(m, np.random.default_rng(5))
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8 and (a == b).all()


def test_checker_on_ground_truth() -> None:
    assert validate(400, seed=2) > 0.995


def test_checker_rejects_wrong_images() -> None:
    rng = np.random.default_rng(3)
    blank = np.full((32, 32, 3), 255, np.uint8)
    for _ in range(30):
        m = scenes.random_meaning(rng)
        assert check(blank, m).score < 1.0
    red = Meaning("single_object", (ObjectSpec("red", "circle"),))
    blue_img = render(Meaning("single_object", (ObjectSpec("blue", "square"),)), rng)
    res = check(blue_img, red)
    assert res.score < 0.5 and not res.constraints["colour:red"]
    left = Meaning("position", (ObjectSpec("red", "circle", None, "left"),))
    right_img = render(Meaning("position", (ObjectSpec("red", "circle", None, "right"),)), rng)
    res = check(right_img, left)
    assert res.constraints == {
        "colour:red": True,
        "shape:red": True,
        "position": False,
        "count": True,
    }
    assert res.score == 0.75
    two = Meaning("counting", (ObjectSpec("green", "triangle"),), count=2)
    three_img = render(Meaning("counting", (ObjectSpec("green", "triangle"),), count=3), rng)
    assert not check(three_img, two).constraints["count"]
