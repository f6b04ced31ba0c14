"""A real worker (``services.worker.service.run`` as an asyncio task) against real Redis."""

from __future__ import annotations

import asyncio
import io
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from PIL import Image

from common import keys
from common.jobs import JobRecord, JobStore
from common.messages import AllocationPlan, ClassifiedJob, JobEvent, PromptJob
from common.plans import publish_plan
from common.settings import WorkerSettings
from common.streams import StreamConsumer
from services.worker.service import run
from tests.tinysd import build_tiny_sd, write_registry

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    torch.set_num_threads(1)  # steadier than 2 threads on a shared 2-core machine
    return build_tiny_sd(tmp_path_factory.mktemp("tinysd") / "pipeline")


def settings(redis_url: str, tiers: Path, **kw: object) -> WorkerSettings:
    base: dict[str, object] = {
        "redis_url": redis_url, "instance": "w1", "tiers_file": tiers,
        "backend": "emulated", "stream_block_ms": 100, "heartbeat_interval_s": 0.1,
        "keepalive_s": 0.1, "claim_idle_ms": 300, "max_deliveries": 2}
    base.update(kw)
    return WorkerSettings.model_validate(base)


@asynccontextmanager
async def worker(cfg: WorkerSettings) -> AsyncIterator[asyncio.Task[None]]:
    """Run a worker until the block exits, then stop it gracefully."""
    stop = asyncio.Event()
    task = asyncio.create_task(run(cfg, stop))
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def assign(redis: aioredis.Redis, version: int, **assignments: int) -> None:
    await publish_plan(redis, AllocationPlan(version=version, policy="test",
                                             assignments=assignments))


async def submit(redis: aioredis.Redis, tier: int, prompt: str = "a red circle",
                 seed: int = 1, **kw: object) -> str:
    """Create a job and route it to ``tier`` the way the classifier does."""
    store = JobStore(redis)
    job = PromptJob.model_validate({"job_id": uuid.uuid4().hex, "prompt": prompt,
                                    "seed": seed, **kw})
    await store.create(job)
    prompts = StreamConsumer(redis, keys.PROMPT_STREAM, keys.CLASSIFIER_GROUP, "test")
    await prompts.ensure_group()
    (entry,) = await prompts.read(count=1, block_ms=None)
    routed = ClassifiedJob(**job.model_dump(exclude={"schema_version"}), tier=tier,
                           predicted_tier=tier)
    assert await JobStore(redis).route(routed, entry.id)
    return job.job_id


async def settled(redis: aioredis.Redis, job_id: str, timeout: float = 20.0) -> JobRecord:
    """Wait for the job to reach a terminal state."""
    store = JobStore(redis)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rec = await store.get(job_id)
        if rec is not None and rec.status.terminal:
            return rec
        await asyncio.sleep(0.02)
    raise AssertionError(f"job {job_id} not terminal after {timeout} s: {rec}")


async def wait_for(cond: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Wait until ``cond()`` is true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met")


async def pending(redis: aioredis.Redis, tier: int) -> int:
    return int((await redis.xpending(keys.tier_stream(tier), keys.WORKER_GROUP))["pending"])


async def test_tiny_sd_generates_pngs_with_progress(
        aredis: aioredis.Redis, redis_url: str, tiny_sd: Path, tmp_path: Path) -> None:
    tiers = write_registry(tmp_path / "tiers.yaml", tiny_sd, steps=(4, 2))
    cfg = settings(redis_url, tiers, backend="diffusers", max_deliveries=1)
    store = JobStore(aredis)
    pubsub = aredis.pubsub()
    await pubsub.psubscribe(keys.events_channel("*"))
    await assign(aredis, 1, w1=0)
    async with worker(cfg):
        a = await submit(aredis, 0, "a red circle", seed=7)
        b = await submit(aredis, 0, "two blue squares", seed=8, n=2)
        bad = await submit(aredis, 0, "odd size", width=36, height=36)
        rec_a, rec_b, rec_bad = [await settled(aredis, j) for j in (a, b, bad)]
        again = await submit(aredis, 0, "a red circle", seed=7)
        rec_again = await settled(aredis, again)
    for rec, n in ((rec_a, 1), (rec_b, 2), (rec_again, 1)):
        assert rec.status == "succeeded" and rec.tier == 0 and rec.worker == "w1"
        assert rec.images == n and rec.attempts == 1
        for i in range(n):
            png = await store.image(rec.id, i)
            assert png is not None and png.startswith(PNG_SIGNATURE)
            assert Image.open(io.BytesIO(png)).size == (32, 32)
    assert await store.image(a) == await store.image(again)  # same seed, same bytes
    assert await store.image(b, 0) != await store.image(b, 1)
    # A size the VAE cannot produce fails clearly and is dead-lettered (max_deliveries=1).
    assert rec_bad.status == "failed" and "multiple of 8" in (rec_bad.error or "")
    (_, dead), = await aredis.xrange(keys.DEAD_LETTER_STREAM)
    assert b"multiple of 8" in dead[b"error"]
    assert await pending(aredis, 0) == 0
    steps = []
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.05)
        if msg is None:
            continue
        event = JobEvent.model_validate_json(msg["data"])
        if event.job_id == a and event.kind == "progress":
            steps.append((event.step, event.total))
    await pubsub.aclose()  # type: ignore[no-untyped-call]
    assert steps and steps[-1] == (4, 4) and all(t == 4 for _, t in steps)
    assert await aredis.exists(keys.heartbeat_key("worker", "w1")) == 0  # deleted at exit


