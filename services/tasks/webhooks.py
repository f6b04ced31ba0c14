"""Webhook delivery (arq task): POST the job's final state to its ``callback_url``.

Retries with exponential backoff (1, 2, 4, ... s) on connection errors and 5xx/429
answers, up to ``T2I_WEBHOOK_MAX_TRIES`` tries; a 4xx other than 429 is final.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx
from arq import Retry

from common.jobs import JobStore

log = logging.getLogger(__name__)


def webhook_body(job: Any) -> dict[str, Any]:
    """The JSON a callback receives: id, status, tier, error and timings."""
    return {
        "id": job.id, "status": job.status.value, "tier": job.tier, "error": job.error,
        "images": job.images,
        "timings": {"enqueued": job.enqueued_at, "classified": job.classified_at,
                    "started": job.started_at, "finished": job.finished_at},
    }


async def deliver_webhook(ctx: dict[str, Any], job_id: str) -> int:
    """Deliver one job's webhook; returns the HTTP status code received."""
    job = await JobStore(ctx["redis_raw"]).get(job_id)
    if job is None or not job.callback_url:
        log.warning("webhook: job gone or without callback", extra={"job_id": job_id})
        return 0
    timeout = ctx["settings"].webhook_timeout_s
    try:
        async with httpx.AsyncClient(timeout=timeout) as client:
            resp = await client.post(job.callback_url, json=webhook_body(job),
                                     headers={"x-argus-job-id": job_id})
    except httpx.HTTPError as exc:
        log.warning("webhook try %s failed: %s", ctx["job_try"], exc, extra={"job_id": job_id})
        raise Retry(defer=2 ** (ctx["job_try"] - 1)) from exc
    if resp.status_code >= 500 or resp.status_code == 429:
        log.warning("webhook try %s got %s", ctx["job_try"], resp.status_code,
                    extra={"job_id": job_id})
        raise Retry(defer=2 ** (ctx["job_try"] - 1))
    log.info("webhook delivered (%s)", resp.status_code, extra={"job_id": job_id})
    return resp.status_code
