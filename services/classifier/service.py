"""The classifier service loop: decide a tier per prompt, route it through the plan.

Guarantees:
- Each prompt entry is acknowledged exactly when its job is routed (``JobStore.route``
  writes the job, appends to the tier stream and acks, atomically), skipped because the
  job is already terminal (e.g. cancelled while queued: acked, not forwarded), or
  dead-lettered as undecodable. A classifier that dies leaves its entries pending; live
  ones reclaim them every ``claim_idle_ms / 2``.
- A prompt entry dead-lettered after ``max_deliveries`` fails its job with the error.
- The loop never dies on a bad entry or a Redis error: both are logged, the entry stays
  pending (retried, then dead-lettered after ``max_deliveries``).
- A served tier outside the registry (a stale routing row) falls back to the
  predicted tier.
- Every decided batch adds its predicted tiers to ``t2i:mix`` (per-second buckets), the
  mix the controller plans for.
- Jobs with a deadline are checked against the controller's per-tier queueing delay
  (``services.classifier.deadline``): degraded to a cheaper tier or ended ``expired``
  per ``T2I_DEADLINE_POLICY``, never silently dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time

import redis.asyncio as aioredis
from pydantic import ValidationError

from common import keys, metrics
from common.heartbeat import any_live, beat_forever
from common.jobs import JobStore
from common.messages import (
    DEADLINE_EXCEEDED,
    ClassifiedJob,
    ControllerState,
    JobState,
    PromptJob,
    ServiceHeartbeat,
    now,
)
from common.plans import PlanFollower
from common.redisutil import connect
from common.service_main import stop_on_signals
from common.settings import ClassifierSettings
from common.streams import Entry, StreamConsumer
from common.tiers import Registry, load_registry
from services.classifier import deadline
from services.classifier.policies import (
    Decision,
    FixedPolicy,
    Policy,
    PolicyError,
    draw,
    make_policy,
    route,
)
from services.worker.deadletter import dead_letter_error

log = logging.getLogger(__name__)


class Classifier:
    """One classifier instance; ``run`` drives it until ``stop`` is set."""

    def __init__(self, settings: ClassifierSettings, redis: aioredis.Redis,
                 registry: Registry, policy: Policy) -> None:
        self.settings = settings
        self.redis = redis
        self.registry = registry
        self.policy = policy
        self.store = JobStore(redis, settings.job_ttl_s, settings.result_ttl_s)
        self.plan = PlanFollower(redis)
        self.consumer = StreamConsumer(
            redis, keys.PROMPT_STREAM, keys.CLASSIFIER_GROUP, settings.instance,
            claim_idle_ms=settings.claim_idle_ms, max_deliveries=settings.max_deliveries)
        self.routed = 0
        self.skipped = 0
        self.degraded = 0
        self.expired = 0
        self._last_reclaim = 0.0
        self._state: ControllerState | None = None
        self._wait: dict[int, float] = {}  # the state's delays + jobs routed since
        self._wait_at = 0.0
        self._state_read = 0.0
        device = settings.profile_device or registry.device
        self.service_s = {t.id: s for t in registry.tiers
                          if (s := t.batch_latency(device, 1)) is not None}

    def heartbeat(self) -> ServiceHeartbeat:
        """This instance's heartbeat."""
        plan = self.plan.plan
        return ServiceHeartbeat(
            instance=self.settings.instance, service="classifier",
            detail={"policy": self.policy.name, "plan_version": plan.version if plan else 0,
                    "routed": self.routed, "skipped": self.skipped,
                    "degraded": self.degraded, "expired": self.expired})

    async def run(self, stop: asyncio.Event) -> None:
        """Classify until ``stop`` is set; deletes the heartbeat key on exit."""
        s = self.settings
        await self.consumer.ensure_group()
        helpers = [
            asyncio.create_task(self.plan.run(), name="plan-follower"),
            asyncio.create_task(beat_forever(self.redis, "classifier", s.instance,
                                             self.heartbeat, s.heartbeat_interval_s,
                                             s.heartbeat_ttl_s), name="heartbeat"),
        ]
        try:
            while not stop.is_set():
                try:
                    await self.step()
                except Exception:
                    log.exception("classifier step failed")
                    await asyncio.sleep(0.5)
        finally:
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            try:
                await self.redis.delete(keys.heartbeat_key("classifier", s.instance))
            except Exception:
                log.warning("could not delete the heartbeat (it expires by itself)")

    async def step(self) -> None:
        """Reclaim when due, else read one batch; classify and route it."""
        s = self.settings
        entries: list[Entry] = []
        if time.monotonic() - self._last_reclaim >= s.claim_idle_ms / 2000:
            self._last_reclaim = time.monotonic()
            entries, dead = await self.consumer.reclaim(count=s.batch_size)
            for entry in dead:
                metrics.DEAD_LETTERS.labels(stream=self.consumer.stream).inc()
                await self._fail_dead_lettered(entry)
            if entries:
                metrics.RECLAIMED.labels(stream=self.consumer.stream).inc(len(entries))
        if not entries:
            entries = await self.consumer.read(count=s.batch_size, block_ms=s.stream_block_ms)
        if entries:
            await self.classify(entries)

    async def _fail_dead_lettered(self, entry: Entry) -> None:
        """Fail the job of a prompt entry that ``reclaim`` dead-lettered (poison prompt)."""
        try:
            job = PromptJob.from_fields(entry.fields)
        except (ValueError, ValidationError):
            return
        error = await dead_letter_error(self.redis, entry)
        await self.store.fail(job.job_id, error)
        log.warning("prompt dead-lettered: %s", error, extra={"job_id": job.job_id})

    async def classify(self, entries: list[Entry]) -> None:
        """Decide, draw and route every entry of one batch."""
        jobs: list[tuple[Entry, PromptJob]] = []
        for entry in entries:
            try:
                jobs.append((entry, PromptJob.from_fields(entry.fields)))
            except (ValueError, ValidationError) as exc:
                log.error("dead-lettering undecodable prompt entry %s: %s", entry.id, exc)
                await self.consumer.record_error(entry.id, f"undecodable entry: {exc!r}")
                await self.consumer.dead_letter_entry(entry, "undecodable")
                metrics.DEAD_LETTERS.labels(stream=self.consumer.stream).inc()
        if not jobs:
            return
        start = time.perf_counter()
        batch = [job for _, job in jobs]
        if isinstance(self.policy, FixedPolicy):  # constant time: no thread hop
            decisions = self.policy.decide(batch)
        else:  # a policy may embed prompts or do blocking cache I/O (nirvana)
            decisions = await asyncio.to_thread(self.policy.decide, batch)
        metrics.CLASSIFY.observe(time.perf_counter() - start)
        plan = self.plan.plan
        routing = plan.routing if plan else {}
        version = plan.version if plan else 0
        n_tiers = len(self.registry.tiers)
        await self._count_mix(decisions)
        wait = await self._queue_delays()
        for (entry, job), decision in zip(jobs, decisions, strict=True):
            u = decision.draw if decision.draw is not None else draw(job.job_id, version)
            served = route(decision.predicted_tier, routing, u)
            if not 0 <= served < n_tiers:
                log.warning("routing row %d names unknown tier %d; serving at %d",
                            decision.predicted_tier, served, decision.predicted_tier)
                served = decision.predicted_tier
            verdict = deadline.decide(served, now(), job.deadline, wait, self.service_s,
                                      self.settings.deadline_policy)
            if verdict.action == "expire":
                await self._expire(entry, job)
                continue
            if verdict.action == "degraded":
                self.degraded += 1
                log.info("deadline: tier %d -> %d", served, verdict.tier,
                         extra={"job_id": job.job_id})
            classified = ClassifiedJob(
                **job.model_dump(exclude={"schema_version"}), tier=verdict.tier,
                predicted_tier=decision.predicted_tier,
                probabilities=decision.probabilities, policy=self.policy.name)
            if await self.store.route(classified, entry.id, group=keys.CLASSIFIER_GROUP):
                self.routed += 1
                wait = self._charge(verdict.tier) if wait else wait
            else:
                self.skipped += 1
                log.info("job not forwarded (already terminal)", extra={"job_id": job.job_id})

    async def _count_mix(self, decisions: list[Decision]) -> None:
        """Add this batch's predicted tiers to the controller's mix buckets."""
        second = int(now())
        counts: dict[int, int] = {}
        for d in decisions:
            counts[d.predicted_tier] = counts.get(d.predicted_tier, 0) + 1
        async with self.redis.pipeline(transaction=False) as pipe:
            for tier, n in counts.items():
                pipe.hincrby(keys.MIX, keys.mix_field(second, tier), n)
            pipe.expire(keys.MIX, 3600)  # bounded even when no controller trims it
            await pipe.execute()

    async def _queue_delays(self) -> dict[int, float]:
        """Per-tier queueing delay from the controller's state (re-read at most every
        0.5 s) plus the jobs routed since it was published (:meth:`_charge`); empty when
        there is none or it is older than ``state_max_age_s``."""
        if time.monotonic() - self._state_read >= 0.5:
            self._state_read = time.monotonic()
            raw = await self.redis.get(keys.CONTROLLER_STATE)
            try:
                self._state = ControllerState.model_validate_json(raw) if raw else None
            except ValidationError:
                self._state = None
        state = self._state
        if state is None or now() - state.at > self.settings.state_max_age_s:
            return {}
        if state.at != self._wait_at:  # a new state: it counts the jobs routed so far
            self._wait, self._wait_at = dict(state.queue_delay_s), state.at
        return self._wait

    def _charge(self, tier: int) -> dict[int, float]:
        """Add one routed job to ``tier``'s delay estimate until the next controller
        state (:func:`services.classifier.deadline.charge`)."""
        gpus = self._state.gpus_per_tier if self._state else {}
        self._wait = deadline.charge(self._wait, tier, self.service_s, gpus)
        return self._wait

    async def _expire(self, entry: Entry, job: PromptJob) -> None:
        """End a job that cannot start before its deadline (expire policy), then ack."""
        if await self.store.transition(job.job_id, JobState.EXPIRED, error=DEADLINE_EXCEEDED,
                                       finished_at=now()) == 1:
            self.expired += 1
            metrics.JOBS.labels(tier="none", status="expired").inc()
            log.info("job expired: %s", DEADLINE_EXCEEDED, extra={"job_id": job.job_id})
        await self.consumer.ack(entry.id)


