"""Re-homing the backlog of a tier whose workers were all moved away.

A plan that leaves tier ``j`` without workers would strand the jobs already queued on
``t2i:stream:tier:{j}``. After publishing such a plan, the controller moves them, in the
same loop, to the nearest less approximate tier that has workers (no quality loss), or
failing that the nearest more approximate one (:func:`rehome_target`):

- **Unread** entries are taken with ``XREADGROUP`` as the consumer
  :data:`common.keys.REHOME_CONSUMER`: delivery to a group is exclusive, so an entry is
  either taken by a (late) worker of the old plan, which serves it, or by the controller,
  never both.
- **Pending** entries of consumers that are gone (no worker heartbeat) and idle for at
  least ``dead_idle_ms``, or of any consumer and idle longer than ``claim_idle_ms`` (a
  live worker keeps its entries fresh with keepalives), are taken with ``XCLAIM``, which
  re-checks the idle time atomically. A live worker that was reassigned keeps its entries:
  it finishes its batch (and acknowledges it) before switching tier.
- Each entry taken is moved by one Lua script: ``XACK`` on the old stream; only when that
  acknowledged it (returned 1) the job's tier is updated, the entry is appended to the new
  stream and the old one deleted. So an entry is moved at most once, and a job already
  terminal (e.g. cancelled) is only acknowledged, not forwarded.
- A controller that dies between taking and moving leaves the entries pending under
  :data:`~common.keys.REHOME_CONSUMER`; the next pass takes them back first (``XREADGROUP``
  with id ``0`` returns a consumer's own pending entries), whatever tier they are on.

Hence no job is lost or duplicated by a re-plan (``tests/test_controller_rehome.py``
checks it on a real Redis with entries pending and unread).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from pydantic import ValidationError

from common import keys
from common.messages import TERMINAL_STATES, ClassifiedJob
from common.redisutil import text
from common.streams import Entry, StreamConsumer

log = logging.getLogger(__name__)

_TERMINAL = ",".join(sorted(s.value for s in TERMINAL_STATES))
BATCH = 500

# KEYS: old stream, new stream, job hash. ARGV: group, entry id, new data, new tier,
# terminal csv. Returns 1 moved, 2 acknowledged only (job gone or terminal), 0 not ours.
_MOVE = """
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('XDEL', KEYS[1], ARGV[2])
local cur = redis.call('HGET', KEYS[3], 'status')
if (not cur) or string.find(',' .. ARGV[5] .. ',', ',' .. cur .. ',', 1, true) then
  return 2
