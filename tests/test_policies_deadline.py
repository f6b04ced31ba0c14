"""The worker's last deadline check (``T2I_DEADLINE_POLICY=expire``), on a real Redis."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import redis.asyncio as aioredis

from common import keys
from common.jobs import JobStore
from common.messages import (
    DEADLINE_EXCEEDED,
    AllocationPlan,
    ClassifiedJob,
    JobState,
    PromptJob,
    now,
)
from common.plans import publish_plan
from common.settings import WorkerSettings
from common.streams import StreamConsumer
from services.worker.service import run as run_worker
from tests.tinysd import write_registry


async def test_worker_expires_a_job_whose_deadline_passed(
        aredis: aioredis.Redis, redis_url: str, tmp_path: Path) -> None:
    store = JobStore(aredis)
    jobs = {"late": now() - 1, "fine": now() + 60}
    ids: dict[str, str] = {}
    for name, deadline in jobs.items():
        job = PromptJob(job_id=uuid.uuid4().hex, prompt=name, seed=1, deadline=deadline)
        await store.create(job)
        ids[name] = job.job_id
    cls = StreamConsumer(aredis, keys.PROMPT_STREAM, keys.CLASSIFIER_GROUP, "c")
    await cls.ensure_group()
    for entry in await cls.read(count=2, block_ms=None):  # route both to tier 0
        job = PromptJob.from_fields(entry.fields)
        await store.route(ClassifiedJob(**job.model_dump(exclude={"schema_version"}),
                                        tier=0, predicted_tier=0), entry.id)
    await publish_plan(aredis, AllocationPlan(version=1, policy="t", assignments={"w": 0}))
    settings = WorkerSettings(redis_url=redis_url, instance="w", backend="emulated",
                              emulated_latency_scale=0, stream_block_ms=100,
                              tiers_file=write_registry(tmp_path / "t.yaml", "m"),
                              deadline_policy="expire")
    stop = asyncio.Event()
    task = asyncio.create_task(run_worker(settings, stop))
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            recs = [await store.get(i) for i in ids.values()]
            if all(r is not None and r.status.terminal for r in recs):
                break
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    late, fine = await store.get(ids["late"]), await store.get(ids["fine"])
    assert late is not None and late.status is JobState.EXPIRED
    assert late.error == DEADLINE_EXCEEDED and late.started_at is None
    assert fine is not None and fine.status is JobState.SUCCEEDED
    assert (await aredis.xpending(keys.tier_stream(0), keys.WORKER_GROUP))["pending"] == 0
