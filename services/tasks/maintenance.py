"""Periodic maintenance: expire results, reconcile the backlog index, trim acknowledged
stream entries and forget dead consumers that hold nothing.

Every step is safe to run concurrently with the services and to repeat: trimming only
removes entries that every group has had delivered and acknowledged.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from common import keys
from common.jobs import JobStore
from common.redisutil import text

log = logging.getLogger(__name__)

# Consumers idle this long with nothing pending are deleted (their worker is gone).
DEAD_CONSUMER_IDLE_MS = 10 * 60 * 1000


@dataclass
class MaintenanceReport:
    """What one maintenance pass did."""

    expired_results: int = 0
    reconciled_inflight: int = 0
    trimmed_entries: int = 0
    deleted_consumers: int = 0


def _id_tuple(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


async def safe_trim_point(redis: aioredis.Redis, stream: str) -> str | None:
    """The smallest entry id some group still needs (pending, or not yet delivered).

    Everything strictly below it has been delivered to and acknowledged by every group.
    None when the stream has no groups (nothing is known to be consumed).
    """
    groups = await redis.xinfo_groups(stream)
    if not groups:
        return None
    points: list[str] = []
    for g in groups:
        summary = await redis.xpending(stream, g["name"])
        if summary["pending"]:
            points.append(text(summary["min"]))
        last = text(g["last-delivered-id"])
        ms, seq = _id_tuple(last)
        points.append(f"{ms}-{seq + 1}")
    return min(points, key=_id_tuple)


async def trim_stream(redis: aioredis.Redis, stream: str, keep: int = 0) -> int:
    """Delete acknowledged entries below the safe trim point, keeping at least the newest
    ``keep`` entries for inspection; returns how many were deleted."""
    if not await redis.exists(stream):
        return 0
    point = await safe_trim_point(redis, stream)
    if point is None:
        return 0
    if keep:
        newest = await redis.xrevrange(stream, count=keep)
        if len(newest) == keep:
            point = min(point, text(newest[-1][0]), key=_id_tuple)
    return int(await redis.xtrim(stream, minid=point, approximate=False))


async def delete_dead_consumers(redis: aioredis.Redis, stream: str,
                                idle_ms: int = DEAD_CONSUMER_IDLE_MS) -> int:
    """Remove consumers with no pending entries that have been idle longer than
    ``idle_ms``; returns how many."""
    removed = 0
    for g in await redis.xinfo_groups(stream):
        for c in await redis.xinfo_consumers(stream, g["name"]):
            if int(c["pending"]) == 0 and int(c["idle"]) > idle_ms:
                await redis.xgroup_delconsumer(stream, g["name"], c["name"])
                removed += 1
    return removed


async def run_maintenance(redis: aioredis.Redis, keep: int = 0,
                          consumer_idle_ms: int = DEAD_CONSUMER_IDLE_MS) -> MaintenanceReport:
    """One full maintenance pass over every Argus stream and index."""
    store = JobStore(redis)
    report = MaintenanceReport()
    report.expired_results = await store.expire_results()
    report.reconciled_inflight = await store.reconcile_inflight()
    streams = [keys.PROMPT_STREAM]
    async for key in redis.scan_iter(match=keys.tier_stream_pattern(), count=100):
        streams.append(text(key))
    for stream in streams:
        if stream.endswith(":errors") or not await redis.exists(stream):
            continue
        try:
            report.trimmed_entries += await trim_stream(redis, stream, keep)
            report.deleted_consumers += await delete_dead_consumers(redis, stream,
                                                                    consumer_idle_ms)
        except ResponseError:
            log.warning("maintenance skipped %s", stream, exc_info=True)
    return report


async def maintenance(ctx: dict[str, Any]) -> dict[str, int]:
    """arq cron entry point."""
    report = await run_maintenance(ctx["redis_raw"], keep=ctx["settings"].stream_trim_keep)
    log.info("maintenance: %s", asdict(report))
    return asdict(report)
