"""Introspection for operators: tiers with plan, backlogs and the controller's latest
state (``/v1/tiers``), and readiness (``/readyz``).

Readiness means the gateway can accept work that will be served: Redis answers PING, a
classifier and a controller have a fresh heartbeat, and at least one worker is alive.
"""

from __future__ import annotations

import asyncio
import logging

import redis.asyncio as aioredis
from pydantic import ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from common import keys
from common.heartbeat import fresh, live_services, live_workers
from common.messages import AllocationPlan, ControllerState
from common.redisutil import text
from common.settings import GatewaySettings
from common.tiers import load_registry
from services.gateway.schemas import ReadinessResponse, StreamBacklog, TierInfo, TiersResponse

log = logging.getLogger(__name__)

HEADLESS_SERVICES = ("classifier", "controller")


async def stream_backlog(redis: aioredis.Redis, stream: str, group: str) -> StreamBacklog:
    """Length of ``stream`` and ``group``'s lag and pending count on it.

    Lag is Redis 7's ``lag`` (entries not yet delivered to the group); when Redis cannot
    tell (older server, or lag undefined after deletions) the stream length stands in. A
    missing stream or group reads as empty / all lag.
    """
    length = int(await redis.xlen(stream))
    try:
        groups = await redis.xinfo_groups(stream)
    except ResponseError:  # no such key: the stream was never written
        return StreamBacklog(length=length, lag=length, pending=0)
    for info in groups:
        if text(info.get("name")) == group:
            lag = info.get("lag")
            return StreamBacklog(
                length=length,
                lag=int(lag) if lag is not None else length,
                pending=int(info.get("pending") or 0),
            )
    return StreamBacklog(length=length, lag=length, pending=0)


async def current_plan(redis: aioredis.Redis) -> AllocationPlan | None:
    """The controller's current plan, or None when none is published (or it is
    unreadable, which is logged)."""
    raw = await redis.get(keys.ALLOC_CURRENT)
    if raw is None:
        return None
    try:
        return AllocationPlan.model_validate_json(raw)
    except ValidationError as exc:
        log.warning("unreadable plan at %s: %s", keys.ALLOC_CURRENT, exc)
        return None


async def tiers(redis: aioredis.Redis, settings: GatewaySettings) -> TiersResponse:
    """Tiers of the registry with GPUs per the current plan and their stream backlogs.

    Raises :class:`common.tiers.RegistryError` (answered 503) for a bad registry file.
    """
    registry = await asyncio.to_thread(load_registry, settings.tiers_file)
    plan = await current_plan(redis)
    out = []
    for tier in registry.tiers:
        backlog = await stream_backlog(redis, keys.tier_stream(tier.id), keys.WORKER_GROUP)
        out.append(
            TierInfo(
                id=tier.id,
                name=tier.name,
                strategy=tier.strategy.value,
                steps=tier.steps,
                skip=tier.skip,
                model=tier.model,
                batch_sizes=tier.batch_sizes,
                gpus=plan.gpus_per_tier.get(tier.id, 0) if plan else None,
                backlog=backlog,
            )
        )
    prompts = await stream_backlog(redis, keys.PROMPT_STREAM, keys.CLASSIFIER_GROUP)
    return TiersResponse(registry=registry.name, tiers=out, plan=plan, prompt_backlog=prompts,
                         controller=await controller_state(redis))


async def controller_state(redis: aioredis.Redis) -> ControllerState | None:
    """The controller's latest state (``t2i:controller:state``), or None when absent
    (no controller, or it stopped more than a few periods ago) or unreadable."""
    raw = await redis.get(keys.CONTROLLER_STATE)
    if raw is None:
        return None
    try:
        return ControllerState.model_validate_json(raw)
    except ValidationError as exc:
        log.warning("unreadable controller state at %s: %s", keys.CONTROLLER_STATE, exc)
        return None


async def readiness(
    redis: aioredis.Redis, settings: GatewaySettings, shutting_down: bool = False
) -> ReadinessResponse:
    """Check every dependency; never raises for Redis errors (they are reported)."""
    checks: dict[str, str] = {}
    missing: list[str] = []
    if shutting_down:
        checks["gateway"] = "shutting down"
        missing.append("gateway")
    try:
        await redis.ping()
    except (RedisConnectionError, RedisTimeoutError) as exc:
        checks["redis"] = f"Redis unavailable: {exc}"
        missing.append("redis")
        return ReadinessResponse(ready=False, checks=checks, missing=missing)
    checks["redis"] = "ok"
    max_age = settings.ready_heartbeat_max_age_s
    try:
        for service in HEADLESS_SERVICES:
            beats = [h for h in await live_services(redis, service) if fresh(h.at, max_age)]
            checks[service] = f"{len(beats)} live" if beats else "no fresh heartbeat"
            if not beats:
                missing.append(service)
        workers = [w for w in await live_workers(redis) if fresh(w.at, max_age)]
    except (RedisConnectionError, RedisTimeoutError) as exc:
        checks["redis"] = f"Redis unavailable: {exc}"
        return ReadinessResponse(ready=False, checks=checks, missing=[*missing, "redis"])
    checks["workers"] = f"{len(workers)} live"
    if not workers:
        missing.append("workers")
    return ReadinessResponse(ready=not missing, checks=checks, missing=missing)