async def test_cancel_before_start_never_runs(
        aredis: aioredis.Redis, redis_url: str, tmp_path: Path) -> None:
    tiers = write_registry(tmp_path / "tiers.yaml", "m", latency={1: 0.05})
    store = JobStore(aredis)
    queued = await submit(aredis, 0)
    assert await store.request_cancel(queued) == "cancelled"
    racing = await submit(aredis, 0)  # cancel flag set, state not yet moved (a race)
    await aredis.set(keys.cancel_key(racing), b"1")
    ok = await submit(aredis, 0)
    await assign(aredis, 1, w1=0)
    async with worker(settings(redis_url, tiers)):
        assert (await settled(aredis, ok)).status == "succeeded"
        for job_id in (queued, racing):
            rec = await settled(aredis, job_id)
            assert rec.status == "cancelled" and rec.started_at is None
            assert rec.attempts == 0 and await store.image(job_id) is None
        await wait_for(lambda: _zero(pending(aredis, 0)))


async def _zero(value: Awaitable[int]) -> bool:
    return await value == 0


async def test_cancel_while_running_stops_between_steps(
        aredis: aioredis.Redis, redis_url: str, tmp_path: Path) -> None:
    # 10 steps over 1.5 s per batch (batch of 1 or 2).
    tiers = write_registry(tmp_path / "tiers.yaml", "m", steps=(10, 5),
                           latency={1: 1.5, 2: 1.5})
    store = JobStore(aredis)
    await assign(aredis, 1, w1=0)
    async with worker(settings(redis_url, tiers)):
        # Alone in its batch: the batch is interrupted.
        job = await submit(aredis, 0)
        await wait_for(lambda: _step_at_least(store, job, 2))
        t0 = time.monotonic()
        await store.request_cancel(job)
        rec = await settled(aredis, job)
        assert rec.status == "cancelled" and rec.step < 10
        assert time.monotonic() - t0 < 0.9 and await store.image(job) is None
        # With a batch mate: only the cancelled job's output is dropped.
        keep, drop = await submit(aredis, 0, seed=1), await submit(aredis, 0, seed=2)
        await wait_for(lambda: _step_at_least(store, drop, 2))
        await store.request_cancel(drop)
        rec_keep, rec_drop = await settled(aredis, keep), await settled(aredis, drop)
    assert rec_keep.status == "succeeded" and rec_keep.images == 1
    assert rec_drop.status == "cancelled" and await store.image(drop) is None


async def _step_at_least(store: JobStore, job_id: str, step: int) -> bool:
    rec = await store.get(job_id)
    return rec is not None and rec.step >= step


async def test_dead_consumers_entry_is_reclaimed(
        aredis: aioredis.Redis, redis_url: str, tmp_path: Path) -> None:
    tiers = write_registry(tmp_path / "tiers.yaml", "m")
    job = await submit(aredis, 0)
    dead = StreamConsumer(aredis, keys.tier_stream(0), keys.WORKER_GROUP, "dead")
    await dead.ensure_group()
    assert len(await dead.read(count=1, block_ms=None)) == 1  # taken, never acked
    await assign(aredis, 1, w1=0)
    async with worker(settings(redis_url, tiers, emulated_latency_scale=0)):
        rec = await settled(aredis, job)
    assert rec.status == "succeeded" and rec.worker == "w1"
    assert await pending(aredis, 0) == 0


