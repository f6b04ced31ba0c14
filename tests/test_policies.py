"""Every system policy, both sides, as pure functions: plans are well formed (routing rows
sum to 1, GPUs sum to the live workers), baselines behave as their sources say."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import yaml

from common.messages import AllocationPlan, OverloadEstimate, PromptJob, WorkerHeartbeat
from common.settings import ClassifierSettings, ControllerSettings
from common.tiers import Registry, load_registry
from services.classifier import policies as cpol
from services.classifier.baselines import CascadePolicy, NirvanaPolicy, cache_tier, rank_draw
from services.classifier.deadline import charge, decide
from services.classifier.policies import Decision, FixedPolicy, route
from services.controller import policies as kpol
from services.controller.allocators import cascade_split, proportional_split
from services.controller.overload import estimate, queue_delays, tier_capacity
from services.controller.policies import Observation, clean_routing, make_policy


def write_tiers(path: Path, latency: list[dict[int, float]], quality: list[float] | None,
                strategies: list[str] | None = None, skips: list[int] | None = None,
                steps: int = 20) -> Path:
    """A registry with one tier per latency profile (device ``cpu``), same model."""
    tiers: list[dict[str, Any]] = []
    for k, lat in enumerate(latency):
        strategy = strategies[k] if strategies else ("exact" if k == 0 else "steps")
        tier: dict[str, Any] = {
            "id": k, "name": f"t{k}", "strategy": strategy, "model": "m",
            "steps": steps if strategy != "steps" else max(1, steps - 5 * k),
            "batch_sizes": sorted(lat), "latency": {"cpu": lat}}
        if skips:
            tier["skip"] = skips[k]
        if quality is not None:
            tier["quality"] = quality[k]
        tiers.append(tier)
    path.write_text(yaml.safe_dump({"name": "t", "device": "cpu", "tiers": tiers}))
    return path


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return load_registry(write_tiers(
        tmp_path / "t.yaml", [{1: 1.0, 2: 1.6}, {1: 0.5, 2: 0.8}, {1: 0.25, 2: 0.4}],
        [1.0, 0.95, 0.85]))


def _workers(n: int) -> list[WorkerHeartbeat]:
    return [WorkerHeartbeat(instance=f"w{i}") for i in range(n)]


def test_policy_names_match_on_both_sides() -> None:
    assert set(cpol.POLICIES) == set(kpol.POLICIES)


@pytest.mark.parametrize("name", sorted(kpol.POLICIES))
def test_every_policy_plans_well_formed(name: str, registry: Registry, tmp_path: Path) -> None:
    rng = random.Random(name)
    settings = ControllerSettings(policy=name, quality_file=tmp_path / "none.csv")
    policy = make_policy(settings, registry)
    previous: AllocationPlan | None = None
    for _ in range(25):
        n = rng.randrange(0, 7)
        mix = {k: rng.random() for k in range(3) if rng.random() < 0.7}
        obs = Observation(_workers(n), demand=rng.uniform(0, 12), mix=mix)
        draft = policy.plan(obs, previous)
        assert sum(draft.gpus_per_tier.values()) == n
        assert sorted(draft.assignments) == [w.instance for w in obs.workers]
        assert set(draft.routing) == {0, 1, 2}
        for row in draft.routing.values():
            assert all(v > 0 for v in row.values())
            assert abs(sum(row.values()) - 1) < 1e-9
        if n and name not in ("nirvana",):  # served tiers have GPUs
            served = {j for row in draft.routing.values() for j in row}
            assert all(draft.gpus_per_tier[j] > 0 for j in served), (draft, name)
        previous = AllocationPlan(version=1, policy=name, assignments=draft.assignments,
                                  gpus_per_tier=draft.gpus_per_tier, routing=draft.routing)


def test_argus_moves_gpus_to_cheap_tiers_under_load(registry: Registry, tmp_path: Path) -> None:
    policy = make_policy(ControllerSettings(policy="argus", quality_file=tmp_path / "x"),
                         registry)
    low = policy.plan(Observation(_workers(4), demand=1.0, mix={0: 1.0}), None)
    assert low.gpus_per_tier == {0: 4, 1: 0, 2: 0} and low.routing[0] == {0: 1.0}
    high = policy.plan(Observation(_workers(4), demand=12.0, mix={0: 1.0}), None)
    assert high.gpus_per_tier[0] < 4 and high.unserved == 0
    assert high.detail["quality_source"] == "registry"
    assert high.detail["formulation"] == "flow"


def test_proteus_rows_identical_and_load_aware(registry: Registry) -> None:
    policy = make_policy(ControllerSettings(policy="proteus"), registry)
    draft = policy.plan(Observation(_workers(4), demand=10.0, mix={2: 1.0}), None)
    rows = list(draft.routing.values())
    assert all(r == rows[0] for r in rows) and len(rows[0]) >= 2
    assert draft.gpus_per_tier[0] < 4  # load-aware
    idle = policy.plan(Observation(_workers(4), demand=0.5, mix={2: 1.0}), None)
    assert idle.gpus_per_tier == {0: 4, 1: 0, 2: 0}  # prompt-agnostic: mix ignored


def test_nirvana_is_load_unaware(registry: Registry) -> None:
    policy = make_policy(ControllerSettings(policy="nirvana"), registry)
    mix = {0: 0.5, 2: 0.5}
    a = policy.plan(Observation(_workers(5), demand=0.1, mix=mix), None)
    b = policy.plan(Observation(_workers(5), demand=50.0, mix=mix), None)
    assert a.gpus_per_tier == b.gpus_per_tier
    # Work shares: tier 2 prompts cost a quarter of exact ones -> 4 : 1.
    assert a.gpus_per_tier == {0: 4, 1: 0, 2: 1}
    assert a.routing == {0: {0: 1.0}, 1: {0: 1.0}, 2: {2: 1.0}}


def test_cascade_split_hand_cases() -> None:
    # 4 GPUs, heavy 1 job/s, light 4 jobs/s. Load 2: two heavy GPUs serve it all (f = 1).
    c = cascade_split(4, 1.0, 4.0, 2.0)
    assert (c.heavy, c.light, c.deferral, c.unserved) == (4, 0, 1.0, 0.0)
    # Load 6: heavy h serves f*6 <= h, light (4-h)*4 >= (1-f)*6 -> h=3: f=0.5.
    c = cascade_split(4, 1.0, 4.0, 6.0)
    assert (c.heavy, c.light, c.deferral) == (3, 1, 0.5)
    # Overload: everything light, the rest unserved.
    c = cascade_split(4, 1.0, 4.0, 20.0)
    assert (c.heavy, c.light, c.deferral, c.unserved) == (0, 4, 0.0, 4.0)
    assert cascade_split(0, 1.0, 4.0, 0.0).heavy == 0


def test_diffserve_defers_least_confident(registry: Registry) -> None:
    policy = make_policy(ControllerSettings(policy="diffserve"), registry)
    draft = policy.plan(Observation(_workers(4), demand=6.0), None)
    f = draft.detail["deferral"]
    assert isinstance(f, float) and 0 < f < 1
    assert draft.routing[1] == {0: f, 2: pytest.approx(1 - f)}

    class Confidences:
        name = "c"

        def decide(self, jobs: list[PromptJob]) -> list[Decision]:
            return [Decision(0, [0.0, 0.0, float(j.prompt)]) for j in jobs]

    cascade = CascadePolicy(Confidences(), 3, window=100)
    jobs = [PromptJob(job_id=str(i), prompt=str(i / 100), seed=0) for i in range(100)]
    cascade.decide(jobs)  # fills the window
    out = cascade.decide(jobs)
    heavy = {j.prompt for j, d in zip(jobs, out, strict=True)
             if route(0, draft.routing, d.draw or 0.0) == 0}
    assert heavy == {str(i / 100) for i in range(round(100 * f))}
    assert rank_draw(0.5, [], 0.3) == 0.3 and rank_draw(2.0, [1.0], 0.0) < 1


def test_nirvana_classifier_maps_similarity_to_cache_tier(tmp_path: Path) -> None:
    reg = load_registry(write_tiers(
        tmp_path / "c.yaml", [{1: 1.0}, {1: 0.8}, {1: 0.6}], None,
        strategies=["exact", "cache", "cache"], skips=[0, 5, 10], steps=20))
    # 20 steps: 0.96 -> K 10, 0.80 -> K 4, 0.70 -> K 2.
    hits: list[Any] = [(0.96, [5, 10]), (0.96, [5]), (0.80, [4, 10]), (0.5, [10]), None]
    policy = NirvanaPolicy(lambda jobs: hits[:len(jobs)], reg)
    jobs = [PromptJob(job_id=str(i), prompt="p", seed=0) for i in range(5)]
    assert [d.predicted_tier for d in policy.decide(jobs)] == [2, 1, 0, 0, 0]
    assert cache_tier(7, [(5, 1), (10, 2)]) == 1
    with pytest.raises(cpol.PolicyError, match="nirvana"):
        cpol.make_policy(ClassifierSettings(policy="nirvana"), reg)


def test_classifier_side_of_each_policy(registry: Registry) -> None:
    def tier_of(name: str) -> int:
        p = cpol.make_policy(ClassifierSettings(policy=name, fixed_tier=1), registry)
        return p.decide([PromptJob(job_id="j", prompt="p", seed=0)])[0].predicted_tier

    assert [tier_of(n) for n in ("static", "clipper-ha", "clipper-ht", "argus")] == [1, 0, 2, 1]
    assert isinstance(cpol.make_policy(ClassifierSettings(policy="argus"), registry),
                      FixedPolicy)


def test_helpers() -> None:
    assert proportional_split(5, [0.5, 0.0, 0.125]) == [4, 0, 1]
    assert proportional_split(3, [0, 0]) == [3, 0]
    assert sum(proportional_split(7, [0.3, 0.3, 0.4])) == 7
    rows = clean_routing({0: {0: 0.333333, 1: 0.666667, 2: 1e-9}, 1: {}})
    assert rows[0].keys() == {0, 1} and abs(sum(rows[0].values()) - 1) < 1e-12
    assert rows[1] == {1: 1.0}
    cap = tier_capacity({0: 2, 1: 0}, {0: 1.25, 1: 5.0})
    assert cap == {0: 2.5, 1: 0.0} and queue_delays({0: 5, 1: 3}, cap) == {0: 2.0}


def test_overload_estimate_and_retry_after() -> None:
    e = estimate(waiting=30, capacity_total=3.0, unserved=0.0, drain_horizon_s=60)
    assert (e.overloaded, e.delay_s) == (False, 10.0)
    e = estimate(waiting=30, capacity_total=3.0, unserved=0.5, drain_horizon_s=60)
    assert e.overloaded and e.retry_after(5.0) == 10 and e.retry_after(10.0) is None
    assert estimate(10, 0.0, 0.0, 60).overloaded  # jobs wait, nothing serves them
    assert OverloadEstimate(overloaded=True, delay_s=0.2).retry_after(0.1) == 1
    assert OverloadEstimate(overloaded=False, delay_s=99).retry_after(1) is None


def test_deadline_verdicts() -> None:
    wait, service = {0: 8.0, 1: 1.0, 2: 0.0}, {0: 2.0, 1: 1.0, 2: 0.5}
    assert decide(0, 100.0, None, wait, service, "degrade").action == "ok"
    assert decide(0, 100.0, 111.0, wait, service, "degrade").action == "ok"
    v = decide(0, 100.0, 105.0, wait, service, "degrade")
    assert (v.tier, v.action) == (1, "degraded")  # least approximate that meets it
    v = decide(0, 100.0, 100.2, wait, service, "degrade")
    assert (v.tier, v.action) == (2, "degraded")  # none meets it: the fastest cheaper one
    v = decide(2, 100.0, 100.2, wait, service, "degrade")
    assert (v.tier, v.action) == (2, "late")  # nothing cheaper: kept, never dropped
    assert decide(0, 100.0, 105.0, {}, service, "degrade").action == "ok"  # no estimate
    assert decide(0, 100.0, 105.0, wait, service, "expire").action == "expire"
    assert decide(1, 100.0, 105.0, wait, service, "expire").action == "ok"
    assert decide(1, 100.0, 99.0, {}, service, "expire").action == "expire"


def test_routed_jobs_are_charged_so_degrades_do_not_herd() -> None:
    """Ten jobs late at tier 0 in one control period: charging each routed job to its
    tier's estimate spreads them over tiers 1 and 2 instead of all onto tier 1."""
    wait, service, gpus = {0: 8.0, 1: 0.0, 2: 0.0}, {0: 2.0, 1: 1.0, 2: 0.5}, {0: 2, 1: 1, 2: 1}
    assert charge(wait, 1, service, gpus) == {0: 8.0, 1: 1.0, 2: 0.0} and wait[1] == 0.0
    assert charge(wait, 0, service, {}) == wait  # no GPUs known: unchanged
    tiers = []
    for _ in range(10):
        v = decide(0, 100.0, 103.0, wait, service, "degrade")
        tiers.append(v.tier)
        wait = charge(wait, v.tier, service, gpus)
    assert tiers[:2] == [1, 1] and 2 in tiers and tiers.count(1) < 10
