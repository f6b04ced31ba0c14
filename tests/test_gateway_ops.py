"""Gateway: tiers introspection, health and readiness, metrics, and a real HTTP server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import redis.asyncio as aioredis
import uvicorn

from common import keys
from common.heartbeat import beat
from common.messages import AllocationPlan, ClassifiedJob, ServiceHeartbeat, WorkerHeartbeat
from common.settings import DEFAULT_TIERS_FILE
from services.gateway.app import create_app
from tests.conftest import free_port
from tests.test_gateway_support import (
    BASE,
    error_of,
    gateway,
    gateway_app,
    settings_for,
    submit,
)

REGISTRY = """
name: test-world
tiers:
  - {id: 0, name: exact, strategy: exact, model: m, steps: 20, batch_sizes: [1, 4]}
  - {id: 1, name: skip-5, strategy: cache, model: m, steps: 20, skip: 5}
"""


async def test_tiers_with_plan_and_backlog(
    redis_url: str, aredis: aioredis.Redis, tmp_path: Path
) -> None:
    tiers_file = tmp_path / "tiers.yaml"
    tiers_file.write_text(REGISTRY)
    plan = AllocationPlan(
        version=3,
        policy="argus",
        assignments={"w0": 1},
        gpus_per_tier={1: 1},
        routing={0: {0: 0.5, 1: 0.5}},
    )
    await aredis.set(keys.ALLOC_CURRENT, plan.model_dump_json())
    stream = keys.tier_stream(1)
    await aredis.xgroup_create(stream, keys.WORKER_GROUP, id="0", mkstream=True)
    job = ClassifiedJob(job_id="j", prompt="p", seed=1, tier=1, predicted_tier=1)
    for _ in range(3):
        await aredis.xadd(stream, job.to_fields())  # type: ignore[arg-type]
    await aredis.xreadgroup(keys.WORKER_GROUP, "w0", {stream: ">"}, count=1)

    async with gateway(settings_for(redis_url, tiers_file=tiers_file)) as client:
        for _ in range(2):
            await submit(client)  # two entries on the prompt stream, no classifier group
        resp = await client.get("/v1/tiers")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["registry"] == "test-world"
    exact, cache = body["tiers"]
    assert exact == {
        "id": 0,
        "name": "exact",
        "strategy": "exact",
        "steps": 20,
        "skip": 0,
        "model": "m",
        "batch_sizes": [1, 4],
        "gpus": 0,
        "backlog": {"length": 0, "lag": 0, "pending": 0},
    }
    assert (cache["strategy"], cache["skip"], cache["gpus"]) == ("cache", 5, 1)
    assert cache["backlog"] == {"length": 3, "lag": 2, "pending": 1}
    assert body["plan"]["version"] == 3 and body["plan"]["assignments"] == {"w0": 1}
    assert body["prompt_backlog"] == {"length": 2, "lag": 2, "pending": 0}


async def test_tiers_of_the_shipped_registry_without_a_plan(redis_url: str) -> None:
    async with gateway(settings_for(redis_url, tiers_file=DEFAULT_TIERS_FILE)) as client:
        body = (await client.get("/v1/tiers")).json()
    assert body["plan"] is None and body["tiers"][0]["strategy"] == "exact"
    assert all(t["gpus"] is None for t in body["tiers"])


async def test_bad_registry_is_a_clear_503(redis_url: str, tmp_path: Path) -> None:
    bad = tmp_path / "tiers.yaml"
    bad.write_text("name: x\ntiers:\n  - {id: 0, name: a, strategy: steps, model: m, steps: 5}\n")
    async with gateway(settings_for(redis_url, tiers_file=bad)) as client:
        resp = await client.get("/v1/tiers")
    assert resp.status_code == 503
    err = error_of(resp)
    assert (err["type"], err["code"]) == ("service_unavailable", "tier_registry_invalid")
    assert "tier 0 must be the 'exact' tier" in err["message"]
    async with gateway(settings_for(redis_url, tiers_file=tmp_path / "none.yaml")) as client:
        resp = await client.get("/v1/tiers")
    assert resp.status_code == 503 and "not found" in error_of(resp)["message"]


async def test_readiness_needs_heartbeats(redis_url: str, aredis: aioredis.Redis) -> None:
    async with gateway(settings_for(redis_url, ready_heartbeat_max_age_s=5)) as client:
        resp = await client.get("/readyz")
        assert resp.status_code == 503
        assert resp.json()["missing"] == ["classifier", "controller", "workers"]
        assert resp.json()["checks"]["redis"] == "ok"

        for service in ("classifier", "controller"):
            await beat(
                aredis, service, "i0", ServiceHeartbeat(instance="i0", service=service), ttl_s=30
            )
        stale = WorkerHeartbeat(instance="w-old", at=1.0)  # alive key, stale content
        await beat(aredis, "worker", "w-old", stale, ttl_s=30)
        resp = await client.get("/readyz")
        assert resp.status_code == 503 and resp.json()["missing"] == ["workers"]

        await beat(aredis, "worker", "w0", WorkerHeartbeat(instance="w0", tier=0), ttl_s=30)
        resp = await client.get("/readyz")
        assert resp.status_code == 200
        assert resp.json() == {
            "ready": True,
            "missing": [],
            "checks": {
                "redis": "ok",
                "classifier": "1 live",
                "controller": "1 live",
                "workers": "1 live",
            },
        }
        assert (await client.get("/healthz")).json() == {"status": "ok"}


async def test_healthz_reports_shutdown(redis_url: str) -> None:
    async with gateway_app(settings_for(redis_url)) as (app, client):
        assert (await client.get("/healthz")).json() == {"status": "ok"}
    # The lifespan has ended: the process is shutting down.
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as c:
        resp = await c.get("/healthz")
    assert resp.status_code == 503 and resp.json() == {"status": "shutting_down"}


async def test_metrics_count_requests_by_route_template(redis_url: str) -> None:
    async with gateway(settings_for(redis_url)) as client:
        job_id = await submit(client)
        await client.get(f"/v1/jobs/{job_id}")
        await client.get("/v1/jobs/missing")
        await client.get("/metrics")
        resp = await client.get("/metrics")
    assert resp.status_code == 200
    assert 't2i_requests_total{code="200",route="/metrics"}' in resp.text
    text = resp.text
    assert 't2i_requests_total{code="202",route="/v1/jobs"}' in text
    assert 't2i_requests_total{code="200",route="/v1/jobs/{job_id}"}' in text
    assert 't2i_requests_total{code="404",route="/v1/jobs/{job_id}"}' in text
    assert job_id not in text and "/v1/jobs/missing" not in text
    assert "t2i_backlog_jobs 1.0" in text


async def test_sse_over_a_real_server_stops_on_client_disconnect(
    redis_url: str, aredis: aioredis.Redis
) -> None:
    port = free_port()
    app = create_app(settings_for(redis_url), sse_keepalive_s=0.05)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on")
    )
    serving = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(10):
            while not server.started:
                await asyncio.sleep(0.02)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            job_id = await submit(client)
            channel = keys.events_channel(job_id).encode()
            async with client.stream("GET", f"/v1/jobs/{job_id}/events") as resp:
                assert resp.status_code == 200
                lines = resp.aiter_lines()
                assert await anext(lines) == "event: status"
                assert dict(await aredis.pubsub_numsub(channel))[channel] == 1
                seen = [await anext(lines) for _ in range(4)]
                assert ": keepalive" in seen  # the stream is alive while the job waits
            async with asyncio.timeout(5):  # the subscription ends with the client
                while dict(await aredis.pubsub_numsub(channel))[channel] != 0:
                    await asyncio.sleep(0.02)
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 10)
