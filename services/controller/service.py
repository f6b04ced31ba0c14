"""The controller's reconcile loop: observe, decide, publish the plan, re-home stranded
backlog, publish the state and the overload estimate.

Each period (``control_period_s``):

1. **Observe**: live workers (heartbeats), the previous plan, arrivals of the whole
   seconds since the last period (``t2i:arrivals``, folded into the
   :class:`~services.controller.load.LoadEstimator`), the predicted-tier mix
   (``t2i:mix``) and the backlog of every stream (lag + pending).
2. **Decide**: the policy's draft for the demand ``forecast + backlog / drain_horizon``.
3. **Publish** the plan when it changed (versioned, atomic), then **re-home** the backlog
   of tiers left without workers (:mod:`services.controller.rehome`).
4. **Report**: ``t2i:controller:state`` (:class:`~common.messages.ControllerState`) and
   ``t2i:overload`` (:class:`~common.messages.OverloadEstimate`), both with a TTL of a
   few periods, so a dead controller's overload flag disappears by itself.

Guarantees:
- The loop never dies: each step's exception is logged and the next period runs.
- A plan is published only when assignments or routing change, as version =
  max(stored, last published) + 1, with SET + PUBLISH in one transaction: versions only
  grow, also across restarts (the stored version is the starting point).
- Each phase (read, decide, publish, rehome, report) is timed into
  ``t2i_controller_loop_duration_seconds{phase}``; ``t2i_gpus_allocated{tier}`` follows
  the current plan.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter

import redis.asyncio as aioredis

from common import keys, metrics
from common.heartbeat import any_live, beat_forever, live_workers
from common.messages import AllocationPlan, ControllerState, ServiceHeartbeat, now
from common.plans import publish_plan, read_plan
from common.redisutil import connect
from common.service_main import stop_on_signals
from common.settings import ControllerSettings
from common.tiers import Registry, load_registry
from services.controller import overload
from services.controller.load import LoadEstimator, LoadState
from services.controller.observe import read_arrivals, read_mix, stream_backlog, tier_backlogs
from services.controller.policies import Observation, Policy, make_policy, plan_changed
from services.controller.rehome import Rehomer

log = logging.getLogger(__name__)


class Controller:
    """One controller instance; ``step`` is one reconcile pass."""

    def __init__(self, settings: ControllerSettings, redis: aioredis.Redis,
                 registry: Registry, policy: Policy) -> None:
        self.settings = settings
        self.redis = redis
        self.registry = registry
        self.policy = policy
        self.version = 0
        self.workers = 0
        s = settings
        self.estimator = LoadEstimator(
            level_tau_s=s.load_level_tau_s, trend_tau_s=s.load_trend_tau_s,
            horizon_s=s.load_horizon_s or s.control_period_s,
            drain_horizon_s=s.drain_horizon_s)
        self.load = self.estimator.initial()
        self.last_second: int | None = None
        self.rate = overload.per_gpu_rate(registry, s.profile_device or registry.device,
                                          registry.batch_budget_s(s.batch_slo_share))
        self.rehomer = Rehomer(redis, s.claim_idle_ms, int(s.heartbeat_ttl_s * 1000),
                               s.max_deliveries)
        self.state: ControllerState | None = None

    def heartbeat(self) -> ServiceHeartbeat:
        """This instance's heartbeat (plan version, live workers, policy)."""
        return ServiceHeartbeat(
            instance=self.settings.instance, service="controller",
            detail={"plan_version": self.version, "workers": self.workers,
                    "policy": self.policy.name})

    async def _observe_load(self) -> tuple[LoadState, float]:
        """Fold the whole seconds since the last period into the estimate; returns the
        state and the rate observed over those seconds (jobs/s)."""
        upto = int(now()) - 1
        if self.last_second is None:
            self.last_second = upto
            return self.load, 0.0
        if upto <= self.last_second:
            return self.load, self.load.level
        count = await read_arrivals(self.redis, self.last_second, upto,
                                    self.settings.arrivals_keep_s)
        dt = upto - self.last_second
        self.load = self.estimator.update(self.load, count, dt)
        self.last_second = upto
        return self.load, count / dt

    async def step(self) -> AllocationPlan | None:
        """One reconcile pass; returns the plan published, or None when unchanged."""
        s, n_tiers = self.settings, len(self.registry.tiers)
        t0 = time.perf_counter()
        workers = await live_workers(self.redis)
        current = await read_plan(self.redis)
        load, observed = await self._observe_load()
        mix = await read_mix(self.redis, int(now()), s.mix_window_s, n_tiers)
        backlogs = await tier_backlogs(self.redis, n_tiers)
        prompts = await stream_backlog(self.redis, keys.PROMPT_STREAM, keys.CLASSIFIER_GROUP)
        backlog = {k: b.total for k, b in backlogs.items()}
        waiting = sum(b.unread for b in backlogs.values()) + prompts.total
        forecast = self.estimator.forecast(load)
        demand = self.estimator.demand(load, float(sum(backlog.values()) + prompts.total))
        t1 = time.perf_counter()
        obs = Observation(workers, forecast, demand, mix, backlog)
        draft = self.policy.plan(obs, current)
        t2 = time.perf_counter()
        self.workers = len(workers)
        published: AllocationPlan | None = None
        if current is not None:
            self.version = max(self.version, current.version)
        if plan_changed(current, draft):
            published = AllocationPlan(
                version=self.version + 1, policy=self.policy.name,
                assignments=draft.assignments, gpus_per_tier=draft.gpus_per_tier,
                routing=draft.routing, detail={**draft.detail, "workers": len(workers)})
            await publish_plan(self.redis, published)
            self.version = published.version
            log.info("published plan %d: %s", published.version, draft.gpus_per_tier,
                     extra={"plan_version": published.version})
        plan = published or current
        t3 = time.perf_counter()
        live = {w.instance for w in workers}
        serving = Counter(k for w, k in (plan.assignments.items() if plan else ()) if w in live)
        rehomed = await self.rehomer.run(serving, live, n_tiers)
        if rehomed.total:
            log.info("re-homed %d jobs: %s", rehomed.total, rehomed.moved)
        t4 = time.perf_counter()
        gpus = dict(serving)
        report = overload.assess(gpus, self.rate, demand, waiting, backlog, draft.unserved,
                                 s.headroom, s.drain_horizon_s)
        capacity, unserved, estimate = report.capacity, report.unserved, report.estimate
        self.state = ControllerState(
            policy=self.policy.name, plan_version=self.version,
            formulation=str(draft.detail.get("formulation") or "") or None,
            workers=len(workers), gpus_per_tier={k: gpus.get(k, 0) for k in range(n_tiers)},
            capacity={k: round(v, 4) for k, v in capacity.items()},
            served={k: round(v, 4) for k, v in draft.served.items()},
            unserved=round(unserved, 4), arrival_rate=round(observed, 4),
            forecast=round(forecast, 4), demand=round(demand, 4),
            mix={k: round(v, 4) for k, v in mix.items()}, backlog=backlog,
            prompt_backlog=prompts.total,
            queue_delay_s={k: round(v, 3) for k, v in report.queue_delay_s.items()},
            overload=estimate, solve_ms=draft.solve_ms,
            status=str(draft.detail.get("status", "")),
            detail={k: v for k, v in draft.detail.items() if k != "status"},
            moved=rehomed.total)
        ttl_ms = int(1000 * max(5.0, 3 * s.control_period_s))
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(keys.CONTROLLER_STATE, self.state.model_dump_json(), px=2 * ttl_ms)
            pipe.set(keys.OVERLOAD, estimate.model_dump_json(), px=ttl_ms)
            await pipe.execute()
        for tier in self.registry.tiers:
            metrics.GPUS.labels(tier=str(tier.id)).set(gpus.get(tier.id, 0))
        t5 = time.perf_counter()
        for phase, seconds in (("read", t1 - t0), ("decide", t2 - t1), ("publish", t3 - t2),
                               ("rehome", t4 - t3), ("report", t5 - t4), ("total", t5 - t0)):
            metrics.LOOP.labels(phase=phase).set(seconds)
        return published

    async def run(self, stop: asyncio.Event) -> None:
        """Reconcile every ``control_period_s`` until ``stop`` is set."""
        s = self.settings
        beat = asyncio.create_task(beat_forever(
            self.redis, "controller", s.instance, self.heartbeat, s.heartbeat_interval_s,
            s.heartbeat_ttl_s), name="heartbeat")
        try:
            while not stop.is_set():
                try:
                    await self.step()
                except Exception:
                    # An unhandled exception would halt the control loop: never let it.
                    log.exception("controller step failed")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), s.control_period_s)
        finally:
            beat.cancel()
            await asyncio.gather(beat, return_exceptions=True)
            try:
                await self.redis.delete(keys.heartbeat_key("controller", s.instance))
            except Exception:
                log.warning("could not delete the heartbeat (it expires by itself)")


async def run(settings: ControllerSettings, stop: asyncio.Event | None = None) -> None:
    """Serve as the controller until ``stop`` is set (or SIGTERM/SIGINT if None).

    Raises:
        common.tiers.RegistryError: The tier registry is invalid.
        services.controller.policies.PolicyError: Unknown or misconfigured policy.
    """
    registry = load_registry(settings.tiers_file)
    policy = make_policy(settings, registry)
    if stop is None:
        stop = stop_on_signals()
    metrics.start_metrics_server(settings.metrics_port)
    redis = connect(settings.redis_url)
    log.info("controller %s starting (policy %s)", settings.instance, policy.name)
    try:
        await Controller(settings, redis, registry, policy).run(stop)
    finally:
        await redis.aclose()


async def check(settings: ControllerSettings) -> bool:
    """True when at least one controller heartbeat is live (:func:`common.heartbeat.any_live`)."""
    return await any_live(settings.redis_url, "controller")
