"""The discrete-event core of ``loadgen simulate``: gateway, classifier, controller and
GPU workers of one Argus cluster, in simulated time.

Every decision is the services' own pure code; this module only keeps the clock, the
queues and the workers:

- Gateway admission: a new job is refused (``rejected``, HTTP 429) when the
  controller's last overload estimate says so (:meth:`common.messages.OverloadEstimate.
  retry_after` against the job's SLO), else when ``max_backlog`` jobs are unfinished.
- Classifier: the policy's decision (:mod:`loadgen.sim_quality`), the routing draw and
  :func:`services.classifier.policies.route` with the current plan, then
  :func:`services.classifier.deadline.decide` with the last controller state's queueing
  delays (degrade, or expire before start). Classification takes no time.
- Controller, every ``control_period_s`` from t = 0: whole-second arrival counts into the
  :class:`~services.controller.load.LoadEstimator`, the predicted-tier mix over
  ``mix_window_s`` (:func:`services.controller.observe.mix_shares`), backlogs (queued +
  running per tier), then ``policy.plan`` (:mod:`services.controller.policies`), a new
  plan version when :func:`~services.controller.policies.plan_changed`, re-homing of the
  queues of tiers left without workers (:func:`services.controller.rehome.
  rehome_target`) and :func:`services.controller.overload.assess`.
- Workers: one per GPU, named ``gpu-000``...; an idle worker of tier ``k`` takes up to the
  tier's largest batch from the head of ``k``'s queue (idle workers in the order they went
  idle, as blocked ``XREADGROUP`` readers are served), drops the ones past their deadline
  under ``expire``, and is busy for ``batch_latency(device, b)``. A worker reassigned
  while busy finishes its batch first; moving to a tier of another model makes it
  unavailable for that tier's ``load_time_s`` (the first plan finds every worker with its
  model loaded: a warm start).

Guarantees: every arrival ends in exactly one of ``succeeded``, ``expired``,
``rejected`` or ``unfinished`` (still open ``drain_timeout_s`` after the last arrival);
the result is a function of the inputs (no wall clock, no unseeded randomness).
"""

from __future__ import annotations

import heapq
import math
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from common.messages import AllocationPlan, OverloadEstimate, PromptJob, WorkerHeartbeat
from common.settings import ControllerSettings
from common.tiers import Registry
from services.classifier import deadline
from services.classifier.policies import Policy as ClassifierPolicy
from services.classifier.policies import draw, route
from services.controller import overload
from services.controller.load import LoadEstimator
from services.controller.observe import count_between, mix_shares
from services.controller.policies import Observation, plan_changed
from services.controller.policies import Policy as ControllerPolicy
from services.controller.rehome import rehome_target
from services.worker.batching import batch_limit

_DONE, _READY, _CONTROL = 0, 1, 2
"""Event kinds; at equal times they run in this order, and arrivals after them."""


@dataclass(frozen=True)
class SimConfig:
    """Parameters of one simulated run (besides the controller's settings).

    Attributes:
        gpus: Workers (one per GPU), all alive for the whole run.
        device: Latency profile of the registry used for service times.
        slo_ms: Each job's latency objective and deadline (None: no deadline).
        deadline_policy: ``degrade`` or ``expire`` (``T2I_DEADLINE_POLICY``).
        max_backlog: The gateway's cap on unfinished jobs.
        overload_max_delay_s: The gateway's overload limit for jobs without an SLO.
        backlog_retry_after_s: ``Retry-After`` of a backlog-full refusal.
        drain_timeout_s: How long after the last arrival the run lasts.
        seed: Seed of the job ids, hence of the routing draws.
    """

    gpus: int
    device: str
    slo_ms: int | None
    deadline_policy: str = "degrade"
    max_backlog: int = 10_000
    overload_max_delay_s: float = 60.0
    backlog_retry_after_s: int = 5
    drain_timeout_s: float = 120.0
    seed: int = 0


@dataclass
class Job:
    """One arrival's life; times are offsets from the start, in seconds."""

    index: int
    prompt: int
    arrival: float
    status: str = "pending"
    last_status: str | None = None
    http_status: int | None = None
    retry_after_s: float | None = None
    reject_code: str | None = None
    predicted: int | None = None
    tier: int | None = None
    degraded: bool = False
    started: float | None = None
    finished: float | None = None


