"""Job events over Redis pub/sub: the SSE stream of ``GET /v1/jobs/{id}/events`` and the
wait of the synchronous OpenAI endpoint.

Both follow the same rule, which is what makes them lossless: subscribe to
``keys.events_channel(id)`` first, *then* read the job's current state. An event
published in between is seen twice at worst (once in the state, once on the channel),
never missed. The job store publishes every transition in the same atomic step as the
state change, so a terminal state always comes with its event. As a guard against a
pub/sub connection that drops messages while reconnecting, the stored state is re-read
every few seconds of silence.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
from pydantic import ValidationError
from redis.asyncio.client import PubSub
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from common import keys
from common.jobs import JobRecord, JobStore
from common.messages import EventKind, JobEvent, JobState
from services.gateway.errors import error_bytes

log = logging.getLogger(__name__)

KEEPALIVE = b": keepalive\n\n"
# Silence after which the stored state is re-read, in case a pub/sub message was lost.
RECHECK_S = 5.0


def format_event(event: str, data: str) -> bytes:
    """One SSE frame (``data`` must be a single line, as JSON is)."""
    return f"event: {event}\ndata: {data}\n\n".encode()


def _status_event(rec: JobRecord) -> JobEvent:
    return JobEvent(
        job_id=rec.id,
        kind=EventKind.STATUS,
        status=rec.status,
        step=rec.step or None,
        total=rec.total or None,
        tier=rec.tier,
        error=rec.error,
    )


def _done(rec_or_event: JobRecord | JobEvent) -> bytes:
    if isinstance(rec_or_event, JobRecord):
        job_id, status, error = rec_or_event.id, rec_or_event.status, rec_or_event.error
    else:
        job_id, status, error = (rec_or_event.job_id, rec_or_event.status, rec_or_event.error)
    return format_event("done", json.dumps({"id": job_id, "status": status.value, "error": error}))


async def subscribe(redis: aioredis.Redis, job_id: str) -> PubSub:
    """A pub/sub connection subscribed to the job's events channel."""
    pubsub = redis.pubsub()
    try:
        await pubsub.subscribe(keys.events_channel(job_id))
    except BaseException:
        await pubsub.aclose()  # type: ignore[no-untyped-call]  # untyped in redis-py 5
        raise
    return pubsub


async def close(pubsub: PubSub) -> None:
    """Unsubscribe and release the connection; never raises (the client may be gone)."""
    try:
        await pubsub.unsubscribe()
    except (RedisConnectionError, RedisTimeoutError, OSError):
        pass
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]  # untyped in redis-py 5


async def _next_event(pubsub: PubSub, timeout: float) -> JobEvent | None:
    """The next well-formed event within ``timeout`` seconds, else None."""
    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=timeout)
    if msg is None or msg.get("type") != "message":
        return None
    try:
        return JobEvent.model_validate_json(msg["data"])
    except ValidationError:
        log.warning("ignoring a malformed job event: %r", msg["data"])
        return None


async def event_stream(
    pubsub: PubSub, store: JobStore, rec: JobRecord, keepalive_s: float
) -> AsyncIterator[bytes]:
    """SSE frames for one job, from its current state ``rec`` to its terminal state.

    ``pubsub`` must already be subscribed (see :func:`subscribe`) when ``rec`` was read;
    it is closed when the stream ends, including on client disconnect (cancellation).
    Frames: ``status`` first (the current state), then ``status``/``progress`` as they
    happen (a repeated status is not re-sent), ``: keepalive`` comments after
    ``keepalive_s`` of silence, and ``done`` (``{id, status, error}``) as the last frame.
    A Redis failure mid-stream ends it with an ``error`` frame (the error body).
    """
    try:
        yield format_event("status", _status_event(rec).model_dump_json())
        if rec.status.terminal:
            yield _done(rec)
            return
        last_status: JobState = rec.status
        last_sent = last_check = time.monotonic()
        while True:
            event = await _next_event(pubsub, timeout=min(keepalive_s, RECHECK_S))
            now = time.monotonic()
            if event is None:
                if now - last_check >= RECHECK_S:
                    last_check = now
                    current = await store.get(rec.id)
                    if current is None or current.status.terminal:
                        final = current or rec.model_copy(update={"status": JobState.EXPIRED})
                        yield format_event("status", _status_event(final).model_dump_json())
                        yield _done(final)
                        return
                if now - last_sent >= keepalive_s:
                    last_sent = now
                    yield KEEPALIVE
                continue
            last_sent = last_check = now
            if event.kind is EventKind.PROGRESS:
                yield format_event("progress", event.model_dump_json())
                continue
            if event.status is not last_status:
                last_status = event.status
                yield format_event("status", event.model_dump_json())
            if event.status.terminal:
                yield _done(event)
                return
    except (RedisConnectionError, RedisTimeoutError) as exc:
        log.warning(
            "event stream of job %s ended: Redis unavailable: %s",
            rec.id,
            exc,
            extra={"job_id": rec.id},
        )
        body = error_bytes(
            "service_unavailable", f"Redis unavailable: {exc}", "redis_unavailable"
        ).decode()
        yield format_event("error", body)
    finally:
        await close(pubsub)


async def wait_terminal(
    redis: aioredis.Redis, store: JobStore, job_id: str, timeout_s: float
) -> JobRecord | None:
    """Wait, on the job's events channel, until the job is terminal or ``timeout_s`` passes.

    Returns the job's last known record (terminal unless the wait timed out), or None
    when the job is unknown.
    """
    pubsub = await subscribe(redis, job_id)
    try:
        deadline = time.monotonic() + timeout_s
        rec = await store.get(job_id)
        last_check = time.monotonic()
        while rec is not None and not rec.status.terminal:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            event = await _next_event(pubsub, timeout=min(left, RECHECK_S))
            terminal_event = (
                event is not None and event.kind is EventKind.STATUS and event.status.terminal
            )
            if terminal_event or time.monotonic() - last_check >= RECHECK_S:
                last_check = time.monotonic()
                rec = await store.get(job_id)
        return rec
    finally:
        await close(pubsub)
