"""Classifier: pure policy and routing tests, and the service against real Redis."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from common import keys
from common.jobs import JobRecord, JobStore
from common.messages import AllocationPlan, ClassifiedJob, JobState, PromptJob, ServiceHeartbeat
from common.plans import publish_plan
from common.settings import ClassifierSettings
from common.tiers import load_registry
from services.classifier.__main__ import main
from services.classifier.policies import FixedPolicy, PolicyError, draw, make_policy, route
from services.classifier.service import run
from tests.tinysd import write_registry


def test_fixed_policy_and_factory(tmp_path: Path) -> None:
    registry = load_registry(write_registry(tmp_path / "t.yaml", "m"))
    policy = make_policy(ClassifierSettings(fixed_tier=1, policy="fixed"), registry)
    jobs = [PromptJob(job_id=str(i), prompt="p", seed=i) for i in range(3)]
    decisions = policy.decide(jobs)
    assert policy.name == "fixed"
    assert [(d.predicted_tier, d.probabilities) for d in decisions] == [(1, [0.0, 1.0])] * 3
    with pytest.raises(PolicyError, match="fixed tier 2"):
        FixedPolicy(2, 2)
    with pytest.raises(PolicyError, match="unknown policy 'nope'"):
        make_policy(ClassifierSettings(policy="nope"), registry)
    with pytest.raises(PolicyError, match="unknown predictor"):
        make_policy(ClassifierSettings(policy="argus", predictor="nope"), registry)


def test_route_follows_the_matrix() -> None:
    routing = {0: {0: 0.25, 2: 0.75}, 1: {}, 2: {1: 0.0, 2: 2.0}}
    assert route(0, routing, 0.0) == 0 and route(0, routing, 0.2499) == 0
    assert route(0, routing, 0.25) == 2 and route(0, routing, 0.9999999) == 2
    assert route(1, routing, 0.5) == 1  # empty row: identity
    assert route(3, routing, 0.5) == 3  # missing row: identity
    assert route(2, routing, 0.1) == 2  # unnormalised row, zero share never drawn
    draws = Counter(route(0, routing, draw(str(i), 1)) for i in range(4000))
    assert abs(draws[2] / 4000 - 0.75) < 0.03
    assert draw("job", 1) == draw("job", 1) != draw("job", 2)


@asynccontextmanager
async def classifier(cfg: ClassifierSettings) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(run(cfg, stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def create(redis: aioredis.Redis, prompt: str = "a cat") -> str:
    job = PromptJob(job_id=uuid.uuid4().hex, prompt=prompt, seed=1)
    await JobStore(redis).create(job)
    return job.job_id


async def state(redis: aioredis.Redis, job_id: str, want: JobState) -> JobRecord:
    store = JobStore(redis)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        rec = await store.get(job_id)
        if rec is not None and rec.status == want:
            return rec
        await asyncio.sleep(0.02)
    raise AssertionError(f"{job_id} never reached {want}")


async def tier_entries(redis: aioredis.Redis, tier: int) -> list[ClassifiedJob]:
    return [ClassifiedJob.from_fields(f) for _, f in await redis.xrange(keys.tier_stream(tier))]


async def test_service_routes_through_plan_and_skips_cancelled(
        aredis: aioredis.Redis, redis_url: str, tmp_path: Path) -> None:
    tiers = write_registry(tmp_path / "t.yaml", "m")
    cfg = ClassifierSettings(redis_url=redis_url, instance="c1", tiers_file=tiers,
                             fixed_tier=1, stream_block_ms=100, heartbeat_interval_s=0.1)
    cancelled = await create(aredis, "cancel me")
    await JobStore(aredis).request_cancel(cancelled)
    await aredis.xadd(keys.PROMPT_STREAM, {"data": b"not json"})
    async with classifier(cfg):
        first = await create(aredis)
        rec = await state(aredis, first, JobState.CLASSIFIED)
        assert (rec.tier, rec.predicted_tier, rec.probabilities) == (1, 1, [0.0, 1.0])
        # The controller routes every tier-1 prediction to tier 0.
        await publish_plan(aredis, AllocationPlan(version=1, policy="t",
                                                  routing={1: {0: 1.0}}))
        await asyncio.sleep(0.2)
        second = await create(aredis)
        rec = await state(aredis, second, JobState.CLASSIFIED)
        assert (rec.tier, rec.predicted_tier) == (0, 1)
        assert await aredis.exists(keys.heartbeat_key("classifier", "c1"))
    assert [j.job_id for j in await tier_entries(aredis, 1)] == [first]
    (routed,) = await tier_entries(aredis, 0)
    assert routed.job_id == second and routed.policy == "static" and routed.prompt == "a cat"
    assert (await JobStore(aredis).get(cancelled)).status == "cancelled"  # type: ignore[union-attr]
    info = await aredis.xpending(keys.PROMPT_STREAM, keys.CLASSIFIER_GROUP)
    assert info["pending"] == 0  # routed, skipped and bad entries are all acked
    (_, dead), = await aredis.xrange(keys.DEAD_LETTER_STREAM)
    assert dead[b"reason"] == b"undecodable" and b"not json" in dead[b"data"]
    assert not await aredis.exists(keys.heartbeat_key("classifier", "c1"))


async def test_dead_classifiers_entry_is_reclaimed(
        aredis: aioredis.Redis, redis_url: str, tmp_path: Path) -> None:
    from common.streams import StreamConsumer

    tiers = write_registry(tmp_path / "t.yaml", "m")
    job = await create(aredis)
    dead = StreamConsumer(aredis, keys.PROMPT_STREAM, keys.CLASSIFIER_GROUP, "dead")
    await dead.ensure_group()
    assert len(await dead.read(block_ms=None)) == 1
    cfg = ClassifierSettings(redis_url=redis_url, instance="c1", tiers_file=tiers,
                             stream_block_ms=100, claim_idle_ms=200)
    async with classifier(cfg):
        rec = await state(aredis, job, JobState.CLASSIFIED)
    assert rec.tier == 0


def test_check_exit_code(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import redis

    monkeypatch.setenv("T2I_REDIS_URL", redis_url)
    assert main(["--check"]) == 1
    beat = ServiceHeartbeat(instance="x", service="classifier").model_dump_json()
    redis.Redis.from_url(redis_url).set(keys.heartbeat_key("classifier", "x"), beat, px=5000)
    assert main(["--check"]) == 0


async def test_mix_is_counted_and_deadlines_handled(
        aredis: aioredis.Redis, redis_url: str, tmp_path: Path) -> None:
    """Predictions land in ``t2i:mix``; a job past its deadline is expired (expire
    policy) with a clear error; with degrade, a job whose routed tier is too slow by the
    controller's estimate goes to a cheaper tier."""
    from common.messages import DEADLINE_EXCEEDED, ControllerState, now
    from common.redisutil import aw

    tiers = write_registry(tmp_path / "t.yaml", "m", latency={1: 1.0, 2: 1.5, 4: 2.0})
    store = JobStore(aredis)
    late = PromptJob(job_id=uuid.uuid4().hex, prompt="late", seed=1, deadline=now() - 1)
    await store.create(late)
    cfg = ClassifierSettings(redis_url=redis_url, instance="c1", tiers_file=tiers,
                             stream_block_ms=100, deadline_policy="expire")
    async with classifier(cfg):
        rec = await state(aredis, late.job_id, JobState.EXPIRED)
    assert rec.error == DEADLINE_EXCEEDED and rec.tier is None
    assert await aredis.zcard(keys.INFLIGHT) == 0
    # Degrade: tier 0 has a 30 s queue, tier 1 none; a 5 s deadline moves the job.
    await aredis.set(keys.CONTROLLER_STATE, ControllerState(
        policy="static", queue_delay_s={0: 30.0, 1: 0.0}).model_dump_json())
    job = PromptJob(job_id=uuid.uuid4().hex, prompt="hurry", seed=1, deadline=now() + 5)
    await store.create(job)
    async with classifier(cfg.model_copy(update={"deadline_policy": "degrade"})):
        rec = await state(aredis, job.job_id, JobState.CLASSIFIED)
    assert (rec.predicted_tier, rec.tier) == (0, 1)
    mix = {k.decode(): int(v) for k, v in (await aw(aredis.hgetall(keys.MIX))).items()}
    assert sum(mix.values()) == 2 and all(k.endswith(":0") for k in mix)
