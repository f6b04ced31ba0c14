"""Gateway: SSE job events and the OpenAI-compatible synchronous endpoint.

httpx's ASGITransport buffers a whole response, so each test starts the request as a
task, waits until the gateway has subscribed to the job's channel, drives the job with
the real JobStore (what a worker does) and then reads the complete response.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator

import httpx
import pytest
import redis.asyncio as aioredis

from common.jobs import JobStore
from common.messages import JobState
from tests.test_gateway_support import (
    BASE,
    PNG,
    error_of,
    gateway,
    parse_sse,
    run_job,
    settings_for,
    submit,
    wait_for_job,
    wait_subscribed,
)


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with gateway(settings_for(redis_url, sync_timeout_s=5.0), sse_keepalive_s=0.05) as c:
        yield c


@pytest.fixture
def store(aredis: aioredis.Redis) -> JobStore:
    return JobStore(aredis)


async def test_events_follow_a_job_to_done(
    client: httpx.AsyncClient, store: JobStore, aredis: aioredis.Redis
) -> None:
    job_id = await submit(client)
    request = asyncio.create_task(client.get(f"/v1/jobs/{job_id}/events"))
    await wait_subscribed(aredis, job_id)
    await asyncio.sleep(0.12)  # long enough for a keepalive comment
    await run_job(store, job_id, steps=2)
    resp = await asyncio.wait_for(request, 5)

    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert resp.headers["cache-control"] == "no-cache"
    frames = parse_sse(resp.text)
    assert (":", "keepalive") in frames
    events = [(name, data) for name, data in frames if name != ":"]
    assert [name for name, _ in events] == [
        "status",
        "status",
        "progress",
        "progress",
        "status",
        "done",
    ]
    assert [data["status"] for _, data in events[:2]] == ["queued", "running"]
    assert [(d["step"], d["total"]) for _, d in events[2:4]] == [(1, 2), (2, 2)]
    assert events[4][1]["status"] == "succeeded"
    assert events[5][1] == {"id": job_id, "status": "succeeded", "error": None}
    assert all(d.get("job_id", d.get("id")) == job_id for _, d in events)


async def test_events_of_a_finished_job_end_at_once(
    client: httpx.AsyncClient, store: JobStore
) -> None:
    job_id = await submit(client)
    await store.fail(job_id, "boom")
    resp = await client.get(f"/v1/jobs/{job_id}/events")
    events = parse_sse(resp.text)
    assert events[0][0] == "status" and events[0][1]["status"] == "failed"
    assert events[1] == ("done", {"id": job_id, "status": "failed", "error": "boom"})
    assert len(events) == 2


async def test_events_report_cancellation(
    client: httpx.AsyncClient, aredis: aioredis.Redis
) -> None:
    job_id = await submit(client)
    request = asyncio.create_task(client.get(f"/v1/jobs/{job_id}/events"))
    await wait_subscribed(aredis, job_id)
    assert (await client.post(f"/v1/jobs/{job_id}/cancel")).status_code == 202
    events = [f for f in parse_sse((await asyncio.wait_for(request, 5)).text) if f[0] != ":"]
    assert [(n, d["status"]) for n, d in events] == [
        ("status", "queued"),
        ("status", "cancelled"),
        ("done", "cancelled"),
    ]


@pytest.mark.parametrize("fmt", ["b64_json", "url"])
async def test_openai_generation(
    client: httpx.AsyncClient, store: JobStore, aredis: aioredis.Redis, fmt: str
) -> None:
    body = {
        "prompt": "three yellow stars",
        "n": 2,
        "size": "32x32",
        "model": "dall-e-3",
        "response_format": fmt,
        "user": "u1",
        "quality": "hd",
    }
    request = asyncio.create_task(client.post("/v1/images/generations", json=body))
    job_id = await wait_for_job(aredis)
    await wait_subscribed(aredis, job_id)
    await run_job(store, job_id, images=[PNG, PNG + b"1"])
    resp = await asyncio.wait_for(request, 5)

    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert isinstance(out["created"], int) and out["created"] > 0
    if fmt == "b64_json":
        assert [base64.b64decode(d["b64_json"]) for d in out["data"]] == [PNG, PNG + b"1"]
        assert all(set(d) == {"b64_json"} for d in out["data"])
    else:
        urls = [d["url"] for d in out["data"]]
        assert urls == [f"{BASE}/v1/jobs/{job_id}/image?index={i}" for i in range(2)]
        images = [(await client.get(u)).content for u in urls]
        assert images == [PNG, PNG + b"1"]


async def test_openai_generation_failure_is_502(
    client: httpx.AsyncClient, store: JobStore, aredis: aioredis.Redis
) -> None:
    request = asyncio.create_task(client.post("/v1/images/generations", json={"prompt": "a boat"}))
    job_id = await wait_for_job(aredis)
    await wait_subscribed(aredis, job_id)
    await store.start(job_id, "worker-test", tier=0, total=4)
    await store.fail(job_id, "worker crashed")
    resp = await asyncio.wait_for(request, 5)
    assert resp.status_code == 502
    err = error_of(resp)
    assert (err["type"], err["code"]) == ("generation_error", "generation_failed")
    assert job_id in err["message"] and "worker crashed" in err["message"]


async def test_openai_cancelled_job_is_409(
    client: httpx.AsyncClient, store: JobStore, aredis: aioredis.Redis
) -> None:
    request = asyncio.create_task(client.post("/v1/images/generations", json={"prompt": "a boat"}))
    job_id = await wait_for_job(aredis)
    await wait_subscribed(aredis, job_id)
    assert await store.request_cancel(job_id) is JobState.CANCELLED
    resp = await asyncio.wait_for(request, 5)
    assert resp.status_code == 409 and error_of(resp)["code"] == "job_cancelled"


async def test_openai_timeout_is_504_naming_the_job(redis_url: str, aredis: aioredis.Redis) -> None:
    async with gateway(settings_for(redis_url, sync_timeout_s=0.2)) as client:
        resp = await client.post("/v1/images/generations", json={"prompt": "a boat"})
    assert resp.status_code == 504
    err = error_of(resp)
    assert (err["type"], err["code"]) == ("timeout_error", "sync_timeout")
    job_id = await wait_for_job(aredis)
    assert job_id in err["message"] and f"/v1/jobs/{job_id}" in err["message"]


async def test_openai_bad_input(client: httpx.AsyncClient) -> None:
    cases = [
        ({"prompt": ""}, "body.prompt"),
        ({"prompt": "a", "n": 9}, "body.n"),
        ({"prompt": "a", "response_format": "png"}, "body.response_format"),
        ({"prompt": "a", "size": "7x7"}, "allowed sizes"),
    ]
    for body, text in cases:
        resp = await client.post("/v1/images/generations", json=body)
        assert resp.status_code == 422, body
        assert text in error_of(resp)["message"]
