"""The job store: every read and state change of a job, each one atomic in Redis.

Guarantees:
- A terminal state (succeeded, failed, cancelled, expired) is final: later transitions
  are refused, so a job reclaimed after a worker crash never completes twice visibly.
- Every transition and its event are one Lua script: readers never see one without the
  other, and ``t2i:inflight`` (the backlog count) leaves a job exactly once.
- Routing a job (classifier) writes the job, appends it to its tier stream and
  acknowledges the prompt entry in one atomic step.
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Any

import redis.asyncio as aioredis
from pydantic import BaseModel

from common import keys, webhooks
from common.messages import (
    TERMINAL_STATES,
    ClassifiedJob,
    EventKind,
    JobEvent,
    JobState,
    PromptJob,
    now,
)
from common.redisutil import aw, text, text_dict

_TERMINAL = ",".join(sorted(s.value for s in TERMINAL_STATES))

# KEYS: job, inflight, prompt stream, arrivals, idempotency key ('' = none).
# ARGV: job_id, enqueued_at, entry data, job ttl, arrival bucket, idem record, idem ttl,
# max backlog (-1 = none), then field/value pairs.
# Returns {'replay', previous idem record} | {'full', backlog} | {'created', entry id}.
_CREATE = """
if KEYS[5] ~= '' then
  local prev = redis.call('GET', KEYS[5])
  if prev then return {'replay', prev} end
end
local max = tonumber(ARGV[8])
if max >= 0 then
  local n = redis.call('ZCARD', KEYS[2])
  if n >= max then return {'full', tostring(n)} end
end
if KEYS[5] ~= '' then redis.call('SET', KEYS[5], ARGV[6], 'EX', ARGV[7]) end
for i = 9, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('HINCRBY', KEYS[4], ARGV[5], 1)
local id = redis.call('XADD', KEYS[3], '*', 'data', ARGV[3])
return {'created', id}
"""

# KEYS: job, inflight. ARGV: job_id, new_status, allowed_from (csv or ''), channel,
# event_json, then field/value pairs. Returns 1 done, 0 refused, -1 unknown job.
_TRANSITION = """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return -1 end
local function has(csv, v) return string.find(',' .. csv .. ',', ',' .. v .. ',', 1, true) end
if has(ARGV[6], cur) then return 0 end
if ARGV[3] ~= '' and not has(ARGV[3], cur) then return 0 end
for i = 7, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('HSET', KEYS[1], 'status', ARGV[2])
if has(ARGV[6], ARGV[2]) then redis.call('ZREM', KEYS[2], ARGV[1]) end
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
"""

# KEYS: job, tier stream, prompt stream. ARGV: group, prompt entry id, entry data,
# terminal csv, events channel, classified event, then field/value pairs. Returns 1 routed
# (and the event published), 0 skipped (terminal), -1 unknown job; the entry is acked always.
_ROUTE = """
local cur = redis.call('HGET', KEYS[1], 'status')
redis.call('XACK', KEYS[3], ARGV[1], ARGV[2])
if not cur then return -1 end
if string.find(',' .. ARGV[4] .. ',', ',' .. cur .. ',', 1, true) then return 0 end
for i = 7, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('HSET', KEYS[1], 'status', 'classified')
redis.call('XADD', KEYS[2], '*', 'data', ARGV[3])
redis.call('PUBLISH', ARGV[5], ARGV[6])
return 1
"""


# KEYS: job. ARGV: channel, event json. Succeeded -> expired once its images are gone.
_EXPIRE = """
if redis.call('HGET', KEYS[1], 'status') ~= 'succeeded' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'expired')
redis.call('PUBLISH', ARGV[1], ARGV[2])
return 1
"""


# KEYS: job, cancel flag, inflight. ARGV: job_id, worker, tier, total, now, channel,
# running event, cancelled event, terminal csv.
# Returns {0, attempts} skip (unknown/terminal), {2, attempts} cancelled now, {1, attempts}
# running; attempts = how many times the job had been started before.
_ADMIT = """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {0, 0} end
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')
if string.find(',' .. ARGV[9] .. ',', ',' .. cur .. ',', 1, true) then return {0, attempts} end
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[5])
  redis.call('ZREM', KEYS[3], ARGV[1])
  redis.call('PUBLISH', ARGV[6], ARGV[8])
  return {2, attempts}
