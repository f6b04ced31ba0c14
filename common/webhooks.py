"""Completion webhooks: enqueued as arq jobs when a job with a ``callback_url`` reaches a
terminal state, delivered by the ``tasks`` service with retries and backoff.

Enqueueing never blocks the caller on the HTTP delivery (arq runs it out of band) and is
deduplicated per job (arq ``_job_id``), so a job reclaimed after a crash is reported once.
"""

from __future__ import annotations

import logging

import redis.asyncio as aioredis
from arq.connections import ArqRedis

from common import keys
from common.redisutil import aw, text

log = logging.getLogger(__name__)

WEBHOOK_TASK = "deliver_webhook"


async def enqueue_if_wanted(redis: aioredis.Redis, job_id: str) -> bool:
    """Enqueue the webhook of a terminal job if it asked for one; True when enqueued.

    Shares ``redis``'s connection pool. Errors are logged, not raised: a webhook must never
    fail the state change that triggered it.
    """
    try:
        url = text(await aw(redis.hget(keys.job_key(job_id), "callback_url")))
        if not url:
            return False
        arq = ArqRedis(pool_or_conn=redis.connection_pool)
        job = await arq.enqueue_job(WEBHOOK_TASK, job_id, _job_id=keys.webhook_job_id(job_id))
        return job is not None
    except Exception:
        log.warning("could not enqueue webhook", extra={"job_id": job_id}, exc_info=True)
        return False