class _Worker:
    __slots__ = ("batch", "busy", "index", "loading", "model", "name", "target", "tier")

    def __init__(self, index: int) -> None:
        self.index = index
        self.name = f"gpu-{index:03d}"
        self.tier: int | None = None  # the tier served now (None: none, or loading)
        self.target: int | None = None  # the tier of the current plan
        self.model: str | None = None
        self.busy = False
        self.loading = False
        self.batch: list[Job] = []


@dataclass
class SimResult:
    """The jobs in arrival order, one row per control period, and counters."""

    jobs: list[Job]
    control: list[dict[str, Any]]
    counters: Counter[str] = field(default_factory=Counter)


class Simulator:
    """One run; build it, then call :meth:`run` once."""

    def __init__(self, registry: Registry, settings: ControllerSettings,
                 controller: ControllerPolicy, classifier: ClassifierPolicy,
                 config: SimConfig, arrivals: Sequence[float], prompt_of: Sequence[int],
                 prompts: Sequence[str]) -> None:
        if len(arrivals) != len(prompt_of):
            raise ValueError("arrivals and prompt_of must have the same length")
        self.registry, self.s, self.cfg = registry, settings, config
        self.controller, self.classifier = controller, classifier
        self.prompts = list(prompts)
        self.jobs = [Job(i, int(p), float(t))
                     for i, (t, p) in enumerate(zip(arrivals, prompt_of, strict=True))]
        self.n_tiers = len(registry.tiers)
        dev = config.device
        budget = registry.batch_budget_s(settings.batch_slo_share)
        self.limit = [batch_limit(0, t, dev, budget) for t in registry.tiers]
        self.latency = [[0.0] + [t.batch_latency(dev, b) or math.nan
                                 for b in range(1, self.limit[t.id] + 1)]
                        for t in registry.tiers]
        for t in registry.tiers:
            if t.batch_latency(dev, 1) is None:
                raise ValueError(f"tier {t.id} ({t.name}) has no latency profile for "
                                 f"device {dev!r}")
        self.service_s = {t.id: self.latency[t.id][1] for t in registry.tiers}
        self.rate = overload.per_gpu_rate(registry, dev, budget)
        self.workers = [_Worker(i) for i in range(config.gpus)]
        self.heartbeats = [WorkerHeartbeat(instance=w.name, at=0.0) for w in self.workers]
        self.queues: list[deque[Job]] = [deque() for _ in registry.tiers]
        self.idle: list[deque[_Worker]] = [deque() for _ in registry.tiers]
        self.running = [0] * self.n_tiers
        self.events: list[tuple[float, int, int, int]] = []
        self.seq = 0
        self.estimator = LoadEstimator(
            level_tau_s=settings.load_level_tau_s, trend_tau_s=settings.load_trend_tau_s,
            horizon_s=settings.load_horizon_s or settings.control_period_s,
            drain_horizon_s=settings.drain_horizon_s)
        self.load = self.estimator.initial()
        self.last_second: int | None = None
        self.arrival_buckets: dict[int, int] = {}
        self.mix_buckets: dict[tuple[int, int], int] = {}
        self.plan: AllocationPlan | None = None
        self.estimate: OverloadEstimate | None = None
        self.wait: dict[int, float] = {}
        self.gpus: dict[int, int] = {}
        self.inflight = 0
        self.control: list[dict[str, Any]] = []
        self.counters: Counter[str] = Counter()

    # ------------------------------------------------------------------ the loop
    def _push(self, t: float, kind: int, arg: int) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, kind, self.seq, arg))

    def run(self) -> SimResult:
        """Simulate every arrival; return the jobs, the control log and the counters."""
        jobs, period = self.jobs, self.s.control_period_s
        end = (jobs[-1].arrival if jobs else 0.0) + self.cfg.drain_timeout_s
        self._push(0.0, _CONTROL, 0)
        nxt = 0
        while True:
            t_event = self.events[0][0] if self.events else math.inf
            t_arrival = jobs[nxt].arrival if nxt < len(jobs) else math.inf
            if t_arrival < t_event:
                if t_arrival > end:
                    break
                self._arrive(jobs[nxt])
                nxt += 1
                continue
            if t_event > end or (nxt >= len(jobs) and self.inflight == 0):
                break
            t, kind, _, arg = heapq.heappop(self.events)
            if kind == _DONE:
                self._batch_done(self.workers[arg], t)
            elif kind == _READY:
                self._ready(self.workers[arg], t)
            else:
                self._control_step(t)
                self._push(t + period, _CONTROL, 0)
        for job in jobs:
            if job.status in ("queued", "running"):
                self.counters[f"unfinished_{job.status}"] += 1
                job.last_status, job.status = job.status, "unfinished"
        return SimResult(jobs, self.control, self.counters)

    # ------------------------------------------------------------------ gateway + classifier
    def _arrive(self, job: Job) -> None:
        t, cfg = job.arrival, self.cfg
        limit = cfg.slo_ms / 1000 if cfg.slo_ms else cfg.overload_max_delay_s
        retry = self.estimate.retry_after(limit) if self.estimate is not None else None
        if retry is None and self.inflight >= cfg.max_backlog:
            retry, job.reject_code = cfg.backlog_retry_after_s, "backlog_full"
        elif retry is not None:
            job.reject_code = "overloaded"
        if retry is not None:
            job.status, job.http_status, job.retry_after_s = "rejected", 429, float(retry)
            return
        job.http_status, self.inflight = 202, self.inflight + 1
        second = math.floor(t)
        self.arrival_buckets[second] = self.arrival_buckets.get(second, 0) + 1
        job_id = f"sim{cfg.seed}-{job.index}"
        dl = t + cfg.slo_ms / 1000 if cfg.slo_ms else None
        pj = PromptJob.model_construct(job_id=job_id, prompt=self.prompts[job.prompt],
                                       seed=0, enqueued_at=t, deadline=dl)
        decision = self.classifier.decide([pj])[0]
        job.predicted = k = decision.predicted_tier
        self.mix_buckets[(second, k)] = self.mix_buckets.get((second, k), 0) + 1
        plan = self.plan
        u = decision.draw if decision.draw is not None else \
            draw(job_id, plan.version if plan else 0)
        served = route(k, plan.routing if plan else {}, u)
        if not 0 <= served < self.n_tiers:
            served = k
        verdict = deadline.decide(served, t, dl, self.wait, self.service_s,
                                  cfg.deadline_policy)
        job.tier = verdict.tier
        if verdict.action == "expire":
            self._end(job, "expired", t)
            return
        job.degraded = verdict.action == "degraded"
        self.wait = deadline.charge(self.wait, verdict.tier, self.service_s, self.gpus)
        job.status = "queued"
        self.queues[verdict.tier].append(job)
        self._dispatch(verdict.tier, t)

    def _end(self, job: Job, status: str, t: float) -> None:
        job.status, job.finished = status, t
        self.inflight -= 1

    # ------------------------------------------------------------------ workers
    def _dispatch(self, k: int, t: float) -> None:
        queue, idle = self.queues[k], self.idle[k]
        while queue and idle:
            self._start(idle.popleft(), t)

    def _start(self, w: _Worker, t: float) -> None:
        """Worker ``w`` (idle at its tier) reads a batch and runs it, or goes idle."""
        assert w.tier is not None
        k, queue = w.tier, self.queues[w.tier]
        expire = self.cfg.deadline_policy == "expire" and self.cfg.slo_ms is not None
        slo_s = (self.cfg.slo_ms or 0) / 1000
        while queue:
            batch = [queue.popleft() for _ in range(min(self.limit[k], len(queue)))]
            if expire:
                for job in batch:
                    if t > job.arrival + slo_s:
                        self._end(job, "expired", t)
                batch = [j for j in batch if j.status != "expired"]
            if batch:
                for job in batch:
                    job.status, job.started = "running", t
                w.batch, w.busy = batch, True
                self.running[k] += len(batch)
                self._push(t + self.latency[k][len(batch)], _DONE, w.index)
                return
        self.idle[k].append(w)

    def _batch_done(self, w: _Worker, t: float) -> None:
        assert w.tier is not None
        k = w.tier
        for job in w.batch:
            self._end(job, "succeeded", t)
        self.running[k] -= len(w.batch)
        self.counters["batches"] += 1
        w.batch, w.busy = [], False
        self._settle(w, t)

    def _settle(self, w: _Worker, t: float) -> None:
        """Bring a free worker to its plan's tier: serve it, or load its model first."""
        if w.target is None:
            w.tier = None
            return
        model = self.registry.tiers[w.target].model
        if w.model is not None and w.model != model:
            w.tier, w.loading, w.model = None, True, model
            self.counters["model_switches"] += 1
            load_s = self.registry.tiers[w.target].load_time_s or 0.0
            self._push(t + load_s, _READY, w.index)
            return
        w.model, w.tier = model, w.target
        self._start(w, t)

    def _ready(self, w: _Worker, t: float) -> None:
        w.loading = False
        self._settle(w, t)

    def _assign(self, assignments: dict[str, int], t: float) -> None:
        """Apply a new plan's worker -> tier assignment."""
        for w in self.workers:
            target = assignments.get(w.name)
            if target == w.target:
                continue
            if w.target is not None and w.tier is not None and not w.busy:
                self.idle[w.tier].remove(w)
            w.target = target
            if w.model is None and target is not None:  # warm start: first assignment
                w.model = self.registry.tiers[target].model
            if not w.busy and not w.loading:
                self._settle(w, t)

    # ------------------------------------------------------------------ controller
    def _control_step(self, t: float) -> None:
        s, n = self.s, self.n_tiers
        upto = math.floor(t) - 1
        observed = 0.0
        if self.last_second is None:
            self.last_second = upto
        elif upto > self.last_second:
            count = count_between(self.arrival_buckets, self.last_second, upto)
            dt = upto - self.last_second
            self.load = self.estimator.update(self.load, count, dt)
            observed = count / dt
            self.arrival_buckets = {sec: c for sec, c in self.arrival_buckets.items()
                                    if sec > upto}
            self.last_second = upto
        since = math.floor(t) - s.mix_window_s
        self.mix_buckets = {key: c for key, c in self.mix_buckets.items() if key[0] >= since}
        mix = mix_shares(self.mix_buckets, since, n)
        backlog = {k: len(self.queues[k]) + self.running[k] for k in range(n)}
        waiting = sum(len(q) for q in self.queues)
        forecast = self.estimator.forecast(self.load)
        demand = self.estimator.demand(self.load, float(sum(backlog.values())))
        obs = Observation(self.heartbeats, forecast, demand, mix, backlog)
        draft = self.controller.plan(obs, self.plan)
        if plan_changed(self.plan, draft):
            version = (self.plan.version if self.plan else 0) + 1
            self.plan = AllocationPlan(
                version=version, policy=self.controller.name, created_at=t,
                assignments=draft.assignments, gpus_per_tier=draft.gpus_per_tier,
                routing=draft.routing, detail={**draft.detail, "workers": len(self.workers)})
            self.counters["plans"] += 1
            self._assign(draft.assignments, t)
        serving = Counter(self.plan.assignments.values()) if self.plan else Counter()
        moved = 0
        for k in range(n):
            target = rehome_target(k, serving) if self.queues[k] else None
            if target is not None and target != k:
                while self.queues[k]:
                    job = self.queues[k].popleft()
                    job.tier = target
                    self.queues[target].append(job)
                    moved += 1
                self._dispatch(target, t)
        self.counters["rehomed"] += moved
        report = overload.assess(dict(serving), self.rate, demand, waiting, backlog,
                                 draft.unserved, s.headroom, s.drain_horizon_s)
        self.estimate = report.estimate
        self.wait = {k: round(v, 3) for k, v in report.queue_delay_s.items()}
        self.gpus = dict(serving)
        self.control.append({
            "t": t, "plan_version": self.plan.version if self.plan else 0,
            "gpus": {k: serving.get(k, 0) for k in range(n)},
            "loading": sum(1 for w in self.workers if w.loading),
            "arrival_rate": round(observed, 4), "forecast": round(forecast, 4),
            "demand": round(demand, 4), "unserved": round(report.unserved, 4),
            "backlog": sum(backlog.values()), "waiting": waiting,
            "overloaded": report.estimate.overloaded, "delay_s": report.estimate.delay_s,
            "mix": {k: round(v, 4) for k, v in mix.items()}, "moved": moved})
