"""The allocation MILP, both formulations, on hand-checked cases and seeded random ones."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import numpy as np
import pytest
from scipy.optimize import OptimizeResult

import services.controller.solver as solver_mod
from common.tiers import Registry
from services.controller.solver import (
    FORMULATIONS,
    Formulation,
    Problem,
    Solution,
    SolverConfig,
    TierSpec,
    default_prompt_quality,
    solve,
    specs_from_registry,
)

EXACT = SolverConfig(headroom=0.0)  # hand numbers without headroom


def two_tiers(cheap_quality: float = 0.9, cheap_model: str = "A") -> list[TierSpec]:
    """Exact: 1 job/s per GPU; cheap: 2 jobs/s per GPU."""
    return [TierSpec(0, 1.0, 1.0, "A"), TierSpec(1, 2.0, cheap_quality, cheap_model)]


def check_invariants(p: Problem, s: Solution, cfg: SolverConfig = EXACT) -> None:
    assert s.status == "optimal"
    assert sum(s.gpus_per_tier.values()) == p.gpus
    assert set(s.routing) == {t.id for t in p.specs}
    for row in s.routing.values():
        assert all(v > 0 for v in row.values())
        assert sum(row.values()) == pytest.approx(1.0, abs=1e-9)
    for t in p.specs:
        cap = t.capacity_per_gpu * (1 - cfg.headroom) * s.gpus_per_tier[t.id]
        assert s.served[t.id] <= cap + 1e-6
    assert sum(s.served.values()) + s.unserved == pytest.approx(p.load, abs=1e-6)


both = pytest.mark.parametrize("form", FORMULATIONS)


@both
def test_light_load_keeps_every_gpu_exact(form: Formulation) -> None:
    p = Problem(two_tiers(), gpus=4, load=3.0, mix={0: 0.5, 1: 0.5})
    s = solve(p, form, EXACT)
    check_invariants(p, s)
    assert s.gpus_per_tier == {0: 4, 1: 0}
    assert s.unserved == 0.0
    assert s.routing == {0: {0: 1.0}, 1: {0: 1.0}}
    assert s.expected_quality == pytest.approx(1.0)


@both
@pytest.mark.parametrize(("load", "cheap_gpus"), [(4.0, 0), (4.5, 1), (5.0, 1), (5.5, 2),
                                                  (6.0, 2), (7.0, 3), (8.0, 4)])
def test_only_as_many_cheap_gpus_as_the_load_needs(form: Formulation, load: float,
                                                   cheap_gpus: int) -> None:
    # 4 GPUs, exact 1 job/s, cheap 2 jobs/s: capacity 4 + n_cheap.
    p = Problem(two_tiers(), gpus=4, load=load, mix={0: 1.0})
    s = solve(p, form, EXACT)
    check_invariants(p, s)
    assert s.gpus_per_tier == {0: 4 - cheap_gpus, 1: cheap_gpus}
    assert s.unserved == 0.0
    exact_served = min(load, 4 - cheap_gpus)
    assert s.served[0] == pytest.approx(exact_served)
    assert s.expected_quality == pytest.approx((exact_served + 0.9 * (load - exact_served))
                                               / load)


@both
def test_headroom_reserves_capacity(form: Formulation) -> None:
    # With 10 % headroom: 0.9 and 1.8 jobs/s; 5 jobs/s needs 2 cheap GPUs, not 1.
    p = Problem(two_tiers(), gpus=4, load=5.0, mix={0: 1.0})
    cfg = SolverConfig(headroom=0.1)
    s = solve(p, form, cfg)
    check_invariants(p, s, cfg)
    assert s.gpus_per_tier == {0: 2, 1: 2}


@both
def test_overload_leaves_exactly_the_excess_unserved(form: Formulation) -> None:
    p = Problem(two_tiers(), gpus=4, load=10.0, mix={0: 0.3, 1: 0.7})
    s = solve(p, form, EXACT)
    check_invariants(p, s)
    assert s.gpus_per_tier == {0: 0, 1: 4}
    assert s.unserved == pytest.approx(10.0 - 8.0)
    assert s.routing == {0: {1: 1.0}, 1: {1: 1.0}}


@both
def test_unserved_only_when_the_fastest_allocation_cannot_keep_up(form: Formulation) -> None:
    # Huge switch cost to the fast model: the load still wins (throughput first).
    p = Problem(two_tiers(cheap_model="B"), gpus=4, load=5.0, mix={0: 1.0},
                current={0: 4}, load_time_s={"B": 1e6})
    s = solve(p, form, SolverConfig(headroom=0.0, switch_weight=100.0))
    assert s.unserved == 0.0 and s.gpus_per_tier == {0: 3, 1: 1} and s.model_loads == 1


@both
def test_no_gpus_and_no_load_are_handled(form: Formulation) -> None:
    p = Problem(two_tiers(), gpus=0, load=3.0, mix={0: 0.5, 1: 0.5})
    s = solve(p, form, EXACT)
    assert s.status == "optimal" and s.gpus_per_tier == {0: 0, 1: 0}
    assert s.unserved == 3.0 and sum(s.served.values()) == 0.0
    assert s.routing == {0: {0: 1.0}, 1: {1: 1.0}}
    p = Problem(two_tiers(), gpus=4, load=0.0)
    s = solve(p, form, EXACT)
    check_invariants(p, s)
    assert s.gpus_per_tier == {0: 4, 1: 0} and s.unserved == 0.0
    s = solve(Problem(two_tiers(), gpus=0, load=0.0), form, EXACT)
    assert s.unserved == 0.0 and s.gpus_per_tier == {0: 0, 1: 0}


SWITCH = SolverConfig(headroom=0.0, switch_horizon_s=60.0, hysteresis=0.02)


def switch_case(cheap_quality: float, cheap_model: str, load_time: float) -> Problem:
    """3 exact + 1 cheap GPU, 3.5 jobs/s of exact prompts: moving the cheap GPU to the
    exact tier gains 0.5 * (1 - q_cheap); it costs hysteresis 0.02 * 2 = 0.04 plus,
    across models, load_time / 60 * 1.0 (one exact GPU's value while it loads)."""
    return Problem(two_tiers(cheap_quality, cheap_model), gpus=4, load=3.5, mix={0: 1.0},
                   current={0: 3, 1: 1}, load_time_s={"A": load_time, "B": load_time})


@both
@pytest.mark.parametrize(("q", "model", "load_time", "moves"), [
    (0.9, "B", 5.0, False),   # gain 0.05 < 0.04 + 0.083: stays
    (0.5, "B", 5.0, True),    # gain 0.25 > 0.123: moves
    (0.5, "B", 60.0, False),  # gain 0.25 < 0.04 + 1.0: stays
    (0.1, "B", 60.0, False),  # gain 0.45 < 0.04 + 1.0: stays
    (0.1, "B", 20.0, True),   # gain 0.45 > 0.04 + 0.33: moves
    (0.9, "A", 60.0, True),   # same model: no load cost, gain 0.05 > 0.04: moves
    (0.97, "A", 60.0, False),  # same model, gain 0.015 < hysteresis 0.04: stays
])
def test_switch_cost_and_hysteresis(form: Formulation, q: float, model: str,
                                    load_time: float, moves: bool) -> None:
    p = switch_case(q, model, load_time)
    s = solve(p, form, SWITCH)
    check_invariants(p, s, SWITCH)
    assert s.gpus_per_tier == ({0: 4, 1: 0} if moves else {0: 3, 1: 1})
    assert s.tier_moves == int(moves)
    assert s.model_loads == int(moves and model == "B")
    gain = 0.5 * (1 - q)
    cost = 0.04 + (load_time / 60 if model == "B" else 0.0)
    base = 3.0 + 0.5 * q
    assert s.objective == pytest.approx(base + gain - cost if moves else base)


def test_loaded_models_override_the_current_tiers() -> None:
    # The cheap-tier GPU still holds model A: moving it back is free of load cost.
    p = dataclasses.replace(switch_case(0.5, "B", 60.0), loaded_models={"A": 4, "B": 1})
    assert solve(p, "argus", SWITCH).gpus_per_tier == {0: 4, 1: 0}


@both
def test_hysteresis_keeps_near_ties_where_they_are(form: Formulation) -> None:
    # Tiers 1 and 2: same model and speed, tier 2 better by 0.01 (gain 0.02 < 0.04).
    specs = [TierSpec(0, 1.0, 1.0, "A"), TierSpec(1, 2.0, 0.90, "A"),
             TierSpec(2, 2.0, 0.91, "A")]
    cfg = SolverConfig(headroom=0.0, hysteresis=0.02)
    for current in ({0: 3, 1: 1}, {0: 3, 2: 1}):
        p = Problem(specs, gpus=4, load=5.0, mix={0: 1.0}, current=current)
        assert solve(p, form, cfg).gpus_per_tier == {0: 3, 1: 0, 2: 0, **current}
    p = Problem(specs, gpus=4, load=5.0, mix={0: 1.0}, current={0: 3, 1: 1})
    free = SolverConfig(headroom=0.0, hysteresis=0.0)
    assert solve(p, form, free).gpus_per_tier == {0: 3, 1: 0, 2: 1}


def random_problem(rng: random.Random, gpus: int, tiers: int) -> Problem:
    cap, q, specs = 1.0, 1.0, []
    for k in range(tiers):
        specs.append(TierSpec(k, cap, q, rng.choice(["A", "B"]) if k else "A"))
        cap *= rng.uniform(1.05, 1.5)
        q -= rng.uniform(0.01, 0.08)
    mix = [rng.random() ** 2 for _ in range(tiers)]
    current = [0] * tiers
    for _ in range(gpus):
        current[rng.randrange(tiers)] += 1
    return Problem(specs, gpus=gpus, load=rng.uniform(0.3, 1.2) * gpus * cap / 1.2,
                   mix=dict(enumerate(mix)), current=dict(enumerate(current)),
                   load_time_s={"A": 30.0, "B": 10.0})


CASES = [random_problem(random.Random(seed), random.Random(seed).choice([4, 8, 16]),
                        random.Random(seed + 1).choice([2, 3, 6])) for seed in range(30)]


@both
@pytest.mark.parametrize("p", CASES)
def test_random_plans_are_consistent_and_stable(form: Formulation, p: Problem) -> None:
    cfg = SolverConfig()
    s = solve(p, form, cfg)
    check_invariants(p, s, cfg)
    # Never promote a prompt while a tier at or below its predicted tier has room.
    caps = {t.id: t.capacity_per_gpu * 0.9 * s.gpus_per_tier[t.id] for t in p.specs}
    full = {j: s.served[j] >= caps[j] - 1e-6 for j in caps}
    for i, row in s.routing.items():
        if p.mix.get(i, 0) > 0 and any(j > i for j in row):
            assert all(full[t] for t in range(i + 1)), (i, row, s)
    # Re-solving with the plan as the current one changes nothing (no flapping).
    again = solve(dataclasses.replace(p, current=s.gpus_per_tier), form, cfg)
    assert again.gpus_per_tier == s.gpus_per_tier
    assert again.tier_moves == 0 and again.model_loads == 0
    assert again.expected_quality == pytest.approx(s.expected_quality, abs=1e-6)


def test_prompt_aware_flow_beats_the_published_formulation() -> None:
    """Half the prompts need the exact tier, half tolerate the most approximate one.
    Argus as published picks by tier-mean quality: 2 exact + 2 middle GPUs (value
    2 + 3 * 0.97 = 4.91 beats 3 exact + 1 cheap, 3 + 2 * 0.9 = 4.8), and its aligner must
    then promote 0.5 jobs/s of exact prompts. The flow sees that the cheap tier is
    lossless for half the load: 3 exact + 1 cheap serves everyone losslessly."""
    specs = [TierSpec(0, 1.0, 1.0, "A"), TierSpec(1, 1.5, 0.97, "A"), TierSpec(2, 2.0, 0.9, "A")]
    p = Problem(specs, gpus=4, load=5.0, mix={0: 0.5, 2: 0.5})
    published, flow = solve(p, "argus", EXACT), solve(p, "flow", EXACT)
    check_invariants(p, published)
    check_invariants(p, flow)
    assert published.gpus_per_tier == {0: 2, 1: 2, 2: 0}
    assert published.expected_quality == pytest.approx(0.5 * (0.8 + 0.2 * 0.97) + 0.5)
    assert flow.gpus_per_tier == {0: 3, 1: 0, 2: 1}
    assert flow.expected_quality == pytest.approx(1.0)
    assert flow.routing == {0: {0: 1.0}, 1: {0: 1.0}, 2: {0: pytest.approx(0.2),
                                                         2: pytest.approx(0.8)}}


def test_flow_is_never_worse_on_random_cases() -> None:
    for p in CASES:
        cfg = SolverConfig(hysteresis=0.0, switch_weight=0.0)
        a, f = solve(p, "argus", cfg), solve(p, "flow", cfg)
        assert f.expected_quality >= a.expected_quality - 1e-6


def test_default_prompt_quality() -> None:
    q = default_prompt_quality(two_tiers(0.8))
    assert q == [[1.0, 0.8], [1.0, 1.0]]


def test_fallback_when_highs_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    def failed(*args: Any, **kwargs: Any) -> OptimizeResult:
        return OptimizeResult(status=1, x=None, message="Time limit reached.")

    monkeypatch.setattr(solver_mod, "milp", failed)
    p = Problem(two_tiers(), gpus=4, load=5.0, mix={0: 1.0}, current={0: 1, 1: 3})
    s = solve(p, "flow", EXACT)
    assert s.status.startswith("fallback") and s.gpus_per_tier == {0: 1, 1: 3}
    s = solve(dataclasses.replace(p, current={}), "argus", EXACT)
    assert s.gpus_per_tier == {0: 0, 1: 4}
    assert sum(sum(r.values()) for r in s.routing.values()) == pytest.approx(2.0)


@pytest.mark.parametrize("bad", [
    {"specs": [TierSpec(1, 1.0, 1.0, "A")]},
    {"specs": [TierSpec(0, 0.0, 1.0, "A")]},
    {"gpus": -1}, {"load": -1.0}, {"load": float("inf")},
    {"mix": {0: -0.5}}, {"prompt_quality": [[1.0]]},
])
def test_invalid_problems_raise(bad: dict[str, Any]) -> None:
    p = dataclasses.replace(Problem(two_tiers(), gpus=2, load=1.0), **bad)
    with pytest.raises(ValueError):
        solve(p, "flow")
    with pytest.raises(ValueError):
        solve(Problem(two_tiers(), gpus=2, load=1.0), "nope")  # type: ignore[arg-type]


def test_specs_from_registry() -> None:
    reg = Registry.model_validate({"name": "t", "device": "gpu", "tiers": [
        {"id": 0, "name": "exact", "strategy": "exact", "model": "m", "steps": 20,
         "batch_sizes": [1, 4], "latency": {"gpu": {1: 0.5, 4: 1.0}}},
        {"id": 1, "name": "s10", "strategy": "steps", "model": "m", "steps": 10,
         "batch_sizes": [1, 2], "latency": {"gpu": {1: 0.25, 2: 0.4}}},
    ]})
    specs = specs_from_registry(reg, "gpu", {0: 1.0, 1: 0.9})
    assert specs == [TierSpec(0, 4.0, 1.0, "m"), TierSpec(1, 5.0, 0.9, "m")]
    specs = specs_from_registry(reg, "gpu", {0: 1.0, 1: 0.9}, batch=1)
    assert [s.capacity_per_gpu for s in specs] == [2.0, 4.0]
    assert specs_from_registry(reg, "gpu", {0: 1, 1: 1}, batch=8)[0].capacity_per_gpu == 4.0
    with pytest.raises(ValueError, match="no latency profile"):
        specs_from_registry(reg, "cpu", {0: 1.0, 1: 0.9})
    with pytest.raises(ValueError, match="no quality"):
        specs_from_registry(reg, "gpu", {0: 1.0})
    with pytest.raises(ValueError):
        specs_from_registry(reg, "gpu", {0: 1.0, 1: 0.9}, batch=0)


def test_solution_values_are_plain_python() -> None:
    s = solve(Problem(two_tiers(), gpus=3, load=2.0, mix={0: 1.0}), "flow", EXACT)
    assert all(type(v) is int for v in s.gpus_per_tier.values())
    assert isinstance(s.objective, float) and not isinstance(s.objective, np.floating)
