"""HTTP routes of the gateway: thin adapters from HTTP to :mod:`services.gateway.service`.

Every error is raised as an exception and answered by :mod:`services.gateway.errors`
with the one error body; routes never build error responses themselves.
"""

from __future__ import annotations

from typing import Annotated, Any

import redis.asyncio as aioredis
from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from common.settings import GatewaySettings
from services.gateway import ops, sse
from services.gateway.errors import ErrorBody, NotFound
from services.gateway.schemas import (
    MAX_IMAGES,
    CancelResponse,
    HealthResponse,
    ImageGenerationRequest,
    ImagesResponse,
    JobCreated,
    JobCreateRequest,
    JobStatusResponse,
    ReadinessResponse,
    TiersResponse,
)
from services.gateway.service import JobService


async def _service(request: Request) -> JobService:
    service: JobService = request.app.state.service
    return service


async def _settings(request: Request) -> GatewaySettings:
    settings: GatewaySettings = request.app.state.settings
    return settings


async def _redis(request: Request) -> aioredis.Redis:
    redis: aioredis.Redis = request.app.state.redis
    return redis


JobServiceDep = Annotated[JobService, Depends(_service)]
SettingsDep = Annotated[GatewaySettings, Depends(_settings)]
RedisDep = Annotated[aioredis.Redis, Depends(_redis)]
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        max_length=255,
        description="Same key + same body: the same job. Same key + other body: 422.",
    ),
]


def base_url(request: Request, settings: GatewaySettings) -> str:
    """Base of URLs returned to clients: T2I_PUBLIC_URL, else the request's own base."""
    return (settings.public_url or str(request.base_url)).rstrip("/")


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorBody} for code in (*codes, 503)}


router = APIRouter()


@router.post(
    "/v1/jobs",
    status_code=202,
    response_model=JobCreated,
    tags=["jobs"],
    responses=_errors(413, 422, 429),
)
async def create_job(
    body: JobCreateRequest,
    request: Request,
    service: JobServiceDep,
    settings: SettingsDep,
    idempotency_key: IdempotencyKey = None,
) -> JobCreated:
    """Submit a text-to-image job; answers 202 at once with the job's URLs."""
    return await service.submit(body, base_url(request, settings), idempotency_key)


@router.get(
    "/v1/jobs/{job_id}", response_model=JobStatusResponse, tags=["jobs"], responses=_errors(404)
)
async def get_job(job_id: str, response: Response, service: JobServiceDep) -> JobStatusResponse:
    """Status, tier, progress, queue position and timings of a job (headers
    ``x-queue-time``/``x-inference-time`` in ms once known)."""
    body, headers = await service.status(job_id)
    response.headers.update(headers)
    return body


@router.get(
    "/v1/jobs/{job_id}/image",
    tags=["jobs"],
    response_class=Response,
    responses={
        200: {"content": {"image/png": {}}, "description": "PNG bytes"},
        **_errors(404, 410),
    },
)
async def get_image(
    job_id: str, service: JobServiceDep, index: Annotated[int, Query(ge=0, lt=MAX_IMAGES)] = 0
) -> Response:
    """Image ``index`` of a succeeded job as PNG; 404 until then, 410 once expired."""
    return Response(await service.image(job_id, index), media_type="image/png")


@router.get(
    "/v1/jobs/{job_id}/events",
    tags=["jobs"],
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "SSE: status, progress, done"},
        **_errors(404),
    },
)
async def job_events(
    job_id: str, request: Request, service: JobServiceDep, redis: RedisDep
) -> StreamingResponse:
    """Server-sent events of a job until it is terminal (see ``docs/api.md``)."""
    pubsub = await sse.subscribe(redis, job_id)  # before reading the state: no lost event
    try:
        rec = await service.store.get(job_id)
    except BaseException:
        await sse.close(pubsub)
        raise
    if rec is None:
        await sse.close(pubsub)
        raise NotFound(f"job {job_id} not found (unknown, or its record expired)")
    stream = sse.event_stream(pubsub, service.store, rec, request.app.state.sse_keepalive_s)
    return StreamingResponse(
        stream,
        media_type="text/event-stream",
        headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
    )


@router.post(
    "/v1/jobs/{job_id}/cancel",
    status_code=202,
    response_model=CancelResponse,
    tags=["jobs"],
    responses=_errors(404, 409),
)
async def cancel_job(job_id: str, service: JobServiceDep) -> CancelResponse:
    """Cancel a job: never run if not started, stopped between steps if running; 409 if
    it already succeeded, failed or expired."""
    return await service.cancel(job_id)


@router.post(
    "/v1/images/generations",
    response_model=ImagesResponse,
    response_model_exclude_none=True,
    tags=["openai"],
    responses=_errors(409, 413, 422, 429, 502, 504),
)
async def images_generations(
    body: ImageGenerationRequest,
    request: Request,
    service: JobServiceDep,
    settings: SettingsDep,
    idempotency_key: IdempotencyKey = None,
) -> ImagesResponse:
    """OpenAI Images API: generate and wait up to T2I_SYNC_TIMEOUT_S for the images."""
    return await service.generate(body, base_url(request, settings), idempotency_key)


@router.get("/v1/tiers", response_model=TiersResponse, tags=["introspection"], responses=_errors())
async def get_tiers(redis: RedisDep, settings: SettingsDep) -> TiersResponse:
    """Approximation tiers, the controller's current plan and per-tier backlogs."""
    return await ops.tiers(redis, settings)


@router.get(
    "/healthz",
    response_model=HealthResponse,
    tags=["health"],
    responses={503: {"model": HealthResponse}},
)
async def healthz(request: Request) -> JSONResponse:
    """Liveness: 200 while the process serves, 503 once it is shutting down."""
    if request.app.state.shutting_down:
        return JSONResponse({"status": "shutting_down"}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get(
    "/readyz",
    response_model=ReadinessResponse,
    tags=["health"],
    responses={503: {"model": ReadinessResponse}},
)
async def readyz(request: Request, redis: RedisDep, settings: SettingsDep) -> JSONResponse:
    """Readiness: Redis, a fresh classifier and controller heartbeat, >= 1 live worker."""
    report = await ops.readiness(redis, settings, request.app.state.shutting_down)
    return JSONResponse(report.model_dump(), status_code=200 if report.ready else 503)
