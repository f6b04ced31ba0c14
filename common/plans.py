"""The allocation plan on the wire: publishing it (controller) and following it (workers,
classifier).

Guarantees:
- ``publish_plan`` writes ``t2i:alloc:current`` and notifies ``t2i:alloc:updates`` in one
  MULTI/EXEC transaction: a subscriber that is notified always finds that plan (or a
  newer one) in the key.
- ``PlanFollower`` only ever moves forward: a plan is accepted when its version is
  higher than the one held (:func:`is_newer`), so a late notification or a re-read of
  an older key never undoes a newer plan. It listens to the channel and re-reads the key
  every ``reread_s`` as a fallback for missed messages (pub/sub is fire-and-forget).
"""

from __future__ import annotations

import asyncio
import logging
import time

import redis.asyncio as aioredis
from pydantic import ValidationError

from common import keys
from common.messages import AllocationPlan

log = logging.getLogger(__name__)


def is_newer(current: AllocationPlan | None, candidate: AllocationPlan) -> bool:
    """True when ``candidate`` should replace ``current`` (strictly higher version)."""
    return current is None or candidate.version > current.version


def tier_of(plan: AllocationPlan | None, instance: str) -> int | None:
    """The tier ``plan`` assigns to worker ``instance``; None when unassigned or no plan."""
    return None if plan is None else plan.assignments.get(instance)


async def read_plan(redis: aioredis.Redis) -> AllocationPlan | None:
    """The stored current plan, or None when none was published.

    Raises:
        pydantic.ValidationError: The stored value is not a valid plan.
    """
    raw = await redis.get(keys.ALLOC_CURRENT)
    return AllocationPlan.model_validate_json(raw) if raw else None


async def publish_plan(redis: aioredis.Redis, plan: AllocationPlan) -> None:
    """Store ``plan`` as current and announce it, atomically (MULTI/EXEC)."""
    data = plan.model_dump_json()
    async with redis.pipeline(transaction=True) as pipe:
        pipe.set(keys.ALLOC_CURRENT, data)
        pipe.publish(keys.ALLOC_UPDATES, data)
        await pipe.execute()


class PlanFollower:
    """Holds the newest plan seen; ``run()`` keeps it up to date until cancelled.

    ``changed`` is set each time a newer plan is accepted (consumers clear it).
    """

    def __init__(self, redis: aioredis.Redis, reread_s: float = 3.0) -> None:
        self.redis = redis
        self.reread_s = reread_s
        self.plan: AllocationPlan | None = None
        self.changed = asyncio.Event()

    def offer(self, plan: AllocationPlan) -> bool:
        """Accept ``plan`` if it is newer than the one held; returns whether it was."""
        if not is_newer(self.plan, plan):
            return False
        self.plan = plan
        self.changed.set()
        log.info("following plan version %d (%s)", plan.version, plan.policy,
                 extra={"plan_version": plan.version})
        return True

    async def refresh(self) -> None:
        """Re-read the stored plan once (a corrupt value is logged and ignored)."""
        try:
            plan = await read_plan(self.redis)
        except ValidationError:
            log.warning("ignoring an invalid plan in %s", keys.ALLOC_CURRENT, exc_info=True)
            return
        if plan is not None:
            self.offer(plan)

    async def run(self) -> None:
        """Follow the channel (and the key every ``reread_s``) until cancelled.

        Redis errors are logged and retried; they never end the loop.
        """
        while True:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(keys.ALLOC_UPDATES)
                await self.refresh()  # after subscribing: nothing published is missed
                last_read = time.monotonic()
                while True:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True,
                                                   timeout=min(self.reread_s, 1.0))
                    if msg is not None and msg.get("type") == "message":
                        try:
                            self.offer(AllocationPlan.model_validate_json(msg["data"]))
                        except ValidationError:
                            log.warning("ignoring an invalid plan message", exc_info=True)
                    if time.monotonic() - last_read >= self.reread_s:
                        await self.refresh()
                        last_read = time.monotonic()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("plan follower: redis error, retrying", exc_info=True)
                await asyncio.sleep(1.0)
            finally:
                await pubsub.aclose()  # type: ignore[no-untyped-call]  # untyped in redis-py 5
