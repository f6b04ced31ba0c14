"""Controller: pure assignment/policy tests, and the reconcile loop against real Redis."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from common import keys
from common.heartbeat import beat
from common.messages import AllocationPlan, WorkerHeartbeat
from common.plans import read_plan
from common.settings import ControllerSettings
from common.tiers import load_registry
from services.controller.__main__ import main
from services.controller.policies import (
    Draft,
    Observation,
    PolicyError,
    StaticPolicy,
    assign,
    make_policy,
    plan_changed,
)
from services.controller.service import Controller, run
from tests.tinysd import write_registry


def test_assign_keeps_workers_in_place() -> None:
    prev = {"a": 0, "b": 0, "c": 1, "gone": 1}
    # Same targets: nobody moves; a dead worker's slot goes to the newcomer.
    assert assign(["a", "b", "c", "d"], {0: 2, 1: 2}, prev) == {
        "a": 0, "b": 0, "c": 1, "d": 1}
    # One GPU moves from tier 0 to tier 2: exactly one worker is reassigned.
    out = assign(["a", "b", "c"], {0: 1, 1: 1, 2: 1}, prev)
    assert out == {"a": 0, "c": 1, "b": 2}
    assert sum(out[w] != prev[w] for w in out) == 1
    # Fewer slots than workers: the extra worker is idle (absent).
    assert assign(["a", "b", "c"], {0: 2}, prev) == {"a": 0, "b": 0}
    # More slots than workers: lowest tiers are filled first.
    assert assign(["x"], {1: 1, 0: 1}, {}) == {"x": 0}
    assert assign([], {0: 3}, prev) == {}


def test_assign_moves_the_minimum() -> None:
    import random

    rng = random.Random(0)
    workers = [f"w{i}" for i in range(6)]
    for _ in range(200):
        prev = {w: rng.randrange(3) for w in workers if rng.random() < 0.8}
        cuts = sorted(rng.randrange(7) for _ in range(2))
        target = {0: cuts[0], 1: cuts[1] - cuts[0], 2: 6 - cuts[1]}
        out = assign(workers, target, prev)
        assert sorted(out) == workers and all(
            sum(1 for k in out.values() if k == t) == n for t, n in target.items())
        kept = sum(out[w] == prev.get(w) for w in workers)
        best = sum(min(sum(1 for k in prev.values() if k == t), n) for t, n in target.items())
        assert kept == best


def test_static_policy_and_change_detection(tmp_path: Path) -> None:
    registry = load_registry(write_registry(tmp_path / "t.yaml", "m"))
    policy = make_policy(ControllerSettings(static_tier=1), registry)
    workers = [WorkerHeartbeat(instance=n) for n in ("b", "a")]
    draft = policy.plan(Observation(workers), None)
    assert draft.gpus_per_tier == {0: 0, 1: 2} and draft.assignments == {"a": 1, "b": 1}
    assert draft.routing == {0: {1: 1.0}, 1: {1: 1.0}}
    plan = AllocationPlan(version=3, policy="static", assignments=draft.assignments,
                          gpus_per_tier=draft.gpus_per_tier, routing=draft.routing)
    assert plan_changed(None, draft) and not plan_changed(plan, draft)
    assert plan_changed(plan, Draft(draft.gpus_per_tier, {"a": 1}, draft.routing))
    assert plan_changed(plan, Draft(draft.gpus_per_tier, draft.assignments, {}))
    with pytest.raises(PolicyError, match="static tier 5"):
        StaticPolicy(5, 2)
    with pytest.raises(PolicyError, match="unknown policy 'nope'"):
        make_policy(ControllerSettings(policy="nope"), registry)
    with pytest.raises(PolicyError, match="needs latency profiles"):
        make_policy(ControllerSettings(policy="argus"), registry)


async def _live(redis: aioredis.Redis, *names: str) -> None:
    for n in names:
        await beat(redis, "worker", n, WorkerHeartbeat(instance=n), ttl_s=10)


async def test_plan_versions_increment_only_on_change(
        aredis: aioredis.Redis, redis_url: str, tmp_path: Path) -> None:
    tiers = write_registry(tmp_path / "t.yaml", "m")
    cfg = ControllerSettings(redis_url=redis_url, tiers_file=tiers, instance="ctl")
    registry = load_registry(tiers)
    controller = Controller(cfg, aredis, registry, make_policy(cfg, registry))
    pubsub = aredis.pubsub()
    await pubsub.subscribe(keys.ALLOC_UPDATES)
    await _live(aredis, "w1", "w2")
    first = await controller.step()
    assert first is not None and first.version == 1
    assert first.assignments == {"w1": 0, "w2": 0} and first.gpus_per_tier == {0: 2, 1: 0}
    assert await controller.step() is None  # nothing changed: nothing published
    await _live(aredis, "w3")
    second = await controller.step()
    assert second is not None and second.version == 2 and len(second.assignments) == 3
    assert await read_plan(aredis) == second
    await aredis.delete(keys.heartbeat_key("worker", "w1"))
    assert (await controller.step()).assignments == {"w2": 0, "w3": 0}  # type: ignore[union-attr]
    versions: list[int] = []
    deadline = time.monotonic() + 1
    while time.monotonic() < deadline and len(versions) < 3:
        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.05)
        if msg is not None:
            versions.append(AllocationPlan.model_validate_json(msg["data"]).version)
    await pubsub.aclose()  # type: ignore[no-untyped-call]
    assert versions == [1, 2, 3]
    # A restarted controller continues from the stored version.
    fresh = Controller(cfg, aredis, registry, make_policy(cfg, registry))
    assert await fresh.step() is None
    await _live(aredis, "w4")
    assert (await fresh.step()).version == 4  # type: ignore[union-attr]


async def test_loop_survives_exceptions(
        aredis: aioredis.Redis, redis_url: str, tmp_path: Path) -> None:
    tiers = write_registry(tmp_path / "t.yaml", "m")
    cfg = ControllerSettings(redis_url=redis_url, tiers_file=tiers, instance="ctl",
                             control_period_s=0.05, heartbeat_interval_s=0.05)
    await aredis.set(keys.ALLOC_CURRENT, b"{not a plan")  # every step raises meanwhile
    await _live(aredis, "w1")
    stop = asyncio.Event()
    task = asyncio.create_task(run(cfg, stop))
    await asyncio.sleep(0.3)
    assert not task.done()
    assert await aredis.get(keys.ALLOC_CURRENT) == b"{not a plan"
    await aredis.delete(keys.ALLOC_CURRENT)
    deadline = time.monotonic() + 5
    while (plan := await read_plan(aredis)) is None and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert plan is not None and plan.assignments == {"w1": 0}
    assert await aredis.exists(keys.heartbeat_key("controller", "ctl"))
    stop.set()
    await asyncio.wait_for(task, 5)
    assert not await aredis.exists(keys.heartbeat_key("controller", "ctl"))


def test_check_exit_code(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import redis

    from common.messages import ServiceHeartbeat

    monkeypatch.setenv("T2I_REDIS_URL", redis_url)
    assert main(["--check"]) == 1
    hb = ServiceHeartbeat(instance="x", service="controller").model_dump_json()
    redis.Redis.from_url(redis_url).set(keys.heartbeat_key("controller", "x"), hb, px=5000)
    assert main(["--check"]) == 0


async def test_services_together_serve_a_job(
        aredis: aioredis.Redis, redis_url: str, tmp_path: Path) -> None:
    """Controller, classifier and two workers as tasks: the plan reaches the workers and a
    job goes prompt stream -> classifier -> tier stream -> worker -> succeeded."""
    import uuid

    from common.jobs import JobStore
    from common.messages import PromptJob
    from common.settings import ClassifierSettings, WorkerSettings
    from services.classifier.service import run as run_classifier
    from services.worker.service import run as run_worker

    tiers = write_registry(tmp_path / "t.yaml", "m")
    common: dict[str, object] = {"redis_url": redis_url, "tiers_file": tiers,
                                 "heartbeat_interval_s": 0.05, "stream_block_ms": 100}
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(run(ControllerSettings.model_validate(
            {**common, "instance": "ctl", "static_tier": 1, "control_period_s": 0.05}), stop)),
        asyncio.create_task(run_classifier(ClassifierSettings.model_validate(
            {**common, "instance": "cls", "fixed_tier": 0}), stop)),
        *(asyncio.create_task(run_worker(WorkerSettings.model_validate(
            {**common, "instance": w, "backend": "emulated",
             "emulated_latency_scale": 0}), stop)) for w in ("w1", "w2")),
    ]
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            plan = await read_plan(aredis)
            if plan is not None and plan.assignments == {"w1": 1, "w2": 1}:
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("workers never assigned")
        store = JobStore(aredis)
        job = PromptJob(job_id=uuid.uuid4().hex, prompt="a cat", seed=1)
        await store.create(job)
        while time.monotonic() < deadline:
            rec = await store.get(job.job_id)
            if rec is not None and rec.status.terminal:
                break
            await asyncio.sleep(0.02)
        # Predicted exact by the fixed policy, served at tier 1 by the static routing.
        assert rec is not None and rec.status == "succeeded"
        assert (rec.predicted_tier, rec.tier) == (0, 1) and rec.worker in ("w1", "w2")
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert not await aredis.keys(keys.heartbeat_pattern("*"))


async def test_step_observes_load_mix_and_reports_overload(
        aredis: aioredis.Redis, redis_url: str, tmp_path: Path) -> None:
    """Arrivals and mix buckets are counted once and trimmed; the state and overload
    keys say what the solver decided; ``/v1/tiers`` and the gateway's 429 follow them."""
    from common.messages import ControllerState, OverloadEstimate
    from common.redisutil import aw
    from tests.test_gateway_support import error_of, gateway, settings_for
    from tests.test_policies import write_tiers

    reg = write_tiers(tmp_path / "t.yaml", [{1: 1.0, 2: 1.6}, {1: 0.25, 2: 0.4}], [1.0, 0.8])
    cfg = ControllerSettings(redis_url=redis_url, tiers_file=reg, instance="ctl",
                             policy="argus", quality_file=tmp_path / "none.csv",
                             control_period_s=1.0, drain_horizon_s=5.0)
    registry = load_registry(reg)
    controller = Controller(cfg, aredis, registry, make_policy(cfg, registry))
    await _live(aredis, "w1", "w2")
    second = int(time.time())
    await aw(aredis.hset(keys.ARRIVALS, mapping={
        str(second - 1000): 7, **{str(second - d): 10 for d in (1, 2, 3)}}))
    await aw(aredis.hset(keys.MIX, mapping={
        keys.mix_field(second - 1000, 1): 50, keys.mix_field(second - 2, 0): 3,
        keys.mix_field(second - 2, 1): 1}))
    controller.last_second = second - 4
    plan = await controller.step()
    assert plan is not None and plan.detail["quality_source"] == "registry"
    raw = await aredis.get(keys.CONTROLLER_STATE)
    state = ControllerState.model_validate_json(raw)
    # 30 arrivals in 3 s: 10 jobs/s, beyond 2 GPUs even at the cheap tier (2 x 4.5).
    assert state.arrival_rate == 10.0 and state.forecast == 10.0
    assert state.mix == {0: 0.75, 1: 0.25} and state.gpus_per_tier == {0: 0, 1: 2}
    assert state.unserved > 0 and state.overload.overloaded and state.formulation == "flow"
    assert state.solve_ms is not None and state.capacity == {1: 10.0}
    assert not await aw(aredis.hexists(keys.ARRIVALS, str(second - 1000)))  # trimmed
    assert not await aw(aredis.hexists(keys.MIX, keys.mix_field(second - 1000, 1)))
    assert await aredis.pttl(keys.OVERLOAD) > 0
    # The gateway refuses new jobs while the estimated delay exceeds the request's SLO.
    await aredis.set(keys.OVERLOAD, OverloadEstimate(
        overloaded=True, delay_s=12.2).model_dump_json(), px=5000)
    async with gateway(settings_for(redis_url)) as client:
        assert (await client.post("/v1/jobs", json={"prompt": "a"})).status_code == 202
        resp = await client.post("/v1/jobs", json={"prompt": "a", "slo_ms": 5000})
        assert resp.status_code == 429 and resp.headers["retry-after"] == "13"
        assert error_of(resp)["code"] == "overloaded"
        tiers = (await client.get("/v1/tiers")).json()
        assert tiers["controller"]["policy"] == "argus"
        assert tiers["controller"]["gpus_per_tier"] == {"0": 0, "1": 2}
