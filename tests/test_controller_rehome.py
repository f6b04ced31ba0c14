"""Re-homing a tier left without workers, on a real Redis: nothing lost, nothing doubled."""

from __future__ import annotations

import asyncio
import uuid

import redis.asyncio as aioredis

from common import keys
from common.heartbeat import beat
from common.jobs import JobStore
from common.messages import ClassifiedJob, PromptJob, WorkerHeartbeat
from common.streams import StreamConsumer
from services.controller.rehome import Rehomer, rehome_target


def test_rehome_target() -> None:
    assert rehome_target(2, {0: 1, 1: 0, 2: 0}) == 0
    assert rehome_target(2, {0: 1, 1: 2, 2: 0}) == 1  # nearest less approximate
    assert rehome_target(0, {0: 0, 1: 0, 2: 3}) == 2  # none below: nearest above
    assert rehome_target(1, {0: 1, 1: 1}) == 1
    assert rehome_target(1, {0: 0, 1: 0}) is None


async def _route_jobs(redis: aioredis.Redis, n: int, tier: int) -> list[str]:
    """Create ``n`` jobs and route them to ``tier`` as the classifier would."""
    store = JobStore(redis)
    ids = []
    for i in range(n):
        job = PromptJob(job_id=uuid.uuid4().hex, prompt=f"p{i}", seed=i)
        await store.create(job)
        ids.append(job.job_id)
    cls = StreamConsumer(redis, keys.PROMPT_STREAM, keys.CLASSIFIER_GROUP, "cls")
    await cls.ensure_group()
    for entry in await cls.read(count=n, block_ms=None):
        job = PromptJob.from_fields(entry.fields)
        await store.route(ClassifiedJob(**job.model_dump(exclude={"schema_version"}),
                                        tier=tier, predicted_tier=tier), entry.id)
    return ids


async def _stream_jobs(redis: aioredis.Redis, tier: int) -> list[str]:
    return [ClassifiedJob.from_fields(f).job_id
            for _, f in await redis.xrange(keys.tier_stream(tier))]


async def test_stranded_tier_moves_unread_and_dead_pending_once(aredis: aioredis.Redis) -> None:
    ids = await _route_jobs(aredis, 14, tier=1)
    stream = keys.tier_stream(1)

    def consumer(name: str) -> StreamConsumer:
        return StreamConsumer(aredis, stream, keys.WORKER_GROUP, name)

    await consumer("w-live").ensure_group()
    dead = [e.id for e in await consumer("w-dead").read(count=3, block_ms=None)]
    live = await consumer("w-live").read(count=2, block_ms=None)
    own = await consumer(keys.REHOME_CONSUMER).read(count=1, block_ms=None)  # crashed mid-move
    await beat(aredis, "worker", "w-live", WorkerHeartbeat(instance="w-live"), ttl_s=10)
    cancelled = ids[-1]
    await JobStore(aredis).request_cancel(cancelled)
    assert len(dead) == 3 and len(own) == 1

    rehomer = Rehomer(aredis, claim_idle_ms=60_000, dead_idle_ms=0)
    result = await rehomer.run({0: 1, 1: 0}, {"w-live"}, n_tiers=2)
    live_ids = {ClassifiedJob.from_fields(e.fields).job_id for e in live}
    moved = await _stream_jobs(aredis, 0)
    assert len(moved) == len(set(moved)) == 14 - 2 - 1  # all but live-pending and cancelled
    assert set(moved) == set(ids) - live_ids - {cancelled}
    assert result.total == 11 and result.dropped == 1 and result.moved == {(1, 0): 11}
    store = JobStore(aredis)
    for job_id in moved:
        rec = await store.get(job_id)
        assert rec is not None and rec.tier == 0 and rec.status == "classified"
    # Only the live worker's batch stays pending on the old tier; nothing is unread there.
    pending = await aredis.xpending(stream, keys.WORKER_GROUP)
    assert pending["pending"] == 2 and {text(c["name"]) for c in pending["consumers"]} == {
        "w-live"}
    assert await consumer("w-x").read(count=100, block_ms=None) == []
    # A second pass moves nothing more; the live worker acknowledges its batch as usual.
    again = await rehomer.run({0: 1, 1: 0}, {"w-live"}, n_tiers=2)
    assert again.total == 0 and len(await _stream_jobs(aredis, 0)) == 11
    assert await consumer("w-live").ack(*(e.id for e in live)) == 2


def text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def test_rehome_races_a_late_worker_without_loss_or_duplicate(
        aredis: aioredis.Redis) -> None:
    """A worker of the old plan keeps reading the stranded tier while the controller
    re-homes it: every job ends up served by exactly one of them."""
    ids = await _route_jobs(aredis, 120, tier=1)
    late = StreamConsumer(aredis, keys.tier_stream(1), keys.WORKER_GROUP, "w-late")
    await late.ensure_group()
    taken: list[str] = []

    async def late_worker() -> None:
        for _ in range(60):
            for e in await late.read(count=2, block_ms=None):
                taken.append(ClassifiedJob.from_fields(e.fields).job_id)
                await late.ack(e.id)
            await asyncio.sleep(0)

    rehomer = Rehomer(aredis, claim_idle_ms=60_000, dead_idle_ms=60_000)
    await asyncio.gather(rehomer.run({0: 2}, {"w-late"}, 2), late_worker())
    await rehomer.run({0: 2}, {"w-late"}, 2)  # whatever the late worker left unread
    moved = await _stream_jobs(aredis, 0)
    assert not set(moved) & set(taken)
    assert sorted(moved + taken) == sorted(ids)
