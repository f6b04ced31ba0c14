"""Redis Streams with consumer groups: the at-least-once request path.

Guarantees:
- ``ensure_group`` is idempotent (BUSYGROUP is ignored) and creates the stream.
- An entry is pending until ``ack``; a consumer that dies leaves its entries pending and
  ``reclaim`` (XAUTOCLAIM) hands entries idle longer than ``claim_idle_ms`` to a live one.
- ``keepalive`` resets the idle time of entries still being worked on, so a slow job is
  not reclaimed while its worker is alive.
- An entry delivered more than ``max_deliveries`` times goes to the dead-letter stream
  with its last recorded error and is acknowledged, so poison messages stop cycling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from common import keys
from common.messages import now
from common.redisutil import aw, text


@dataclass(frozen=True)
class Entry:
    """One stream entry as delivered to this consumer."""

    stream: str
    id: str
    fields: dict[bytes, bytes]
    deliveries: int = 1


class StreamConsumer:
    """One consumer of one group on one stream."""

    def __init__(self, redis: aioredis.Redis, stream: str, group: str, consumer: str, *,
                 claim_idle_ms: int = 30_000, max_deliveries: int = 3,
                 dead_letter: str = keys.DEAD_LETTER_STREAM) -> None:
        self.redis = redis
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.claim_idle_ms = claim_idle_ms
        self.max_deliveries = max_deliveries
        self.dead_letter = dead_letter

    async def ensure_group(self) -> None:
        """Create the group (and the stream) if missing; safe to call any number of times."""
        try:
            await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def read(self, count: int = 1, block_ms: int | None = 1000) -> list[Entry]:
        """New entries for this consumer, blocking up to ``block_ms`` (None: don't block)."""
        try:
            reply = await self.redis.xreadgroup(self.group, self.consumer, {self.stream: ">"},
                                                count=count, block=block_ms)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self.ensure_group()
            return []
        out: list[Entry] = []
        for _stream, items in reply or []:
            for entry_id, fields in items:
                out.append(Entry(self.stream, text(entry_id), fields))
        return out

    async def ack(self, *ids: str) -> int:
        """Acknowledge entries; returns how many were pending."""
        if not ids:
            return 0
        return int(await self.redis.xack(self.stream, self.group, *ids))

    async def keepalive(self, *ids: str) -> None:
        """Reset the idle time of our own pending entries (no delivery-count increase)."""
        if ids:
            await self.redis.xclaim(self.stream, self.group, self.consumer, 0, list(ids),
                                    justid=True)

    async def record_error(self, entry_id: str, error: str) -> None:
        """Remember the last error of an entry (shown in its dead letter)."""
        k = keys.delivery_errors_key(self.stream)
        await aw(self.redis.hset(k, entry_id, error[:2000]))
        await self.redis.expire(k, keys.DELIVERY_ERROR_TTL_S)

    async def reclaim(self, count: int = 10) -> tuple[list[Entry], list[Entry]]:
        """Claim entries idle longer than ``claim_idle_ms`` from any consumer.

        Returns ``(to_process, dead_lettered)``: entries over ``max_deliveries`` are moved
        to the dead-letter stream and acknowledged instead of being returned.
        Works with the 2-element (Redis 6.2) and 3-element (Redis 7) XAUTOCLAIM replies.
        """
        try:
            res: Any = await self.redis.xautoclaim(self.stream, self.group, self.consumer,
                                                   self.claim_idle_ms, "0-0", count=count)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self.ensure_group()
            return [], []
        claimed = [(text(i), f) for i, f in res[1] if f is not None]
        if not claimed:
            return [], []
        counts: dict[str, int] = {}
        for info in await self.redis.xpending_range(
                self.stream, self.group, min=claimed[0][0], max=claimed[-1][0],
                count=len(claimed) + 100, consumername=self.consumer):
            counts[text(info["message_id"])] = int(info["times_delivered"])
        live: list[Entry] = []
        dead: list[Entry] = []
        for entry_id, fields in claimed:
            entry = Entry(self.stream, entry_id, fields, counts.get(entry_id, 2))
            (dead if entry.deliveries > self.max_deliveries else live).append(entry)
        for entry in dead:
            await self.dead_letter_entry(entry, "max deliveries exceeded")
        return live, dead

    async def dead_letter_entry(self, entry: Entry, reason: str) -> None:
        """Copy an entry to the dead-letter stream with its last error, then ack it."""
        err = await aw(self.redis.hget(keys.delivery_errors_key(self.stream), entry.id))
        fields: dict[Any, Any] = dict(entry.fields)
        fields.update({"source_stream": self.stream, "source_id": entry.id,
                       "deliveries": str(entry.deliveries), "reason": reason,
                       "error": text(err), "dead_at": str(now())})
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(self.dead_letter, fields)
            pipe.xack(self.stream, self.group, entry.id)
            pipe.hdel(keys.delivery_errors_key(self.stream), entry.id)
            await pipe.execute()
