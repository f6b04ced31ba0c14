"""What the controller reads from Redis each period: arrivals, the predicted-tier mix and
the backlogs; with the pure bucket arithmetic factored out.

Buckets. The gateway counts arrivals per epoch second (``HINCRBY t2i:arrivals <second>
1``, in the job's creation script) and the classifier counts predicted tiers per second
(``HINCRBY t2i:mix "<second>:<tier>" n``). The controller reads whole seconds only
(the current second is still filling), so every arrival is counted exactly once over
consecutive periods: each period counts the seconds ``(last, now - 1]``. Buckets older
than the retention are deleted by the controller (HDEL), so both hashes stay bounded.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from common import keys
from common.redisutil import aw, text

LAG_COUNT_CAP = 100_000


def parse_buckets(raw: Mapping[object, object]) -> dict[int, int]:
    """``{second: count}`` from a ``t2i:arrivals`` reply (malformed fields skipped)."""
    out: dict[int, int] = {}
    for k, v in raw.items():
        try:
            out[int(text(k))] = int(text(v))
        except ValueError:
            continue
    return out


def count_between(buckets: Mapping[int, int], after: int, upto: int) -> int:
    """Arrivals in the seconds ``after < s <= upto``."""
    return sum(c for s, c in buckets.items() if after < s <= upto)


def parse_mix(raw: Mapping[object, object]) -> dict[tuple[int, int], int]:
    """``{(second, tier): count}`` from a ``t2i:mix`` reply (malformed fields skipped)."""
    out: dict[tuple[int, int], int] = {}
    for k, v in raw.items():
        second, _, tier = text(k).partition(":")
        try:
            out[(int(second), int(tier))] = int(text(v))
        except ValueError:
            continue
    return out


def mix_shares(counts: Mapping[tuple[int, int], int], since: int, n_tiers: int
               ) -> dict[int, float]:
    """Share of predictions per tier over seconds ``>= since`` (sums to 1; empty when
    nothing was predicted). Tiers outside ``0..n_tiers-1`` are ignored."""
    totals = [0] * n_tiers
    for (second, tier), c in counts.items():
        if second >= since and 0 <= tier < n_tiers and c > 0:
            totals[tier] += c
    total = sum(totals)
    return {k: c / total for k, c in enumerate(totals) if c} if total else {}


async def read_arrivals(redis: aioredis.Redis, after: int, upto: int, keep_s: int) -> int:
    """Arrivals in seconds ``(after, upto]``; deletes buckets older than ``upto - keep_s``."""
    buckets = parse_buckets(await aw(redis.hgetall(keys.ARRIVALS)))
    old = [str(s) for s in buckets if s < upto - keep_s]
    if old:
        await aw(redis.hdel(keys.ARRIVALS, *old))
    return count_between(buckets, after, upto)


async def read_mix(redis: aioredis.Redis, now_s: int, window_s: int, n_tiers: int
                   ) -> dict[int, float]:
    """Predicted-tier shares over the last ``window_s`` whole seconds; deletes older
    buckets."""
    raw = await aw(redis.hgetall(keys.MIX))
    counts = parse_mix(raw)
    since = now_s - window_s
    old = [keys.mix_field(s, k) for (s, k) in counts if s < since]
    if old:
        await aw(redis.hdel(keys.MIX, *old))
    return mix_shares(counts, since, n_tiers)


@dataclass(frozen=True)
class Backlog:
    """Entries of one stream not yet acknowledged by its group.

    Attributes:
        unread: Not yet delivered to any consumer (the group's lag).
        pending: Delivered, not acknowledged.
    """

    unread: int
    pending: int

    @property
    def total(self) -> int:
        """Jobs still to be served from this stream."""
        return self.unread + self.pending


async def stream_backlog(redis: aioredis.Redis, stream: str, group: str) -> Backlog:
    """The group's backlog on ``stream``: Redis 7's ``lag`` when defined, else the
    entries after the group's last-delivered id are counted (up to a cap)."""
    try:
        groups = await redis.xinfo_groups(stream)
    except ResponseError:  # the stream does not exist yet
        return Backlog(0, 0)
    for info in groups:
        if text(info.get("name")) != group:
            continue
        pending = int(info.get("pending") or 0)
        lag = info.get("lag")
        if lag is not None:
            return Backlog(int(lag), pending)
        last = text(info.get("last-delivered-id")) or "0-0"
        after = await redis.xrange(stream, min=f"({last}", max="+", count=LAG_COUNT_CAP)
        return Backlog(len(after), pending)
    return Backlog(int(await redis.xlen(stream)), 0)


async def tier_backlogs(redis: aioredis.Redis, n_tiers: int) -> dict[int, Backlog]:
    """Backlog of every tier stream (group ``workers``)."""
    return {k: await stream_backlog(redis, keys.tier_stream(k), keys.WORKER_GROUP)
            for k in range(n_tiers)}