end
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[2], 'tier', ARGV[3],
           'started_at', ARGV[5], 'step', '0', 'total', ARGV[4], 'attempts', attempts + 1)
redis.call('PUBLISH', ARGV[6], ARGV[7])
return {1, attempts}
"""


class Admission(StrEnum):
    """What a worker must do with a job it read (see :meth:`JobStore.admit`)."""

    RUN = "run"
    SKIP = "skip"
    CANCELLED = "cancelled"


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before with a different request body."""


class BacklogFull(Exception):
    """The backlog cap is reached; ``args[0]`` is the number of unfinished jobs."""

    @property
    def backlog(self) -> int:
        """Unfinished jobs at the time of the refusal."""
        return int(self.args[0])


class JobRecord(BaseModel):
    """A job as stored in its hash, decoded."""

    id: str
    status: JobState
    prompt: str = ""
    seed: int = 0
    n: int = 1
    width: int = 32
    height: int = 32
    slo_ms: int | None = None
    tier: int | None = None
    predicted_tier: int | None = None
    probabilities: list[float] = []
    step: int = 0
    total: int = 0
    enqueued_at: float | None = None
    classified_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    worker: str | None = None
    attempts: int = 0
    images: int = 0
    callback_url: str | None = None
    detail: dict[str, Any] = {}

    @classmethod
    def from_hash(cls, raw: dict[Any, Any]) -> JobRecord:
        """Decode a ``t2i:job:{id}`` hash (empty strings mean absent)."""
        h = {k: v for k, v in text_dict(raw).items() if v != ""}
        for name in ("probabilities", "detail"):
            if name in h:
                h[name] = json.loads(h[name])
        return cls.model_validate(h)