async def run(settings: ClassifierSettings, stop: asyncio.Event | None = None) -> None:
    """Serve as one classifier until ``stop`` is set (or SIGTERM/SIGINT if None).

    Raises:
        common.tiers.RegistryError: The tier registry is invalid.
        services.classifier.policies.PolicyError: Unknown or misconfigured policy.
    """
    registry = load_registry(settings.tiers_file)
    lookup = None
    if settings.policy == "nirvana":
        from services.classifier.cache_lookup import build_lookup

        try:
            lookup = build_lookup(settings.redis_url, registry)
        except (ValueError, OSError) as exc:
            raise PolicyError(f"policy 'nirvana': cannot embed prompts for the cache "
                              f"lookup: {exc}") from exc
    policy = make_policy(settings, registry, lookup)
    if stop is None:
        stop = stop_on_signals()
    metrics.start_metrics_server(settings.metrics_port)
    redis = connect(settings.redis_url)
    log.info("classifier %s starting (policy %s)", settings.instance, policy.name)
    try:
        await Classifier(settings, redis, registry, policy).run(stop)
    finally:
        await redis.aclose()


async def check(settings: ClassifierSettings) -> bool:
    """True when at least one classifier heartbeat is live (:func:`common.heartbeat.any_live`)."""
    return await any_live(settings.redis_url, "classifier")