async def test_failing_job_is_dead_lettered_after_max_deliveries(
        aredis: aioredis.Redis, redis_url: str, tmp_path: Path) -> None:
    tiers = write_registry(tmp_path / "tiers.yaml", tmp_path / "no-such-model")
    job = await submit(aredis, 0)
    await assign(aredis, 1, w1=0)
    async with worker(settings(redis_url, tiers, backend="diffusers")):
        rec = await settled(aredis, job)
    assert rec.status == "failed" and "not found" in (rec.error or "")
    assert rec.attempts == 2  # max_deliveries
    (_, fields), = await aredis.xrange(keys.DEAD_LETTER_STREAM)
    assert b"not found" in fields[b"error"] and fields[b"deliveries"] == b"2"
    assert await pending(aredis, 0) == 0


async def test_plan_switch_moves_worker_and_older_plans_are_ignored(
        aredis: aioredis.Redis, redis_url: str, tmp_path: Path) -> None:
    tiers = write_registry(tmp_path / "tiers.yaml", "m")
    hb_key = keys.heartbeat_key("worker", "w1")

    async def heartbeat() -> dict[str, object]:
        import json

        raw = await aredis.get(hb_key)
        return dict(json.loads(raw)) if raw else {}

    async with worker(settings(redis_url, tiers, emulated_latency_scale=0)):
        await wait_for(lambda: _hb(heartbeat, tier=None, plan_version=0))  # idle, no plan
        await assign(aredis, 1, w1=0)
        assert (await settled(aredis, await submit(aredis, 0))).tier == 0
        await assign(aredis, 2, w1=1)
        await wait_for(lambda: _hb(heartbeat, tier=1, plan_version=2))
        assert (await settled(aredis, await submit(aredis, 1))).tier == 1
        await assign(aredis, 1, w1=0)  # stale version: ignored
        await asyncio.sleep(0.3)
        assert (await heartbeat())["tier"] == 1
        await assign(aredis, 3, other=0)  # unassigned: idle
        await wait_for(lambda: _hb(heartbeat, tier=None, plan_version=3))
        hb = await heartbeat()
        assert hb["jobs_done"] == 2 and hb["model_switches"] == 1 and hb["busy"] is False


async def _hb(read: Callable[[], Awaitable[dict[str, object]]], **want: object) -> bool:
    hb = await read()
    return bool(hb) and all(hb.get(k) == v for k, v in want.items())


async def test_process_health_check_and_graceful_sigterm(
        aredis: aioredis.Redis, redis_url: str, tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys

    tiers = write_registry(tmp_path / "tiers.yaml", "m")
    env = {**os.environ, "T2I_REDIS_URL": redis_url, "T2I_TIERS_FILE": str(tiers),
           "T2I_BACKEND": "emulated", "T2I_EMULATED_LATENCY_SCALE": "0",
           "T2I_INSTANCE": "proc", "T2I_STREAM_BLOCK_MS": "100",
           "T2I_HEARTBEAT_INTERVAL_S": "0.1"}
    check = [sys.executable, "-m", "services.worker", "--check"]
    assert subprocess.run(check, env=env, timeout=60).returncode == 1
    await assign(aredis, 1, proc=0)
    proc = subprocess.Popen([sys.executable, "-m", "services.worker"], env=env)
    try:
        job = await submit(aredis, 0)
        assert (await settled(aredis, job, timeout=60)).worker == "proc"
        assert subprocess.run(check, env=env, timeout=60).returncode == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not await aredis.exists(keys.heartbeat_key("worker", "proc"))


async def test_entry_over_max_deliveries_is_dead_lettered_on_reclaim(
        aredis: aioredis.Redis, redis_url: str, tmp_path: Path) -> None:
    tiers = write_registry(tmp_path / "tiers.yaml", "m")
    job = await submit(aredis, 0)
    crashing = StreamConsumer(aredis, keys.tier_stream(0), keys.WORKER_GROUP, "crashing",
                              claim_idle_ms=100, max_deliveries=10)
    await crashing.ensure_group()
    (entry,) = await crashing.read(block_ms=None)
    await crashing.record_error(entry.id, "worker killed: out of memory")
    await asyncio.sleep(0.15)
    assert len((await crashing.reclaim())[0]) == 1  # second delivery, crashed again
    await assign(aredis, 1, w1=0)
    async with worker(settings(redis_url, tiers, emulated_latency_scale=0)):
        rec = await settled(aredis, job)  # third delivery > max_deliveries=2
    assert rec.status == "failed" and rec.error == "worker killed: out of memory"
    assert rec.attempts == 0 and await pending(aredis, 0) == 0