def _flat(fields: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for k, v in fields.items():
        if v is None:
            continue
        out += [k, json.dumps(v) if isinstance(v, list | dict) else str(v)]
    return out


class JobStore:
    """All job reads and writes, over one Redis client (raw bytes)."""

    def __init__(self, redis: aioredis.Redis, job_ttl_s: int = keys.JOB_TTL_S,
                 result_ttl_s: int = keys.RESULT_TTL_S) -> None:
        self.redis = redis
        self.job_ttl_s = job_ttl_s
        self.result_ttl_s = result_ttl_s
        self._create = redis.register_script(_CREATE)
        self._transition = redis.register_script(_TRANSITION)
        self._admit = redis.register_script(_ADMIT)
        self._route = redis.register_script(_ROUTE)
        self._expire = redis.register_script(_EXPIRE)

    async def create(self, job: PromptJob, *, body_hash: str = "",
                     idempotency_key: str | None = None, callback_url: str | None = None,
                     max_backlog: int | None = None) -> tuple[str, bool]:
        """Record and enqueue a job in one atomic step. Returns ``(job_id, created)``.

        With an idempotency key already used for the same body, returns the earlier job
        and ``created=False`` (even when the backlog is full); for another body raises
        :class:`IdempotencyConflict`. With ``max_backlog``, refuses a new job once that
        many are unfinished by raising :class:`BacklogFull` (nothing is written).
        """
        fields = {
            "id": job.job_id, "status": JobState.QUEUED.value, "prompt": job.prompt,
            "seed": job.seed, "n": job.n, "width": job.width, "height": job.height,
            "slo_ms": job.slo_ms, "enqueued_at": job.enqueued_at, "callback_url": callback_url,
        }
        idem = json.dumps({"job_id": job.job_id, "body_hash": body_hash})
        res = await self._create(
            keys=[keys.job_key(job.job_id), keys.INFLIGHT, keys.PROMPT_STREAM, keys.ARRIVALS,
                  keys.idem_key(idempotency_key) if idempotency_key else ""],
            args=[job.job_id, job.enqueued_at, job.model_dump_json(), self.job_ttl_s,
                  str(int(job.enqueued_at)), idem, keys.IDEMPOTENCY_TTL_S,
                  max_backlog if max_backlog is not None else -1, *_flat(fields)],
        )
        kind, value = text(res[0]), text(res[1])
        if kind == "full":
            raise BacklogFull(int(value))
        if kind == "replay":
            prev = json.loads(value)
            if prev["body_hash"] != body_hash:
                raise IdempotencyConflict(idempotency_key or "")
            return str(prev["job_id"]), False
        return job.job_id, True

    async def get(self, job_id: str) -> JobRecord | None:
        """The job, or None when unknown (never created, or its record expired)."""
        raw = await aw(self.redis.hgetall(keys.job_key(job_id)))
        return JobRecord.from_hash(raw) if raw else None

    async def backlog(self) -> int:
        """Accepted jobs not yet in a terminal state."""
        return int(await self.redis.zcard(keys.INFLIGHT))

    async def transition(self, job_id: str, status: JobState, *,
                         allowed_from: tuple[JobState, ...] = (), error: str | None = None,
                         **fields: Any) -> int:
        """Move a job to ``status`` unless it is terminal (or not in ``allowed_from``).

        Publishes a status event in the same atomic step. Returns 1 when done, 0 when
        refused, -1 for an unknown job.
        """
        if error is not None:
            fields["error"] = error
        event = JobEvent(job_id=job_id, kind=EventKind.STATUS, status=status,
                         tier=fields.get("tier"), error=error)
        res = await self._transition(
            keys=[keys.job_key(job_id), keys.INFLIGHT],
            args=[job_id, status.value, ",".join(s.value for s in allowed_from),
                  keys.events_channel(job_id), event.model_dump_json(), _TERMINAL,
                  *_flat(fields)],
        )
        if int(res) == 1 and status.terminal:
            await webhooks.enqueue_if_wanted(self.redis, job_id)
        return int(res)

    async def route(self, job: ClassifiedJob, prompt_entry_id: str | bytes,
                    group: str = keys.CLASSIFIER_GROUP) -> bool:
        """Record the classification, enqueue on the tier stream, ack the prompt entry.

        Atomic. Returns False (and only acks) when the job is already terminal, e.g.
        cancelled while queued.
        """
        fields = {"tier": job.tier, "predicted_tier": job.predicted_tier,
                  "probabilities": job.probabilities, "classified_at": job.classified_at}
        event = JobEvent(job_id=job.job_id, kind=EventKind.STATUS,
                         status=JobState.CLASSIFIED, tier=job.tier)
        res = await self._route(
            keys=[keys.job_key(job.job_id), keys.tier_stream(job.tier), keys.PROMPT_STREAM],
            args=[group, text(prompt_entry_id), job.model_dump_json(), _TERMINAL,
                  keys.events_channel(job.job_id), event.model_dump_json(), *_flat(fields)],
        )
        return int(res) == 1

    async def start(self, job_id: str, worker: str, tier: int, total: int) -> bool:
        """Mark a job running on ``worker``; False when it must not run (terminal)."""
        res = await self.transition(
            job_id, JobState.RUNNING,
            allowed_from=(JobState.QUEUED, JobState.CLASSIFIED, JobState.RUNNING),
            worker=worker, tier=tier, started_at=now(), step=0, total=total)
        if res == 1:
            await aw(self.redis.hincrby(keys.job_key(job_id), "attempts", 1))
        return res == 1

    async def admit(self, job_id: str, worker: str, tier: int, total: int
                    ) -> tuple[Admission, int]:
        """One atomic decision when a worker picks up a job: ``RUN`` (now running on
        ``worker``), ``SKIP`` (unknown or already terminal: just acknowledge it) or
        ``CANCELLED`` (cancel was requested before it started: now cancelled, never run).
        Also returns how many times the job had been started before (0 on a first run)."""
        t = now()
        running = JobEvent(job_id=job_id, kind=EventKind.STATUS, status=JobState.RUNNING,
                           tier=tier, step=0, total=total)
        cancelled = JobEvent(job_id=job_id, kind=EventKind.STATUS, status=JobState.CANCELLED,
                             tier=tier)
        code, attempts = await self._admit(
            keys=[keys.job_key(job_id), keys.cancel_key(job_id), keys.INFLIGHT],
            args=[job_id, worker, tier, total, t, keys.events_channel(job_id),
                  running.model_dump_json(), cancelled.model_dump_json(), _TERMINAL])
        outcome = {0: Admission.SKIP, 1: Admission.RUN, 2: Admission.CANCELLED}[int(code)]
        if outcome is Admission.CANCELLED:
            await webhooks.enqueue_if_wanted(self.redis, job_id)
        return outcome, int(attempts)

    async def progress(self, job_id: str, step: int, total: int) -> None:
        """Record and publish denoising progress (not a state change)."""
        event = JobEvent(job_id=job_id, kind=EventKind.PROGRESS, status=JobState.RUNNING,
                         step=step, total=total)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(keys.job_key(job_id), mapping={"step": step, "total": total})
            pipe.publish(keys.events_channel(job_id), event.model_dump_json())
            await pipe.execute()

    async def succeed(self, job_id: str, images: list[bytes], **fields: Any) -> bool:
        """Store the PNGs (with TTL) then mark the job succeeded; False if already terminal.

        Results are written first, so a succeeded job always has its images.
        """
        async with self.redis.pipeline(transaction=True) as pipe:
            for i, png in enumerate(images):
                pipe.set(keys.result_key(job_id, i), png, ex=self.result_ttl_s)
            pipe.zadd(keys.RESULTS_EXPIRY, {job_id: now() + self.result_ttl_s})
            await pipe.execute()
        res = await self.transition(job_id, JobState.SUCCEEDED, finished_at=now(),
                                    images=len(images), **fields)
        return res == 1

    async def fail(self, job_id: str, error: str) -> bool:
        """Mark a job failed with ``error``; False if already terminal."""
        return await self.transition(job_id, JobState.FAILED, error=error,
                                     finished_at=now()) == 1

    async def request_cancel(self, job_id: str) -> JobState | None:
        """Cancel a job: queued/classified jobs become cancelled at once (never run);
        running jobs get a flag the worker checks between steps. Returns the state after
        the call, or None for an unknown job."""
        await self.redis.set(keys.cancel_key(job_id), b"1", ex=keys.CANCEL_TTL_S)
        res = await self.transition(job_id, JobState.CANCELLED,
                                    allowed_from=(JobState.QUEUED, JobState.CLASSIFIED),
                                    finished_at=now())
        if res == -1:
            return None
        rec = await self.get(job_id)
        return rec.status if rec else None

    async def cancel_requested(self, job_id: str) -> bool:
        """True when a client asked to cancel the job."""
        return bool(await self.redis.exists(keys.cancel_key(job_id)))

    async def image(self, job_id: str, index: int = 0) -> bytes | None:
        """PNG bytes of a finished job's image, or None once expired/absent."""
        data = await self.redis.get(keys.result_key(job_id, index))
        return bytes(data) if data is not None else None

    async def expire_results(self, limit: int = 1000) -> int:
        """Mark succeeded jobs whose images passed their TTL as ``expired``; returns how
        many. Jobs already gone or in another state are just dropped from the index."""
        due = await self.redis.zrangebyscore(keys.RESULTS_EXPIRY, "-inf", now(),
                                             start=0, num=limit)
        done = 0
        for raw in due:
            job_id = text(raw)
            event = JobEvent(job_id=job_id, kind=EventKind.STATUS, status=JobState.EXPIRED)
            done += int(await self._expire(keys=[keys.job_key(job_id)],
                                           args=[keys.events_channel(job_id),
                                                 event.model_dump_json()]))
            await self.redis.zrem(keys.RESULTS_EXPIRY, job_id)
        return done

    async def reconcile_inflight(self, limit: int = 10_000) -> int:
        """Drop ids from the backlog index whose job record no longer exists (TTL);
        returns how many were dropped."""
        ids = [text(i) for i in await self.redis.zrange(keys.INFLIGHT, 0, limit - 1)]
        dropped = 0
        for job_id in ids:
            if not await self.redis.exists(keys.job_key(job_id)):
                dropped += int(await self.redis.zrem(keys.INFLIGHT, job_id))
        return dropped
