"""The worker loop: follow the plan, consume the tier stream, generate, store, ack.

Guarantees (the at-least-once request path):
- No accepted job is lost: an entry is acknowledged only after its outcome is stored
  (images + succeeded, cancelled, or failed and dead-lettered). A worker that dies
  leaves its entries pending; live workers reclaim them every ``claim_idle_ms / 2``.
- No job completes twice visibly: ``JobStore``'s terminal states are final, so a
  reclaimed duplicate's ``succeed`` is refused.
- A job whose cancel was requested before it starts never runs; one cancelled while
  running stops between denoising steps (the whole batch is interrupted when every job
  in it is cancelled, otherwise only the cancelled jobs' images are dropped).
- A failed generation is retried through reclaim; after ``max_deliveries`` deliveries
  the entry is dead-lettered with its last error and the job is failed.
- A plan change takes effect between batches: the batch in hand is finished first.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
from pydantic import ValidationError

from common import keys, metrics
from common.heartbeat import beat_forever
from common.jobs import Admission, JobStore
from common.messages import DEADLINE_EXCEEDED, ClassifiedJob, JobState, WorkerHeartbeat, now
from common.plans import PlanFollower, tier_of
from common.settings import WorkerSettings
from common.streams import Entry, StreamConsumer
from common.tiers import Registry, Tier
from services.worker.backends import Backend, BackendError
from services.worker.batching import batch_limit, group_batches, reclaim_period_s, shape_key
from services.worker.deadletter import dead_letter_error

log = logging.getLogger(__name__)

CANCEL_POLL_S = 0.1


@dataclass(frozen=True)
class Work:
    """One admitted job and the stream entry it came from."""

    entry: Entry
    job: ClassifiedJob


class _Progress:
    """Latest step reported by the generation thread (written on the event loop)."""

    def __init__(self) -> None:
        self.step = 0
        self.total = 0
        self.event = asyncio.Event()

    def note(self, step: int, total: int) -> None:
        self.step, self.total = step, total
        self.event.set()


class Worker:
    """One worker process's state; ``run`` drives it until ``stop`` is set."""

    def __init__(self, settings: WorkerSettings, redis: aioredis.Redis, registry: Registry,
                 backend: Backend) -> None:
        self.settings = settings
        self.redis = redis
        self.registry = registry
        self.backend = backend
        self.instance = settings.instance
        self.store = JobStore(redis, settings.job_ttl_s, settings.result_ttl_s)
        self.plan = PlanFollower(redis)
        self.tier: Tier | None = None
        self.consumer: StreamConsumer | None = None
        self.busy = False
        self.jobs_done = 0
        self._last_reclaim = 0.0
        self.device = settings.device or registry.device
        self.batch_budget_s = registry.batch_budget_s(settings.batch_slo_share)

    def heartbeat(self) -> WorkerHeartbeat:
        """This worker's current heartbeat."""
        return WorkerHeartbeat(
            instance=self.instance, tier=self.tier.id if self.tier else None,
            model=self.backend.loaded_model, backend=self.backend.name,
            device=self.settings.device, busy=self.busy,
            plan_version=self.plan.plan.version if self.plan.plan else 0,
            jobs_done=self.jobs_done, model_switches=self.backend.model_switches)

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set, then finish the batch in hand and clean up.

        On exit the heartbeat key is deleted, so the controller sees the worker gone at
        once; unacknowledged entries (if any) stay pending and are reclaimable.
        """
        s = self.settings
        helpers = [
            asyncio.create_task(self.plan.run(), name="plan-follower"),
            asyncio.create_task(beat_forever(self.redis, "worker", self.instance,
                                             self.heartbeat, s.heartbeat_interval_s,
                                             s.heartbeat_ttl_s), name="heartbeat"),
        ]
        started = time.monotonic()
        warned = False
        try:
            while not stop.is_set():
                try:
                    await self._follow_plan()
                    if self.consumer is None:
                        if not warned and time.monotonic() - started > s.plan_wait_s:
                            warned = True
                            log.warning("no tier assigned after %.0f s; idle", s.plan_wait_s)
                        await _wait_any(stop, self.plan.changed, timeout=1.0)
                        continue
                    await self._poll_once(self.consumer)
                except Exception:
                    # Redis outage or a bug on one batch: its entries stay pending and are
                    # reclaimed; the loop itself never dies.
                    log.exception("worker step failed; retrying")
                    await _wait_any(stop, timeout=1.0)
        finally:
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            metrics.WORKER_BUSY.labels(worker=self.instance).set(0)
            try:
                await self.redis.delete(keys.heartbeat_key("worker", self.instance))
            except Exception:
                log.warning("could not delete the heartbeat (it expires by itself)")
            log.info("worker stopped after %d jobs", self.jobs_done)

    async def _follow_plan(self) -> None:
        """Switch stream (and model) when the plan assigns another tier."""
        self.plan.changed.clear()
        want = tier_of(self.plan.plan, self.instance)
        have = self.tier.id if self.tier else None
        if want == have:
            return
        if want is None:
            log.info("unassigned by the plan; idle")
            self.tier, self.consumer = None, None
            return
        try:
            tier = self.registry.tier(want)
        except KeyError:
            log.error("plan assigns unknown tier %d; staying on %s", want, have)
            return
        try:
            await asyncio.to_thread(self.backend.prepare, tier)
        except Exception:
            # Jobs of this tier will fail visibly (and be dead-lettered) rather than wait.
            log.exception("cannot prepare tier %d", tier.id, extra={"tier": tier.id})
        s = self.settings
        consumer = StreamConsumer(self.redis, keys.tier_stream(tier.id), keys.WORKER_GROUP,
                                  self.instance, claim_idle_ms=s.claim_idle_ms,
                                  max_deliveries=s.max_deliveries)
        await consumer.ensure_group()
        log.info("serving tier %d (%s) from %s", tier.id, tier.name, consumer.stream,
                 extra={"tier": tier.id})
        self.tier, self.consumer = tier, consumer
        self._last_reclaim = 0.0

    async def _poll_once(self, consumer: StreamConsumer) -> None:
        """Reclaim when due, else read one batch; then process it."""
        assert self.tier is not None
        limit = batch_limit(self.settings.max_batch, self.tier, self.device, self.batch_budget_s)
        if time.monotonic() - self._last_reclaim >= reclaim_period_s(
                self.settings.claim_idle_ms):
            self._last_reclaim = time.monotonic()
            live, dead = await consumer.reclaim(count=limit)
            for entry in dead:
                metrics.DEAD_LETTERS.labels(stream=consumer.stream).inc()
                await self._fail_dead_lettered(entry)
            if live:
                metrics.RECLAIMED.labels(stream=consumer.stream).inc(len(live))
                log.info("reclaimed %d entries of %s", len(live), consumer.stream)
                await self._process(consumer, live)
                return
        entries = await consumer.read(count=limit, block_ms=self.settings.stream_block_ms)
        if entries and len(entries) < limit:
            entries += await consumer.read(count=limit - len(entries), block_ms=None)
        if entries:
            await self._process(consumer, entries)

    async def _process(self, consumer: StreamConsumer, entries: list[Entry]) -> None:
        assert self.tier is not None
        tier = self.tier
        admitted: list[Work] = []
        for entry in entries:
            try:
                job = ClassifiedJob.from_fields(entry.fields)
            except (ValueError, ValidationError) as exc:
                log.error("dead-lettering undecodable entry %s: %s", entry.id, exc)
                await consumer.record_error(entry.id, f"undecodable entry: {exc!r}")
                await consumer.dead_letter_entry(entry, "undecodable")
                metrics.DEAD_LETTERS.labels(stream=consumer.stream).inc()
                continue
            if await self._admit(consumer, entry, job, tier):
                admitted.append(Work(entry, job))
        limit = batch_limit(self.settings.max_batch, tier, self.device, self.batch_budget_s)
        for group in group_batches(admitted, lambda w: shape_key(w.job), limit):
            await self._run_batch(consumer, tier, group)

    async def _admit(self, consumer: StreamConsumer, entry: Entry, job: ClassifiedJob,
                     tier: Tier) -> bool:
        """Start the job, or settle it without running (terminal, cancelled, unknown,
        past its deadline under ``expire``). One Redis round trip on the common path:
        :meth:`JobStore.admit` decides run / skip / cancelled atomically."""
        if (self.settings.deadline_policy == "expire" and job.deadline is not None
                and now() > job.deadline):  # last check at start (docs/policies.md)
            await self.store.transition(job.job_id, JobState.EXPIRED, finished_at=now(),
                                        error=DEADLINE_EXCEEDED)
            await consumer.ack(entry.id)
            return False
        outcome, attempts = await self.store.admit(job.job_id, self.instance, tier.id,
                                                   tier.unet_steps)
        if outcome is Admission.SKIP:
            log.info("skipping job (unknown or already finished)",
                     extra={"job_id": job.job_id})
            await consumer.ack(entry.id)
            return False
        if outcome is Admission.CANCELLED:
            metrics.JOBS.labels(tier=str(tier.id), status="cancelled").inc()
            await consumer.ack(entry.id)
            log.info("job cancelled", extra={"job_id": job.job_id, "tier": tier.id})
            return False
        if attempts == 0:  # retries would count the first attempt's run as waiting
            metrics.QUEUE_WAIT.labels(tier=str(tier.id)).observe(
                max(0.0, now() - job.enqueued_at))
        return True

    async def _cancelled(self, consumer: StreamConsumer, entry: Entry, job: ClassifiedJob,
                         tier: Tier) -> None:
        if await self.store.transition(job.job_id, JobState.CANCELLED, finished_at=now()) == 1:
            metrics.JOBS.labels(tier=str(tier.id), status="cancelled").inc()
        await consumer.ack(entry.id)
        log.info("job cancelled", extra={"job_id": job.job_id, "tier": tier.id})

    async def _run_batch(self, consumer: StreamConsumer, tier: Tier, works: list[Work]) -> None:
        """Generate one batch with keepalive, progress and cancellation helpers running."""
        jobs = [w.job for w in works]
        ids = [w.entry.id for w in works]
        cancelled: set[str] = set()
        interrupt = threading.Event()
        progress = _Progress()
        loop = asyncio.get_running_loop()

        def on_step(step: int, total: int) -> bool:  # runs in the generation thread
            loop.call_soon_threadsafe(progress.note, step, total)
            return not interrupt.is_set()

        helpers = [
            asyncio.create_task(self._keepalive(consumer, ids)),
            asyncio.create_task(self._watch_cancel(jobs, cancelled, interrupt)),
            asyncio.create_task(self._report_progress(jobs, cancelled, progress)),
        ]
        self.busy = True
        metrics.WORKER_BUSY.labels(worker=self.instance).set(1)
        started = now()
        error: Exception | None = None
        results: list[list[bytes]] = []
        try:
            results = await asyncio.to_thread(self.backend.generate, jobs, tier, on_step)
        except Exception as exc:
            error = exc
        finally:
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            self.busy = False
            metrics.WORKER_BUSY.labels(worker=self.instance).set(0)
        seconds = now() - started
        cancelled |= await self._cancel_requested([j.job_id for j in jobs if
                                                   j.job_id not in cancelled])
        if error is None and len(results) != len(works) and len(cancelled) < len(works):
            error = BackendError(f"backend returned {len(results)} results for "
                                 f"{len(works)} jobs")
        if error is not None:
            await self._failed(consumer, tier, works, error)
            return
        extra = getattr(self.backend, "last_details", None) or []
        for i, work in enumerate(works):
            job = work.job
            if job.job_id in cancelled:
                await self._cancelled(consumer, work.entry, job, tier)
                continue
            finished = now()
            detail = {"backend": self.backend.name, "model": self.backend.loaded_model,
                      "batch": len(works), "inference_s": round(seconds, 4),
                      "strategy": tier.strategy.value, "unet_steps": tier.unet_steps}
            if i < len(extra):
                detail.update(extra[i])
            stored = await self.store.succeed(job.job_id, results[i], tier=tier.id,
                                              detail=detail)
            await consumer.ack(work.entry.id)  # only now: the result is stored
            if stored:
                self.jobs_done += 1
                label = str(tier.id)
                metrics.JOBS.labels(tier=label, status="succeeded").inc()
                metrics.INFERENCE.labels(tier=label).observe(finished - started)
                metrics.E2E.labels(tier=label).observe(max(0.0, finished - job.enqueued_at))
        log.info("batch of %d done in %.3f s", len(works), seconds, extra={"tier": tier.id})

    async def _failed(self, consumer: StreamConsumer, tier: Tier, works: list[Work],
                      exc: Exception) -> None:
        """Record the error; dead-letter and fail entries out of deliveries, else retry."""
        error = repr(exc)
        log.warning("generation failed: %s", error, extra={"tier": tier.id})
        for work in works:
            await consumer.record_error(work.entry.id, error)
            if work.entry.deliveries >= consumer.max_deliveries:
                await consumer.dead_letter_entry(work.entry, "generation failed")
                metrics.DEAD_LETTERS.labels(stream=consumer.stream).inc()
                if await self.store.fail(work.job.job_id, error):
                    metrics.JOBS.labels(tier=str(tier.id), status="failed").inc()
            # else: left pending; reclaimed after claim_idle_ms and retried

    async def _fail_dead_lettered(self, entry: Entry) -> None:
        """Fail the job of an entry that ``reclaim`` moved to the dead-letter stream."""
        try:
            job = ClassifiedJob.from_fields(entry.fields)
        except (ValueError, ValidationError):
            return
        error = await dead_letter_error(self.redis, entry)
        if await self.store.fail(job.job_id, error):
            metrics.JOBS.labels(tier=str(job.tier), status="failed").inc()
        log.warning("job dead-lettered: %s", error, extra={"job_id": job.job_id})

    async def _cancel_requested(self, job_ids: list[str]) -> set[str]:
        if not job_ids:
            return set()
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.exists(keys.cancel_key(job_id))
            flags = await pipe.execute()
        return {j for j, f in zip(job_ids, flags, strict=True) if f}

    async def _watch_cancel(self, jobs: list[ClassifiedJob], cancelled: set[str],
                            interrupt: threading.Event) -> None:
        while True:
            try:
                cancelled |= await self._cancel_requested(
                    [j.job_id for j in jobs if j.job_id not in cancelled])
                if len(cancelled) == len(jobs):
                    interrupt.set()
                    return
            except Exception:
                log.warning("cancel poll failed", exc_info=True)
            await asyncio.sleep(CANCEL_POLL_S)

    async def _keepalive(self, consumer: StreamConsumer, ids: list[str]) -> None:
        while True:
            await asyncio.sleep(self.settings.keepalive_s)
            try:
                await consumer.keepalive(*ids)
            except Exception:
                log.warning("keepalive failed", exc_info=True)

    async def _report_progress(self, jobs: list[ClassifiedJob], cancelled: set[str],
                               progress: _Progress) -> None:
        # Coalesces steps: Redis is never on the step loop's critical path.
        while True:
            await progress.event.wait()
            progress.event.clear()
            step, total = progress.step, progress.total
            try:
                await asyncio.gather(*(self.store.progress(j.job_id, step, total)
                                       for j in jobs if j.job_id not in cancelled))
            except Exception:
                log.warning("progress update failed", exc_info=True)


async def _wait_any(*events: asyncio.Event, timeout: float) -> None:
    """Return when any event is set or after ``timeout`` seconds."""
    waiters = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
