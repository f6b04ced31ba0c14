"""Heartbeats of headless services: a PSETEX'd key per instance whose value is the JSON
heartbeat. A key that is absent means the instance is dead (or never started)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import redis.asyncio as aioredis

from common import keys
from common.messages import Message, ServiceHeartbeat, WorkerHeartbeat, now
from common.redisutil import connect

log = logging.getLogger(__name__)


async def beat(redis: aioredis.Redis, service: str, instance: str, payload: Message,
               ttl_s: float) -> None:
    """Publish one heartbeat that expires after ``ttl_s``."""
    await redis.psetex(keys.heartbeat_key(service, instance), int(ttl_s * 1000),
                       payload.model_dump_json())


async def beat_forever(redis: aioredis.Redis, service: str, instance: str,
                       make: Callable[[], Message], interval_s: float, ttl_s: float) -> None:
    """Beat every ``interval_s`` until cancelled; Redis errors are logged, never raised."""
    while True:
        try:
            await beat(redis, service, instance, make(), ttl_s)
        except Exception:
            log.warning("heartbeat failed", exc_info=True)
        await asyncio.sleep(interval_s)


async def live_workers(redis: aioredis.Redis) -> list[WorkerHeartbeat]:
    """Heartbeats of every live worker, sorted by instance name."""
    out = []
    async for key in redis.scan_iter(match=keys.heartbeat_pattern("worker"), count=500):
        raw = await redis.get(key)
        if raw:
            out.append(WorkerHeartbeat.model_validate_json(raw))
    return sorted(out, key=lambda h: h.instance)


async def live_services(redis: aioredis.Redis, service: str) -> list[ServiceHeartbeat]:
    """Heartbeats of every live instance of a headless service other than workers."""
    out = []
    async for key in redis.scan_iter(match=keys.heartbeat_pattern(service), count=100):
        raw = await redis.get(key)
        if raw:
            out.append(ServiceHeartbeat.model_validate_json(raw))
    return out


def fresh(at: float, max_age_s: float) -> bool:
    """True when a heartbeat taken at ``at`` is younger than ``max_age_s``."""
    return now() - at <= max_age_s


async def any_live(redis_url: str, service: str) -> bool:
    """True when at least one heartbeat of ``service`` is live (the ``--check`` probe).

    Instance names are per process (``host-pid``), so a probe run as another process
    cannot name "its" instance: any live heartbeat means the service is up. Redis errors
    count as unhealthy (False), never raise.
    """
    redis = connect(redis_url, socket_timeout=2.0)
    try:
        return bool(await (live_workers(redis) if service == "worker"
                           else live_services(redis, service)))
    except Exception:
        return False
    finally:
        await redis.aclose()
