"""Streams helper and job store against a real redis-server."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from common import keys
from common.jobs import JobStore
from common.messages import ClassifiedJob, JobState, PromptJob
from common.streams import StreamConsumer


async def test_group_creation_is_idempotent(aredis: aioredis.Redis) -> None:
    c = StreamConsumer(aredis, "s", "g", "c1")
    await c.ensure_group()
    await c.ensure_group()
    groups = await aredis.xinfo_groups("s")
    assert [g["name"] for g in groups] == [b"g"]


async def test_reclaim_and_dead_letter(aredis: aioredis.Redis) -> None:
    a = StreamConsumer(aredis, "s", "g", "dead", claim_idle_ms=100, max_deliveries=2)
    b = StreamConsumer(aredis, "s", "g", "live", claim_idle_ms=100, max_deliveries=2)
    await a.ensure_group()
    eid = (await aredis.xadd("s", {"data": "x"})).decode()
    assert [e.id for e in await a.read(block_ms=None)] == [eid]
    await a.record_error(eid, "boom")
    assert await b.reclaim() == ([], [])  # not idle long enough yet
    await asyncio.sleep(0.15)
    live, dead = await b.reclaim()
    assert [e.id for e in live] == [eid] and live[0].deliveries == 2 and not dead
    await asyncio.sleep(0.15)
    live, dead = await a.reclaim()
    assert not live and [e.id for e in dead] == [eid]
    (_, fields), = (await aredis.xrange(keys.DEAD_LETTER_STREAM))
    assert fields[b"error"] == b"boom" and fields[b"source_id"] == eid.encode()
    assert (await aredis.xpending("s", "g"))["pending"] == 0


async def test_keepalive_prevents_reclaim(aredis: aioredis.Redis) -> None:
    a = StreamConsumer(aredis, "s", "g", "slow", claim_idle_ms=200)
    b = StreamConsumer(aredis, "s", "g", "other", claim_idle_ms=200)
    await a.ensure_group()
    await aredis.xadd("s", {"data": "x"})
    (entry,) = await a.read(block_ms=None)
    for _ in range(3):
        await asyncio.sleep(0.1)
        await a.keepalive(entry.id)
    assert await b.reclaim() == ([], [])


async def test_job_lifecycle_terminal_is_final(aredis: aioredis.Redis) -> None:
    store = JobStore(aredis)
    job = PromptJob(job_id="j1", prompt="a red circle", seed=1)
    assert await store.create(job) == ("j1", True)
    assert await store.backlog() == 1
    consumer = StreamConsumer(aredis, keys.PROMPT_STREAM, keys.CLASSIFIER_GROUP, "c")
    await consumer.ensure_group()
    (entry,) = await consumer.read(block_ms=None)
    routed = ClassifiedJob(**job.model_dump(), tier=1, predicted_tier=1)
    assert await store.route(routed, entry.id)
    assert (await aredis.xpending(keys.PROMPT_STREAM, keys.CLASSIFIER_GROUP))["pending"] == 0
    assert await aredis.xlen(keys.tier_stream(1)) == 1
    assert await store.start("j1", "w1", 1, 20)
    assert await store.succeed("j1", [b"png"])
    assert not await store.fail("j1", "late failure")  # terminal is final
    rec = await store.get("j1")
    assert rec is not None and rec.status is JobState.SUCCEEDED and rec.tier == 1
    assert await store.backlog() == 0 and await store.image("j1") == b"png"


async def test_cancel_queued_job_is_never_routed(aredis: aioredis.Redis) -> None:
    store = JobStore(aredis)
    await store.create(PromptJob(job_id="j2", prompt="p", seed=0))
    assert await store.request_cancel("j2") is JobState.CANCELLED
    consumer = StreamConsumer(aredis, keys.PROMPT_STREAM, keys.CLASSIFIER_GROUP, "c")
    await consumer.ensure_group()
    (entry,) = await consumer.read(block_ms=None)
    job = PromptJob.from_fields(entry.fields)
    assert not await store.route(ClassifiedJob(**job.model_dump(), tier=0, predicted_tier=0),
                                 entry.id)
    assert await aredis.xlen(keys.tier_stream(0)) == 0
    assert await store.request_cancel("nope") is None


async def test_admit_runs_skips_and_cancels(aredis: aioredis.Redis) -> None:
    from common.jobs import Admission

    store = JobStore(aredis)
    for job_id in ("a", "b", "c"):
        await store.create(PromptJob(job_id=job_id, prompt="p", seed=0))
    assert await store.admit("a", "w1", 0, 20) == (Admission.RUN, 0)
    assert await store.admit("a", "w2", 0, 20) == (Admission.RUN, 1)  # reclaimed: 2nd start
    rec = await store.get("a")
    assert rec is not None and rec.worker == "w2" and rec.attempts == 2
    await aredis.set(keys.cancel_key("b"), b"1")  # cancel flag seen before the start
    assert await store.admit("b", "w1", 0, 20) == (Admission.CANCELLED, 0)
    rec = await store.get("b")
    assert rec is not None and rec.status is JobState.CANCELLED
    await store.fail("c", "boom")
    assert (await store.admit("c", "w1", 0, 20))[0] is Admission.SKIP
    assert (await store.admit("nope", "w1", 0, 20))[0] is Admission.SKIP
    assert await store.backlog() == 1  # only "a" is unfinished
