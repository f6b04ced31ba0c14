"""Gateway: job submission, input validation, idempotency, backpressure, request ids."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from common import keys
from tests.test_gateway_support import (
    BASE,
    error_of,
    gateway,
    gateway_app,
    prompt_jobs,
    settings_for,
)


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with gateway(
        settings_for(
            redis_url, max_prompt_chars=50, max_body_bytes=1024, allowed_sizes=["32x32", "64x48"]
        )
    ) as c:
        yield c


async def test_create_job_enqueues_and_returns_links(
    client: httpx.AsyncClient, aredis: aioredis.Redis
) -> None:
    resp = await client.post(
        "/v1/jobs", json={"prompt": "two blue squares", "n": 2, "size": "64x48", "slo_ms": 2000}
    )
    assert resp.status_code == 202
    body = resp.json()
    job_id = body["id"]
    assert len(job_id) == 32 and int(job_id, 16) >= 0
    assert body == {
        "id": job_id,
        "status": "queued",
        "status_url": f"{BASE}/v1/jobs/{job_id}",
        "result_url": f"{BASE}/v1/jobs/{job_id}/image",
        "cancel_url": f"{BASE}/v1/jobs/{job_id}/cancel",
    }
    [job] = await prompt_jobs(aredis)
    assert (job.job_id, job.prompt, job.n, job.width, job.height) == (
        job_id,
        "two blue squares",
        2,
        64,
        48,
    )
    assert 0 <= job.seed < 2**31
    assert job.deadline == pytest.approx(job.enqueued_at + 2.0)
    assert await aredis.zscore(keys.INFLIGHT, job_id) == job.enqueued_at


async def test_defaults_and_public_url(redis_url: str, aredis: aioredis.Redis) -> None:
    settings = settings_for(redis_url, public_url="https://images.example.com/")
    async with gateway(settings) as client:
        resp = await client.post("/v1/jobs", json={"prompt": "a cat", "seed": 42})
    assert resp.json()["status_url"].startswith("https://images.example.com/v1/jobs/")
    [job] = await prompt_jobs(aredis)
    assert (job.seed, job.n, job.width, job.height, job.deadline) == (42, 1, 32, 32, None)


BAD_BODIES: list[tuple[str, Any, str, str]] = [
    # (case, json body, expected code, text expected in the message)
    ("empty prompt", {"prompt": ""}, "validation_error", "body.prompt: prompt must not be"),
    ("blank prompt", {"prompt": " \n\t "}, "validation_error", "empty or whitespace"),
    ("long prompt", {"prompt": "x" * 51}, "prompt_too_long", "the limit is 50"),
    ("n zero", {"prompt": "a", "n": 0}, "validation_error", "body.n"),
    ("n five", {"prompt": "a", "n": 5}, "validation_error", "less than or equal to 4"),
    ("n as word", {"prompt": "a", "n": "two"}, "validation_error", "body.n"),
    ("prompt as number", {"prompt": 12}, "validation_error", "body.prompt"),
    ("missing prompt", {"n": 1}, "validation_error", "body.prompt: Field required"),
    (
        "unknown size",
        {"prompt": "a", "size": "33x33"},
        "invalid_size",
        "allowed sizes: 32x32, 64x48",
    ),
    (
        "bad callback",
        {"prompt": "a", "callback_url": "not a url"},
        "validation_error",
        "body.callback_url",
    ),
    (
        "ftp callback",
        {"prompt": "a", "callback_url": "ftp://x.example/hook"},
        "validation_error",
        "body.callback_url",
    ),
    ("negative seed", {"prompt": "a", "seed": -1}, "validation_error", "body.seed"),
    ("unknown field", {"prompt": "a", "steps": 3}, "validation_error", "body.steps"),
    ("not an object", ["a"], "validation_error", "body"),
]


@pytest.mark.parametrize(
    ("case", "body", "code", "text"), BAD_BODIES, ids=[c[0] for c in BAD_BODIES]
)
async def test_bad_input_is_422_with_the_error_body(
    client: httpx.AsyncClient, aredis: aioredis.Redis, case: str, body: Any, code: str, text: str
) -> None:
    resp = await client.post("/v1/jobs", json=body)
    assert resp.status_code == 422, case
    err = error_of(resp)
    assert (err["type"], err["code"]) == ("invalid_request_error", code)
    assert text in err["message"]
    assert await aredis.xlen(keys.PROMPT_STREAM) == 0


async def test_non_json_body_is_422(client: httpx.AsyncClient) -> None:
    resp = await client.post(
        "/v1/jobs", content=b"{prompt: oops", headers={"content-type": "application/json"}
    )
    assert resp.status_code == 422
    err = error_of(resp)
    assert err["code"] == "invalid_json"
    assert "not valid JSON" in err["message"]
    resp = await client.post(
        "/v1/jobs", content=b"prompt=a", headers={"content-type": "text/plain"}
    )
    assert resp.status_code == 422
    assert error_of(resp)["type"] == "invalid_request_error"


async def test_oversized_body_is_413_by_header_and_by_stream(
    client: httpx.AsyncClient, aredis: aioredis.Redis
) -> None:
    big = b'{"prompt": "' + b"a" * 2000 + b'"}'
    resp = await client.post("/v1/jobs", content=big, headers={"content-type": "application/json"})
    assert resp.status_code == 413
    err = error_of(resp)
    assert err["code"] == "request_too_large" and "1024 bytes" in err["message"]

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: chunked upload
        for i in range(0, len(big), 256):
            yield big[i : i + 256]

    resp = await client.post(
        "/v1/jobs", content=chunks(), headers={"content-type": "application/json"}
    )
    assert resp.status_code == 413
    assert error_of(resp)["code"] == "request_too_large"
    assert "x-request-id" in resp.headers
    assert await aredis.xlen(keys.PROMPT_STREAM) == 0


async def test_idempotency_key(client: httpx.AsyncClient, aredis: aioredis.Redis) -> None:
    headers = {"Idempotency-Key": "order-17"}
    first = await client.post("/v1/jobs", json={"prompt": "a dog"}, headers=headers)
    again = await client.post("/v1/jobs", json={"prompt": "a dog"}, headers=headers)
    assert first.status_code == again.status_code == 202
    assert first.json() == again.json()
    assert await aredis.xlen(keys.PROMPT_STREAM) == 1

    other = await client.post("/v1/jobs", json={"prompt": "a cat"}, headers=headers)
    assert other.status_code == 422
    err = error_of(other)
    assert err["code"] == "idempotency_conflict" and "order-17" in err["message"]
    assert await aredis.xlen(keys.PROMPT_STREAM) == 1

    fresh = await client.post(
        "/v1/jobs", json={"prompt": "a dog"}, headers={"Idempotency-Key": "order-18"}
    )
    assert fresh.json()["id"] != first.json()["id"]
    assert await aredis.xlen(keys.PROMPT_STREAM) == 2


async def test_backlog_full_is_429_with_retry_after(redis_url: str, aredis: aioredis.Redis) -> None:
    settings = settings_for(redis_url, max_backlog=2, backlog_retry_after_s=7)
    async with gateway(settings) as client:
        replay = {"Idempotency-Key": "k1"}
        first = await client.post("/v1/jobs", json={"prompt": "a"}, headers=replay)
        await client.post("/v1/jobs", json={"prompt": "b"})
        resp = await client.post("/v1/jobs", json={"prompt": "c"})
        assert resp.status_code == 429
        assert resp.headers["retry-after"] == "7"
        err = error_of(resp)
        assert (err["type"], err["code"]) == ("rate_limit_error", "backlog_full")
        assert "limit 2" in err["message"]
        # A replay of an accepted request still gets its job.
        again = await client.post("/v1/jobs", json={"prompt": "a"}, headers=replay)
        assert again.status_code == 202 and again.json()["id"] == first.json()["id"]
    assert await aredis.xlen(keys.PROMPT_STREAM) == 2


async def test_request_id_is_echoed_or_generated(client: httpx.AsyncClient) -> None:
    resp = await client.get("/healthz", headers={"x-request-id": "trace-abc.1"})
    assert resp.headers["x-request-id"] == "trace-abc.1"
    resp = await client.get("/healthz")
    assert len(resp.headers["x-request-id"]) == 32
    resp = await client.get("/healthz", headers={"x-request-id": "bad id\twith spaces"})
    assert resp.headers["x-request-id"] != "bad id\twith spaces"
    resp = await client.post("/v1/jobs", json={"prompt": ""}, headers={"x-request-id": "r2"})
    assert resp.headers["x-request-id"] == "r2"


async def test_unknown_route_and_method_use_the_error_body(client: httpx.AsyncClient) -> None:
    resp = await client.get("/v2/nothing")
    assert resp.status_code == 404 and error_of(resp)["type"] == "not_found_error"
    resp = await client.delete("/v1/jobs")
    assert resp.status_code == 405 and error_of(resp)["code"] == "method_not_allowed"


async def test_unexpected_error_is_500_with_the_error_body(redis_url: str) -> None:
    async def broken(*_: Any) -> None:
        raise RuntimeError("secret internals")

    async with gateway_app(settings_for(redis_url)) as (app, client):
        app.state.service.status = broken
        resp = await client.get("/v1/jobs/abc", headers={"x-request-id": "r500"})
    assert resp.status_code == 500
    err = error_of(resp)
    assert (err["type"], err["code"]) == ("server_error", "internal_error")
    assert "r500" in err["message"] and "secret" not in err["message"]
    assert resp.headers["x-request-id"] == "r500"


async def test_openapi_documents_the_surface(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    for path in (
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/image",
        "/v1/jobs/{job_id}/events",
        "/v1/jobs/{job_id}/cancel",
        "/v1/images/generations",
        "/v1/tiers",
        "/healthz",
        "/readyz",
    ):
        assert path in spec["paths"], path
    assert spec["components"]["schemas"]["JobCreateRequest"]["examples"]
    assert (await client.get("/docs")).status_code == 200
