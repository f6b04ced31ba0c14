"""The controller's reconcile loop: read live workers, decide, publish the plan.

Guarantees:
- The loop never dies: each step's exception is logged and the next period runs.
- A plan is published only when assignments or routing change, as version =
  max(stored, last published) + 1, with SET + PUBLISH in one transaction: versions only
  grow, also across restarts (the stored version is the starting point).
- Each phase (read, decide, publish) is timed into
  ``t2i_controller_loop_duration_seconds{phase}``; ``t2i_gpus_allocated{tier}`` follows
  the current plan.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time

import redis.asyncio as aioredis

from common import keys, metrics
from common.heartbeat import beat_forever, live_services, live_workers
from common.messages import AllocationPlan, ServiceHeartbeat
from common.plans import publish_plan, read_plan
from common.redisutil import connect
from common.settings import ControllerSettings
from common.tiers import Registry, load_registry
from services.controller.policies import Policy, make_policy, plan_changed

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

    def heartbeat(self) -> ServiceHeartbeat:
        """This instance's heartbeat (plan version, live workers, policy)."""
        return ServiceHeartbeat(
            instance=self.settings.instance, service="controller",
            detail={"plan_version": self.version, "workers": self.workers,
                    "policy": self.policy.name})

    async def step(self) -> AllocationPlan | None:
        """One reconcile pass; returns the plan published, or None when unchanged."""
        t0 = time.perf_counter()
        workers = await live_workers(self.redis)
        current = await read_plan(self.redis)
        t1 = time.perf_counter()
        draft = self.policy.plan(workers, current)
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
        for tier in self.registry.tiers:
            n = plan.gpus_per_tier.get(tier.id, 0) if plan else 0
            metrics.GPUS.labels(tier=str(tier.id)).set(n)
        t3 = time.perf_counter()
        for phase, seconds in (("read", t1 - t0), ("decide", t2 - t1), ("publish", t3 - t2),
                               ("total", t3 - t0)):
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
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    metrics.start_metrics_server(settings.metrics_port)
    redis = connect(settings.redis_url)
    log.info("controller %s starting (policy %s)", settings.instance, policy.name)
    try:
        await Controller(settings, redis, registry, policy).run(stop)
    finally:
        await redis.aclose()


async def check(settings: ControllerSettings) -> bool:
    """True when at least one controller heartbeat is live (Redis errors: False)."""
    redis = connect(settings.redis_url, socket_timeout=2.0)
    try:
        return bool(await live_services(redis, "controller"))
    except Exception:
        return False
    finally:
        await redis.aclose()
