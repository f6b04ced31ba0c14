"""Gateway: job status, images, cancellation, Redis outages."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import httpx
import pytest
import redis.asyncio as aioredis

from common import keys
from common.jobs import JobStore
from common.messages import JobState
from tests.conftest import RedisServer, free_port
from tests.test_gateway_support import PNG, error_of, gateway, run_job, settings_for, submit


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with gateway(settings_for(redis_url)) as c:
        yield c


@pytest.fixture
def store(aredis: aioredis.Redis) -> JobStore:
    return JobStore(aredis)


async def test_status_of_a_queued_job(client: httpx.AsyncClient) -> None:
    first = await submit(client)
    second = await submit(client)
    resp = await client.get(f"/v1/jobs/{second}")
    assert resp.status_code == 200
    body = resp.json()
    assert body["id"] == second and body["status"] == "queued"
    assert body["queue_position"] == 1
    assert body["progress"] == {"step": 0, "total": 0}
    assert body["timings"]["enqueued"] is not None
    assert body["timings"]["started"] is None and body["timings"]["finished"] is None
    assert (body["tier"], body["error"], body["images"]) == (None, None, 0)
    assert "x-queue-time" not in resp.headers
    assert (await client.get(f"/v1/jobs/{first}")).json()["queue_position"] == 0


async def test_unknown_job_is_404(client: httpx.AsyncClient) -> None:
    for path in ("/v1/jobs/nope", "/v1/jobs/nope/image", "/v1/jobs/nope/events"):
        resp = await client.get(path)
        assert resp.status_code == 404, path
        err = error_of(resp)
        assert (err["type"], err["code"]) == ("not_found_error", "job_not_found")
        assert "nope" in err["message"]
    resp = await client.post("/v1/jobs/nope/cancel")
    assert resp.status_code == 404 and error_of(resp)["code"] == "job_not_found"


async def test_status_of_a_finished_job_has_timings_and_headers(
    client: httpx.AsyncClient, store: JobStore
) -> None:
    job_id = await submit(client)
    await run_job(store, job_id, steps=3)
    resp = await client.get(f"/v1/jobs/{job_id}")
    body = resp.json()
    assert (body["status"], body["tier"], body["images"]) == ("succeeded", 1, 1)
    assert body["progress"] == {"step": 3, "total": 3}
    assert body["queue_position"] is None
    assert all(body["timings"][k] is not None for k in ("enqueued", "started", "finished"))
    assert int(resp.headers["x-queue-time"]) >= 0
    assert int(resp.headers["x-inference-time"]) >= 0


async def test_image_lifecycle(
    client: httpx.AsyncClient, store: JobStore, aredis: aioredis.Redis
) -> None:
    job_id = await submit(client, n=2)
    resp = await client.get(f"/v1/jobs/{job_id}/image")
    assert resp.status_code == 404
    err = error_of(resp)
    assert err["code"] == "result_not_ready" and "queued" in err["message"]

    await run_job(store, job_id, images=[PNG, PNG + b"2"])
    resp = await client.get(f"/v1/jobs/{job_id}/image")
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "image/png" and resp.content == PNG
    resp = await client.get(f"/v1/jobs/{job_id}/image", params={"index": 1})
    assert resp.content == PNG + b"2"
    resp = await client.get(f"/v1/jobs/{job_id}/image", params={"index": 2})
    assert resp.status_code == 404 and error_of(resp)["code"] == "image_not_found"
    resp = await client.get(f"/v1/jobs/{job_id}/image", params={"index": -1})
    assert resp.status_code == 422 and "query.index" in error_of(resp)["message"]

    await aredis.delete(keys.result_key(job_id, 0))  # the result's TTL ran out
    resp = await client.get(f"/v1/jobs/{job_id}/image")
    assert resp.status_code == 410
    err = error_of(resp)
    assert (err["type"], err["code"]) == ("gone_error", "result_expired")


async def test_image_of_expired_and_failed_jobs(client: httpx.AsyncClient, store: JobStore) -> None:
    expired = await submit(client)
    await store.transition(expired, JobState.EXPIRED)
    assert (await client.get(f"/v1/jobs/{expired}/image")).status_code == 410
    failed = await submit(client)
    await store.fail(failed, "CUDA out of memory")
    resp = await client.get(f"/v1/jobs/{failed}/image")
    assert resp.status_code == 404
    err = error_of(resp)
    assert err["code"] == "no_result" and "CUDA out of memory" in err["message"]


async def test_cancel_a_queued_job(client: httpx.AsyncClient, aredis: aioredis.Redis) -> None:
    job_id = await submit(client)
    assert await aredis.zcard(keys.INFLIGHT) == 1
    resp = await client.post(f"/v1/jobs/{job_id}/cancel")
    assert resp.status_code == 202
    assert resp.json() == {"id": job_id, "status": "cancelled"}
    assert await aredis.zcard(keys.INFLIGHT) == 0
    assert (await client.get(f"/v1/jobs/{job_id}")).json()["status"] == "cancelled"
    again = await client.post(f"/v1/jobs/{job_id}/cancel")  # idempotent
    assert again.status_code == 202 and again.json()["status"] == "cancelled"


async def test_cancel_a_running_job(
    client: httpx.AsyncClient, store: JobStore, aredis: aioredis.Redis
) -> None:
    job_id = await submit(client)
    await store.start(job_id, "worker-test", tier=0, total=20)
    resp = await client.post(f"/v1/jobs/{job_id}/cancel")
    assert resp.status_code == 202
    assert resp.json() == {"id": job_id, "status": "cancelling"}
    assert await store.cancel_requested(job_id)
    assert (await client.get(f"/v1/jobs/{job_id}")).json()["status"] == "running"
    assert await aredis.zcard(keys.INFLIGHT) == 1  # until the worker stops it


async def test_cancel_a_finished_job_is_409(client: httpx.AsyncClient, store: JobStore) -> None:
    job_id = await submit(client)
    await run_job(store, job_id)
    resp = await client.post(f"/v1/jobs/{job_id}/cancel")
    assert resp.status_code == 409
    err = error_of(resp)
    assert (err["type"], err["code"]) == ("conflict_error", "job_finished")
    assert "succeeded" in err["message"]
    assert not await store.cancel_requested(job_id)


async def test_redis_down_is_503_everywhere_it_is_needed() -> None:
    settings = settings_for(f"redis://127.0.0.1:{free_port()}/0")
    async with gateway(settings) as client:
        calls = [
            client.post("/v1/jobs", json={"prompt": "a"}),
            client.get("/v1/jobs/abc"),
            client.get("/v1/jobs/abc/image"),
            client.get("/v1/jobs/abc/events"),
            client.post("/v1/jobs/abc/cancel"),
            client.post("/v1/images/generations", json={"prompt": "a"}),
            client.get("/v1/tiers"),
        ]
        for call in calls:
            resp = await call
            assert resp.status_code == 503, resp.request.url
            err = error_of(resp)
            assert (err["type"], err["code"]) == ("service_unavailable", "redis_unavailable")
            assert err["message"].startswith("Redis unavailable: ")
        ready = await client.get("/readyz")
        assert ready.status_code == 503 and "redis" in ready.json()["missing"]
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/metrics")).status_code == 200


@pytest.mark.skipif(bool(os.environ.get("T2I_TEST_REDIS_URL")), reason="external Redis")
async def test_redis_outage_and_recovery(redis_server: RedisServer, redis_url: str) -> None:
    async with gateway(settings_for(redis_url)) as client:
        job_id = await submit(client)
        redis_server.stop()
        try:
            resp = await client.get(f"/v1/jobs/{job_id}")
            assert resp.status_code == 503
            assert error_of(resp)["message"].startswith("Redis unavailable")
        finally:
            redis_server.start()
        # The server restarted empty (no persistence): the client reconnects by itself.
        assert (await client.get(f"/v1/jobs/{job_id}")).status_code == 404
