"""Helpers shared by the gateway tests (this module holds no tests).

The gateway runs in-process (``httpx.ASGITransport``, which does not run the lifespan, so
the helper enters it) against the session's real redis-server. Worker behaviour is
simulated with the real :class:`common.jobs.JobStore` calls a worker makes.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import redis.asyncio as aioredis
from fastapi import FastAPI

from common import keys
from common.jobs import JobStore
from common.messages import PromptJob
from common.settings import GatewaySettings
from services.gateway.app import create_app

BASE = "http://gw.test"
PNG = b"\x89PNG\r\n\x1a\n" + b"not-really-a-png"


def settings_for(redis_url: str, **overrides: Any) -> GatewaySettings:
    """Gateway settings for tests, on the given Redis."""
    return GatewaySettings(redis_url=redis_url, **overrides)


@asynccontextmanager
async def gateway_app(
    settings: GatewaySettings, **app_kwargs: Any
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """A fresh gateway app whose lifespan is running, and an httpx client on it."""
    app = create_app(settings, **app_kwargs)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=BASE) as client:
            yield app, client


@asynccontextmanager
async def gateway(settings: GatewaySettings, **app_kwargs: Any) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client on a fresh gateway app whose lifespan is running."""
    async with gateway_app(settings, **app_kwargs) as (_, client):
        yield client


async def submit(client: httpx.AsyncClient, **body: Any) -> str:
    """POST /v1/jobs and return the new job id (asserts 202)."""
    resp = await client.post("/v1/jobs", json={"prompt": "a red circle", **body})
    assert resp.status_code == 202, resp.text
    return str(resp.json()["id"])


async def prompt_jobs(redis: aioredis.Redis) -> list[PromptJob]:
    """Every job on the prompt stream, oldest first."""
    entries = await redis.xrange(keys.PROMPT_STREAM)
    return [PromptJob.from_fields(fields) for _, fields in entries]


async def wait_for_job(redis: aioredis.Redis, timeout: float = 5.0) -> str:
    """Id of the first job to appear on the prompt stream."""
    async with asyncio.timeout(timeout):
        while not (jobs := await prompt_jobs(redis)):
            await asyncio.sleep(0.01)
    return jobs[0].job_id


async def wait_subscribed(redis: aioredis.Redis, job_id: str, timeout: float = 5.0) -> None:
    """Wait until someone listens on the job's events channel."""
    channel = keys.events_channel(job_id)
    async with asyncio.timeout(timeout):
        while True:
            counts = dict(await redis.pubsub_numsub(channel))
            if counts.get(channel.encode(), 0) >= 1:
                return
            await asyncio.sleep(0.01)


async def run_job(
    store: JobStore, job_id: str, images: list[bytes] | None = None, steps: int = 2
) -> None:
    """What a worker does: start, report each step, store the images and succeed."""
    assert await store.start(job_id, "worker-test", tier=1, total=steps)
    for step in range(1, steps + 1):
        await store.progress(job_id, step, steps)
    assert await store.succeed(job_id, images if images is not None else [PNG])


def parse_sse(text: str) -> list[tuple[str, Any]]:
    """SSE frames as ``(event, data)``; comments become ``(":", comment)``."""
    frames: list[tuple[str, Any]] = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        event, data = "message", None
        for line in block.split("\n"):
            if line.startswith(":"):
                frames.append((":", line[1:].strip()))
            elif line.startswith("event: "):
                event = line[len("event: ") :]
            elif line.startswith("data: "):
                data = json.loads(line[len("data: ") :])
        if data is not None:
            frames.append((event, data))
    return frames


def error_of(resp: httpx.Response) -> dict[str, str]:
    """The ``error`` object of the one error body (asserts its shape)."""
    body = resp.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"type", "message", "code"}, body
    return dict(body["error"])
