"""The distribution aligner: hand-checked routings and the guarantees G1-G5 of
``services/controller/aligner.py`` on seeded random instances."""

from __future__ import annotations

import random

import numpy as np
import pytest
from scipy.optimize import linprog

from services.controller.aligner import (
    align,
    fallback_row,
    min_promotion_distance,
    promotion_distance,
    routed_load,
)

TOL = 1e-9


def approx_rows(p: list[list[float]], expected: list[list[float]]) -> None:
    assert np.allclose(np.array(p), np.array(expected), atol=1e-12), p


def test_identity_when_capacity_matches_the_mix() -> None:
    approx_rows(align([0.5, 0.5], [0.5, 0.5]), [[1, 0], [0, 1]])


def test_excess_is_demoted_to_the_less_approximate_tier() -> None:
    # 0.8 want tier 1 but it holds 0.4: half of them go to tier 0, losslessly.
    approx_rows(align([0.2, 0.8], [0.6, 0.4]), [[1, 0], [0.5, 0.5]])


def test_spare_capacity_never_pulls_prompts_up_when_all_fit_losslessly() -> None:
    # The artifact's ODA would fill tier 1's spare with exact prompts; we do not.
    approx_rows(align([1.0, 0.0], [1.0, 1.0]), [[1, 0], [0, 1]])
    # Half of the tier-2 prompts fit there; the rest is demoted one tier, tier 0 idles.
    approx_rows(align([0.0, 0.0, 1.0], [0.5, 0.5, 0.5]), [[1, 0, 0], [0, 1, 0], [0, 0.5, 0.5]])


def test_overflow_uses_the_least_approximate_spare_tier() -> None:
    # Tier 0 overflows by 0.1; tier 1 (one step up) absorbs it, tier 2 stays idle.
    p = align([0.6, 0.2, 0.0], [0.5, 0.3, 0.2])
    approx_rows(p, [[0.5 / 0.6, 0.1 / 0.6, 0], [0, 1, 0], [0, 0, 1]])


def test_spare_tier_pulls_the_nearest_prompts_first() -> None:
    # Tier 2 has room only for promoted prompts: class 1 (one step) moves up and
    # class 0's overflow takes its place at tier 1, rather than class 0 jumping two.
    p = align([0.5, 0.5, 0.0], [0.4, 0.5, 0.1])
    approx_rows(p, [[0.8, 0.2, 0], [0, 0.8, 0.2], [0, 0, 1]])
    assert promotion_distance([0.5, 0.5, 0.0], p) == pytest.approx(0.2)


def test_overload_spreads_in_proportion_to_capacity() -> None:
    h, f = [1.0, 1.0], [0.5, 0.5]  # capacity is half the demand
    p = align(h, f)
    assert routed_load(h, p) == pytest.approx([1.0, 1.0])
    approx_rows(p, [[1, 0], [0, 1]])


def test_rows_without_demand_go_to_the_nearest_tier_with_capacity() -> None:
    assert fallback_row(2, [1.0, 0.0, 0.0, 1.0]) == [1.0, 0.0, 0.0, 0.0]
    assert fallback_row(1, [0.0, 0.0, 1.0]) == [0.0, 0.0, 1.0]
    assert fallback_row(1, [0.0, 0.0, 0.0]) == [0.0, 1.0, 0.0]
    approx_rows(align([0.0, 0.0], [1.0, 1.0]), [[1, 0], [0, 1]])
    approx_rows(align([1.0, 0.0, 0.0], [0.0, 1.0, 0.0]), [[0, 1, 0], [0, 1, 0], [0, 1, 0]])
    approx_rows(align([1.0, 1.0], [0.0, 0.0]), [[1, 0], [0, 1]])


@pytest.mark.parametrize(("mix", "cap"), [([1.0], [1.0, 2.0]), ([], []), ([-1.0], [1.0]),
                                          ([float("nan")], [1.0])])
def test_invalid_inputs_raise(mix: list[float], cap: list[float]) -> None:
    with pytest.raises(ValueError):
        align(mix, cap)


def random_instances(count: int, seed: int = 7) -> list[tuple[list[float], list[float]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        k = rng.randint(1, 8)
        h = [rng.choice([0.0, rng.random()]) for _ in range(k)]
        f = [rng.choice([0.0, rng.random()]) for _ in range(k)]
        if sum(f) > 0 and rng.random() < 0.5:  # often exactly matched, over or under
            s = sum(h) / sum(f) * rng.choice([1.0, 1.3, 0.7])
            f = [v * s for v in f]
        out.append((h, f))
    return out


def effective(h: list[float], f: list[float]) -> list[float]:
    """Capacity as G2 states it: scaled up to the demand under overload."""
    return f if sum(f) >= sum(h) or sum(f) == 0 else [v * sum(h) / sum(f) for v in f]


def check_guarantees(h: list[float], f: list[float]) -> None:
    p = align(h, f)
    k = len(h)
    for row in p:  # G1
        assert min(row) >= 0 and sum(row) == pytest.approx(1.0, abs=TOL), (h, f, p)
    if sum(h) == 0 or sum(f) == 0:
        return
    cap = effective(h, f)
    load = routed_load(h, p)
    assert all(load[j] <= cap[j] + TOL for j in range(k)), (h, f, p)  # G2
    full = [load[t] >= cap[t] - TOL for t in range(k)]
    for i in range(k):
        if h[i] == 0:
            continue
        if any(p[i][j] > TOL for j in range(i + 1, k)):  # G3
            assert all(full[: i + 1]), (h, f, p)
        if p[i][i] < 1 - TOL:  # G5
            assert full[i], (h, f, p)
    assert promotion_distance(h, p) == pytest.approx(min_promotion_distance(h, f),
                                                     abs=TOL), (h, f, p)  # G4


def test_guarantees_g1_to_g5_on_random_instances() -> None:
    for h, f in random_instances(3000):
        check_guarantees(h, f)


@pytest.mark.parametrize(("h", "f"), random_instances(40, seed=11))
def test_g4_bound_is_the_true_optimum(h: list[float], f: list[float]) -> None:
    """The closed-form G4 bound equals the LP minimum over capacity-respecting routings."""
    if sum(h) == 0 or sum(f) == 0:
        return
    k, cap = len(h), effective(h, f)
    cost = [max(0, j - i) for i in range(k) for j in range(k)]
    a_eq = [[1.0 if v // k == i else 0.0 for v in range(k * k)] for i in range(k)]
    a_ub = [[1.0 if v % k == j else 0.0 for v in range(k * k)] for j in range(k)]
    res = linprog(cost, A_ub=a_ub, b_ub=[c + 1e-12 for c in cap], A_eq=a_eq, b_eq=h,
                  method="highs")
    assert res.status == 0
    assert min_promotion_distance(h, f) == pytest.approx(res.fun, abs=1e-7)
