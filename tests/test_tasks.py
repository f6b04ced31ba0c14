"""Background work (arq): webhook delivery with retries, and maintenance, on real Redis."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import pytest
import redis.asyncio as aioredis

from common import keys
from common.jobs import JobStore
from common.messages import JobState, PromptJob
from common.settings import TaskSettings
from common.streams import StreamConsumer
from services.tasks.__main__ import build_worker
from services.tasks.maintenance import run_maintenance


class Hook:
    """A real HTTP endpoint that fails its first ``fail_first`` calls with 503."""

    def __init__(self, fail_first: int = 0) -> None:
        self.calls: list[dict[str, Any]] = []
        self.fail_first = fail_first
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                hook.calls.append(body)
                code = 503 if len(hook.calls) <= hook.fail_first else 200
                self.send_response(code)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def hook() -> Iterator[Hook]:
    h = Hook(fail_first=1)
    yield h
    h.server.shutdown()


async def run_tasks_burst(redis_url: str) -> None:
    settings = TaskSettings(redis_url=redis_url, webhook_max_tries=3)
    worker = build_worker(settings)
    worker.burst = True
    worker.poll_delay_s = 0.05
    await asyncio.wait_for(worker.main(), 30)
    await worker.close()


async def test_webhook_delivered_once_with_retry(aredis: aioredis.Redis, redis_url: str,
                                                 hook: Hook) -> None:
    store = JobStore(aredis)
    await store.create(PromptJob(job_id="w1", prompt="a red circle", seed=3),
                       callback_url=hook.url)
    assert await store.start("w1", "worker-x", 0, 4)
    assert await store.succeed("w1", [b"png"])
    assert not await store.fail("w1", "second completion")  # refused: no second webhook
    await run_tasks_burst(redis_url)
    # First try got 503, the retry (after 1 s backoff) got 200; exactly one success.
    assert len(hook.calls) == 2
    assert hook.calls[-1]["id"] == "w1" and hook.calls[-1]["status"] == "succeeded"
    assert hook.calls[-1]["timings"]["finished"] is not None


async def test_job_without_callback_enqueues_nothing(aredis: aioredis.Redis) -> None:
    store = JobStore(aredis)
    await store.create(PromptJob(job_id="w2", prompt="p", seed=0))
    await store.fail("w2", "boom")
    assert await aredis.zcard("arq:queue") == 0


async def test_maintenance_trims_only_acknowledged(aredis: aioredis.Redis) -> None:
    stream = keys.tier_stream(0)
    c = StreamConsumer(aredis, stream, keys.WORKER_GROUP, "w")
    await c.ensure_group()
    ids = [(await aredis.xadd(stream, {"data": str(i)})).decode() for i in range(6)]
    got = await c.read(count=4, block_ms=None)  # 4 delivered, 2 never delivered
    await c.ack(*[e.id for e in got[:2]])       # 2 acked, 2 pending
    report = await run_maintenance(aredis)
    assert report.trimmed_entries == 2
    remaining = [e[0].decode() for e in await aredis.xrange(stream)]
    assert remaining == ids[2:]
    # Nothing pending or undelivered was removed; a second pass is a no-op.
    assert (await run_maintenance(aredis)).trimmed_entries == 0


async def test_maintenance_expires_results_and_reconciles(aredis: aioredis.Redis) -> None:
    store = JobStore(aredis, result_ttl_s=1)
    await store.create(PromptJob(job_id="e1", prompt="p", seed=0))
    await store.start("e1", "w", 0, 1)
    await store.succeed("e1", [b"png"])
    await store.create(PromptJob(job_id="gone", prompt="p", seed=0))
    await aredis.delete(keys.job_key("gone"))  # its record expired (TTL) while queued
    await asyncio.sleep(1.1)
    report = await run_maintenance(aredis)
    assert report.expired_results == 1 and report.reconciled_inflight == 1
    rec = await store.get("e1")
    assert rec is not None and rec.status is JobState.EXPIRED
    assert await store.backlog() == 0


async def test_maintenance_deletes_idle_empty_consumers(aredis: aioredis.Redis) -> None:
    stream = keys.tier_stream(1)
    busy = StreamConsumer(aredis, stream, keys.WORKER_GROUP, "busy")
    idle = StreamConsumer(aredis, stream, keys.WORKER_GROUP, "idle")
    await busy.ensure_group()
    await aredis.xadd(stream, {"data": "x"})
    await aredis.xadd(stream, {"data": "y"})
    (done,) = await idle.read(block_ms=None)
    await idle.ack(done.id)            # idle consumer: nothing pending
    await busy.read(block_ms=None)     # busy consumer: one entry pending
    await asyncio.sleep(0.05)
    report = await run_maintenance(aredis, consumer_idle_ms=10)
    names = {c["name"] for c in await aredis.xinfo_consumers(stream, keys.WORKER_GROUP)}
    assert report.deleted_consumers == 1 and report.trimmed_entries == 1 and names == {b"busy"}
