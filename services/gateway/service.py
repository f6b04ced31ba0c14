"""The gateway's job logic over :class:`common.jobs.JobStore` (routes stay thin).

Guarantees:
- A request is validated completely (prompt, size, limits) before anything is written.
- With an ``Idempotency-Key``, the same key and body always name the same job (one stream
  entry); another body under the same key is refused (422). The body hash is taken over
  the validated request before the random seed default is filled in, so a retry without
  a seed gets the original job (and its seed) back.
- Over ``max_backlog`` unfinished jobs, new jobs are refused with 429 and
  ``Retry-After``; a replay of an existing idempotent request is still answered.
- While the controller's overload estimate (``t2i:overload``) says overloaded and its
  estimated queueing delay exceeds the request's ``slo_ms`` (or ``overload_max_delay_s``
  without one), new jobs are refused with 429 and ``Retry-After`` = the delay rounded up
  (>= 1 s); replays of idempotent requests are still answered.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
import uuid

from pydantic import BaseModel, ValidationError

from common import keys
from common.jobs import BacklogFull, JobRecord, JobStore
from common.messages import JobState, OverloadEstimate, PromptJob, now
from common.metrics import BACKLOG
from common.settings import GatewaySettings
from services.gateway import sse
from services.gateway.errors import (
    Conflict,
    GenerationFailed,
    Gone,
    InvalidRequest,
    NotFound,
    Overloaded,
    SyncTimeout,
)
from services.gateway.schemas import (
    MAX_SEED,
    CancelResponse,
    ImageData,
    ImageGenerationRequest,
    ImagesResponse,
    JobCreated,
    JobCreateRequest,
    JobStatusResponse,
    Progress,
    Timings,
)


def body_hash(request: BaseModel) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces) of a validated request."""
    canonical = json.dumps(request.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def job_urls(base_url: str, job_id: str) -> dict[str, str]:
    """Absolute status, result and cancel URLs of a job under ``base_url``."""
    status = f"{base_url.rstrip('/')}/v1/jobs/{job_id}"
    return {"status_url": status, "result_url": f"{status}/image", "cancel_url": f"{status}/cancel"}


def timing_headers(rec: JobRecord) -> dict[str, str]:
    """``x-queue-time`` (enqueue to start) and ``x-inference-time`` (start to finish), in
    milliseconds, each only once known."""
    out: dict[str, str] = {}
    if rec.enqueued_at is not None and rec.started_at is not None:
        out["x-queue-time"] = str(round(1000 * (rec.started_at - rec.enqueued_at)))
    if rec.started_at is not None and rec.finished_at is not None:
        out["x-inference-time"] = str(round(1000 * (rec.finished_at - rec.started_at)))
    return out


# Seconds a gateway reuses the controller's overload estimate before re-reading it.
OVERLOAD_REREAD_S = 0.25


class JobService:
    """Submission, status, results, cancellation and synchronous generation of jobs."""

    def __init__(self, store: JobStore, settings: GatewaySettings) -> None:
        self.store = store
        self.redis = store.redis
        self.settings = settings
        self._overload: OverloadEstimate | None = None
        self._overload_read = -OVERLOAD_REREAD_S

    async def _overload_estimate(self) -> OverloadEstimate | None:
        """The controller's overload estimate, re-read from Redis at most every
        :data:`OVERLOAD_REREAD_S` (the controller refreshes it once per control period,
        seconds apart): submissions do not pay a round trip for it."""
        if time.monotonic() - self._overload_read < OVERLOAD_REREAD_S:
            return self._overload
        raw = await self.redis.get(keys.OVERLOAD)
        self._overload_read = time.monotonic()
        try:
            self._overload = OverloadEstimate.model_validate_json(raw) if raw else None
        except ValidationError:
            self._overload = None
        return self._overload

    def _check_prompt(self, prompt: str) -> None:
        limit = self.settings.max_prompt_chars
        if len(prompt) > limit:
            raise InvalidRequest(
                f"body.prompt: prompt is {len(prompt)} characters; the limit is {limit}",
                code="prompt_too_long",
            )

    def _size(self, size: str | None) -> tuple[int, int]:
        allowed = self.settings.allowed_sizes
        chosen = self.settings.default_size if size in (None, "auto") else size
        assert chosen is not None
        if size is not None and size != "auto" and size not in allowed:
            raise InvalidRequest(
                f"body.size: {size!r} is not an allowed size; allowed sizes: {', '.join(allowed)}",
                code="invalid_size",
            )
        width, _, height = chosen.partition("x")
        if not (width.isdigit() and height.isdigit()):
            raise InvalidRequest(
                f"body.size: {chosen!r} is not of the form WxH", code="invalid_size"
            )
        return int(width), int(height)

    async def _check_overload(self, slo_ms: int | None, idempotency_key: str | None) -> None:
        """Raise 429 per the controller's overload estimate (module guarantees)."""
        estimate = await self._overload_estimate()
        if estimate is None:
            return
        limit = slo_ms / 1000 if slo_ms else self.settings.overload_max_delay_s
        retry = estimate.retry_after(limit)
        if retry is None:
            return
        if idempotency_key and await self.redis.exists(keys.idem_key(idempotency_key)):
            return  # a replay: answered with the original job
        raise Overloaded(
            f"the cluster is overloaded: estimated queueing delay {estimate.delay_s:.1f} s "
            f"exceeds {limit:g} s; retry in {retry} s",
            code="overloaded",
            headers={"Retry-After": str(retry)},
        )

    async def submit(
        self, req: JobCreateRequest, base_url: str, idempotency_key: str | None = None
    ) -> JobCreated:
        """Validate, admit and enqueue a job (or find the idempotent original)."""
        self._check_prompt(req.prompt)
        width, height = self._size(req.size)
        digest = body_hash(req)
        await self._check_overload(req.slo_ms, idempotency_key)
        enqueued = now()
        job = PromptJob(
            job_id=uuid.uuid4().hex,
            prompt=req.prompt,
            seed=req.seed if req.seed is not None else secrets.randbelow(MAX_SEED + 1),
            n=req.n,
            width=width,
            height=height,
            slo_ms=req.slo_ms,
            enqueued_at=enqueued,
            deadline=enqueued + req.slo_ms / 1000 if req.slo_ms else None,
        )
        try:
            job_id, created = await self.store.create(
                job,
                body_hash=digest,
                idempotency_key=idempotency_key,
                callback_url=str(req.callback_url) if req.callback_url else None,
                max_backlog=self.settings.max_backlog,
            )
        except BacklogFull as full:
            BACKLOG.set(full.backlog)
            retry = self.settings.backlog_retry_after_s
            raise Overloaded(
                f"{full.backlog} jobs are waiting (limit {self.settings.max_backlog}); "
                f"retry in {retry} s",
                headers={"Retry-After": str(retry)},
            ) from full
        status = JobState.QUEUED
        if not created:
            rec = await self.store.get(job_id)
            status = rec.status if rec else JobState.EXPIRED
        return JobCreated(id=job_id, status=status.value, **job_urls(base_url, job_id))

    async def get(self, job_id: str) -> JobRecord:
        """The job's record; :class:`NotFound` when unknown."""
        rec = await self.store.get(job_id)
        if rec is None:
            raise NotFound(f"job {job_id} not found (unknown, or its record expired)")
        return rec

    async def status(self, job_id: str) -> tuple[JobStatusResponse, dict[str, str]]:
        """The job's status body and its timing headers."""
        rec = await self.get(job_id)
        position = None
        if rec.status in (JobState.QUEUED, JobState.CLASSIFIED):
            rank = await self.redis.zrank(keys.INFLIGHT, job_id)
            position = int(rank) if rank is not None else None
        body = JobStatusResponse(
            id=rec.id,
            status=rec.status.value,
            tier=rec.tier,
            predicted_tier=rec.predicted_tier,
            probabilities=rec.probabilities,
            progress=Progress(step=rec.step, total=rec.total),
            queue_position=position,
            timings=Timings(
                enqueued=rec.enqueued_at,
                classified=rec.classified_at,
                started=rec.started_at,
                finished=rec.finished_at,
            ),
            error=rec.error,
            images=rec.images,
            worker=rec.worker,
            attempts=rec.attempts,
        )
        return body, timing_headers(rec)

    async def image(self, job_id: str, index: int = 0) -> bytes:
        """PNG bytes of image ``index``: 404 while not done or out of range, 410 once
        expired (status expired, or the result's TTL ran out)."""
        rec = await self.get(job_id)
        if rec.status is JobState.EXPIRED:
            raise Gone(f"job {job_id} expired; its result is gone")
        if rec.status is not JobState.SUCCEEDED:
            reason = f": {rec.error}" if rec.error else ""
            code = "result_not_ready" if not rec.status.terminal else "no_result"
            raise NotFound(
                f"job {job_id} has no image: it is {rec.status.value}{reason}", code=code
            )
        if index >= rec.images:
            raise NotFound(
                f"job {job_id} has {rec.images} image(s); index {index} is out of range",
                code="image_not_found",
            )
        data = await self.store.image(job_id, index)
        if data is None:
            raise Gone(
                f"the result of job {job_id} expired (results are kept "
                f"{self.settings.result_ttl_s} s)"
            )
        return data

    async def cancel(self, job_id: str) -> CancelResponse:
        """Cancel a job: ``cancelled`` when it had not started (or was already
        cancelled), ``cancelling`` when running; 409 when it already finished otherwise."""
        rec = await self.get(job_id)
        if rec.status is JobState.CANCELLED:
            return CancelResponse(id=job_id, status="cancelled")
        if rec.status.terminal:
            raise Conflict(
                f"job {job_id} is already {rec.status.value}; nothing to cancel",
                code="job_finished",
            )
        state = await self.store.request_cancel(job_id)
        if state is None:
            raise NotFound(f"job {job_id} not found (unknown, or its record expired)")
        if state is JobState.CANCELLED:
            return CancelResponse(id=job_id, status="cancelled")
        if state.terminal:  # it finished between our read and the cancel
            raise Conflict(
                f"job {job_id} is already {state.value}; nothing to cancel", code="job_finished"
            )
        return CancelResponse(id=job_id, status="cancelling")

    async def generate(
        self, req: ImageGenerationRequest, base_url: str, idempotency_key: str | None = None
    ) -> ImagesResponse:
        """OpenAI-style synchronous generation: submit, wait on the job's events up to
        ``sync_timeout_s``, answer the images. 504 (naming the job) on timeout; 502 when
        the job failed or expired; 409 when it was cancelled."""
        size = None if req.size in (None, "auto") else req.size
        job_req = JobCreateRequest(prompt=req.prompt, n=req.n, size=size)
        created = await self.submit(job_req, base_url, idempotency_key)
        timeout = self.settings.sync_timeout_s
        rec = await sse.wait_terminal(self.redis, self.store, created.id, timeout)
        if rec is None:
            raise GenerationFailed(
                f"job {created.id} vanished (its record expired)", code="job_expired"
            )
        if not rec.status.terminal:
            raise SyncTimeout(
                f"job {created.id} did not finish within {timeout:g} s (it is "
                f"{rec.status.value}); poll {created.status_url} for its result"
            )
        if rec.status is JobState.CANCELLED:
            raise Conflict(f"job {created.id} was cancelled", code="job_cancelled")
        if rec.status is not JobState.SUCCEEDED:
            raise GenerationFailed(
                f"job {created.id} {rec.status.value}: {rec.error or 'no detail'}",
                code="generation_failed" if rec.status is JobState.FAILED else "job_expired",
            )
        data: list[ImageData] = []
        for i in range(rec.images):
            if req.response_format == "url":
                data.append(ImageData(url=f"{created.result_url}?index={i}"))
            else:
                png = await self.image(created.id, i)
                data.append(ImageData(b64_json=base64.b64encode(png).decode()))
        return ImagesResponse(created=int(rec.finished_at or now()), data=data)