end
redis.call('HSET', KEYS[3], 'tier', ARGV[4])
redis.call('XADD', KEYS[2], '*', 'data', ARGV[3])
return 1
"""


def rehome_target(tier: int, gpus_per_tier: Mapping[int, int]) -> int | None:
    """Where jobs of ``tier`` go: ``tier`` itself when it has GPUs, else the nearest
    less approximate tier with GPUs, else the nearest more approximate one; None when no
    tier has a GPU (the jobs then wait where they are)."""
    served = sorted(k for k, n in gpus_per_tier.items() if n > 0)
    below = [k for k in served if k <= tier]
    if below:
        return below[-1]
    above = [k for k in served if k > tier]
    return above[0] if above else None


@dataclass(frozen=True)
class Rehomed:
    """Outcome of one pass: entries moved per (from, to), and acknowledged-only ones."""

    moved: dict[tuple[int, int], int]
    dropped: int

    @property
    def total(self) -> int:
        """Entries moved to another stream."""
        return sum(self.moved.values())


class Rehomer:
    """Moves the backlog of tiers without workers (module doc)."""

    def __init__(self, redis: aioredis.Redis, claim_idle_ms: int, dead_idle_ms: int,
                 max_deliveries: int = 3) -> None:
        self.redis = redis
        self.claim_idle_ms = claim_idle_ms
        self.dead_idle_ms = dead_idle_ms
        self.max_deliveries = max_deliveries
        self._move = redis.register_script(_MOVE)

    def _consumer(self, tier: int) -> StreamConsumer:
        return StreamConsumer(self.redis, keys.tier_stream(tier), keys.WORKER_GROUP,
                              keys.REHOME_CONSUMER, max_deliveries=self.max_deliveries)

    async def run(self, gpus_per_tier: Mapping[int, int], live: Collection[str],
                  n_tiers: int) -> Rehomed:
        """One pass over every tier: own pending entries go to their tier's target; tiers
        without GPUs give up their unread and dead consumers' entries too."""
        moved: dict[tuple[int, int], int] = {}
        dropped = 0
        for tier in range(n_tiers):
            target = rehome_target(tier, gpus_per_tier)
            if target is None:
                continue
            consumer = self._consumer(tier)
            if not await self.redis.exists(consumer.stream):
                continue
            await consumer.ensure_group()
            entries = await self._own_pending(consumer)
            if target != tier:
                entries += await self._claim_dead(consumer, live)
                while len(entries) < 10 * BATCH:
                    unread = await consumer.read(count=BATCH, block_ms=None)
                    if not unread:
                        break
                    entries += unread
            for entry in entries:
                outcome = await self._move_one(consumer, entry, tier, target)
                if outcome == 1:
                    moved[(tier, target)] = moved.get((tier, target), 0) + 1
                elif outcome == 2:
                    dropped += 1
        return Rehomed(moved, dropped)

    async def _own_pending(self, consumer: StreamConsumer) -> list[Entry]:
        reply = await self.redis.xreadgroup(consumer.group, consumer.consumer,
                                            {consumer.stream: "0"}, count=BATCH)
        return [Entry(consumer.stream, text(i), f) for _, items in reply or []
                for i, f in items]

    async def _claim_dead(self, consumer: StreamConsumer, live: Collection[str]
                          ) -> list[Entry]:
        infos: list[dict[str, Any]] = await self.redis.xpending_range(
            consumer.stream, consumer.group, min="-", max="+", count=BATCH)
        dead: list[int | bytes | str | memoryview[int]] = []
        stale: list[int | bytes | str | memoryview[int]] = []
        for info in infos:
            owner = text(info["consumer"])
            idle = int(info["time_since_delivered"])
            if owner == consumer.consumer:
                continue
            if owner not in live and idle >= self.dead_idle_ms:
                dead.append(text(info["message_id"]))
            elif idle >= self.claim_idle_ms:
                stale.append(text(info["message_id"]))
        out: list[Entry] = []
        for ids, min_idle in ((dead, self.dead_idle_ms), (stale, self.claim_idle_ms)):
            if not ids:
                continue
            for entry_id, fields in await self.redis.xclaim(
                    consumer.stream, consumer.group, consumer.consumer, min_idle, ids):
                if fields is None:  # deleted meanwhile: nothing to serve
                    await consumer.ack(text(entry_id))
                    continue
                out.append(Entry(consumer.stream, text(entry_id), fields))
        return out

    async def _move_one(self, consumer: StreamConsumer, entry: Entry, tier: int,
                        target: int) -> int:
        try:
            job = ClassifiedJob.from_fields(entry.fields)
        except (ValueError, ValidationError) as exc:
            await consumer.record_error(entry.id, f"undecodable entry: {exc!r}")
            await consumer.dead_letter_entry(entry, "undecodable")
            return 0
        data = job.model_copy(update={"tier": target}).model_dump_json()
        outcome = int(await self._move(
            keys=[consumer.stream, keys.tier_stream(target), keys.job_key(job.job_id)],
            args=[consumer.group, entry.id, data, target, _TERMINAL]))
        if outcome == 1 and target != tier:
            log.info("moved job from tier %d to tier %d", tier, target,
                     extra={"job_id": job.job_id, "tier": target})
        return outcome
