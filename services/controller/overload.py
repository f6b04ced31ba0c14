"""Capacity, queueing delay and overload, from a plan and the backlogs. Pure.

Rates in jobs/s, delays in seconds. The *service rate* of a tier is its GPUs times the
profiled per-GPU throughput at its largest batch (no headroom: what the GPUs really do
when saturated). Queueing delay is Little's law on the work ahead: jobs waiting divided
by the rate they are served at.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from common.messages import OverloadEstimate
from common.tiers import Registry

MAX_DELAY_S = 24 * 3600.0
"""Delay reported when jobs wait and nothing serves them (no GPU anywhere)."""


def per_gpu_rate(registry: Registry, device: str, budget_s: float | None = None
                 ) -> dict[int, float] | None:
    """Jobs/s one GPU serves at each tier (at its serving batch,
    :meth:`common.tiers.Tier.serving_batch` with ``budget_s``), or None when some tier has
    no latency profile for ``device`` (capacity is then unknown)."""
    out: dict[int, float] = {}
    for tier in registry.tiers:
        b = tier.serving_batch(device, budget_s)
        seconds = tier.batch_latency(device, b)
        if seconds is None:
            return None
        out[tier.id] = b / seconds
    return out


def tier_capacity(gpus: Mapping[int, int], rate: Mapping[int, float]) -> dict[int, float]:
    """Service rate per tier: ``gpus_k * rate_k``."""
    return {k: n * rate.get(k, 0.0) for k, n in gpus.items()}


def queue_delays(backlog: Mapping[int, int], capacity: Mapping[int, float]
                 ) -> dict[int, float]:
    """Seconds a job joining tier ``k`` now waits before it starts:
    ``backlog_k / capacity_k`` for tiers with capacity (tiers without GPUs are absent:
    their jobs are re-homed)."""
    return {k: backlog.get(k, 0) / c for k, c in capacity.items() if c > 0}


def estimate(waiting: int, capacity_total: float, unserved: float, drain_horizon_s: float
             ) -> OverloadEstimate:
    """The overload estimate for the gateway.

    Args:
        waiting: Jobs accepted and not started (prompt stream + tier streams).
        capacity_total: Service rate of the whole allocation, jobs/s.
        unserved: Demand the allocation cannot serve (the solver's ``unserved``), jobs/s.
        drain_horizon_s: Longest acceptable time to drain the backlog.

    Returns:
        ``delay_s = waiting / capacity_total`` (``MAX_DELAY_S`` when jobs wait and no
        capacity exists); ``overloaded`` when ``unserved > 0`` (even the allocation
        chosen cannot keep up with the demand) or ``delay_s > drain_horizon_s``.
    """
    idle_delay = MAX_DELAY_S if waiting > 0 else 0.0
    delay = min(waiting / capacity_total if capacity_total > 0 else idle_delay, MAX_DELAY_S)
    overloaded = unserved > 1e-9 or delay > drain_horizon_s
    return OverloadEstimate(overloaded=overloaded, delay_s=round(delay, 3),
                            unserved=round(max(0.0, unserved), 4),
                            capacity=round(capacity_total, 4))


def unserved_estimate(demand: float, capacity: Mapping[int, float], headroom: float
                      ) -> float:
    """For policies without a solver: demand beyond the allocation's planned capacity
    (total capacity after headroom), jobs/s; 0 for an unknown (NaN) demand."""
    if not math.isfinite(demand):
        return 0.0
    return max(0.0, demand - sum(capacity.values()) * (1 - headroom))


@dataclass(frozen=True)
class Assessment:
    """What the controller reports after a plan: per-tier service rate, the unserved
    demand, the gateway's overload estimate and the classifier's queueing delays.

    Attributes:
        capacity: Service rate per tier with GPUs, jobs/s (:func:`tier_capacity`; empty
            when the per-GPU rate is unknown).
        unserved: Demand the allocation cannot serve, jobs/s.
        estimate: The overload estimate (:func:`estimate`).
        queue_delay_s: Queueing delay per tier with capacity (:func:`queue_delays`).
    """

    capacity: dict[int, float]
    unserved: float
    estimate: OverloadEstimate
    queue_delay_s: dict[int, float]


def assess(gpus: Mapping[int, int], rate: Mapping[int, float] | None, demand: float,
           waiting: int, backlog: Mapping[int, int], planned_unserved: float | None,
           headroom: float, drain_horizon_s: float) -> Assessment:
    """The controller's report for one period, from what it serves and observed. Pure.

    Args:
        gpus: Live GPUs serving each tier under the current plan.
        rate: Jobs/s of one GPU per tier (:func:`per_gpu_rate`), or None when unknown.
        demand: The demand planned for, jobs/s.
        waiting: Jobs accepted and not started (prompt stream + tier-stream lag).
        backlog: Jobs waiting (unread + pending) per tier stream.
        planned_unserved: The policy's own unserved estimate (its draft's), or None.
        headroom: The solver's headroom (for policies without an unserved estimate).
        drain_horizon_s: Longest acceptable time to drain the backlog.

    Returns:
        Capacity per tier; unserved = ``planned_unserved`` when given, else
        :func:`unserved_estimate` (0 without capacity); the overload estimate (with no
        known capacity: nothing waiting, nothing unserved); queueing delays.
    """
    capacity = tier_capacity(gpus, rate) if rate else {}
    if planned_unserved is not None:
        unserved = planned_unserved
    else:
        unserved = unserved_estimate(demand, capacity, headroom) if capacity else 0.0
    overload = (estimate(waiting, sum(capacity.values()), unserved, drain_horizon_s)
                if capacity else estimate(0, 0.0, 0.0, drain_horizon_s))
    return Assessment(capacity, unserved, overload, queue_delays(backlog, capacity))
