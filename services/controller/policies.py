"""Allocation policies of the controller, and worker assignment. Pure: no I/O.

A policy turns one period's :class:`Observation` (live workers, load forecast, demand,
predicted-tier mix, backlogs) and the previous plan into a :class:`Draft`: GPUs per tier,
the worker -> tier assignment and the routing matrix. The controller publishes a draft
only when it differs from the current plan (:func:`plan_changed`).

``T2I_POLICY`` names a *system* policy, read by the classifier and the controller alike;
:data:`POLICIES` maps each to this service's side (``docs/policies.md`` has the table
and sources). The solver-based sides live in :mod:`services.controller.allocators`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from common.messages import AllocationPlan, WorkerHeartbeat
from common.settings import ControllerSettings
from common.tiers import Registry

POLICIES: dict[str, str] = {
    "static": "every GPU on T2I_STATIC_TIER, every prediction served there",
    "fixed": "alias of static",
    "clipper-ha": "every GPU on the exact tier (Clipper, high accuracy)",
    "clipper-ht": "every GPU on the cheapest tier (Clipper, high throughput)",
    "argus": "MILP allocation (T2I_FORMULATION) + prompt-aware routing (Argus)",
    "proteus": "load-aware MILP tier split, prompt-agnostic routing (Proteus)",
    "nirvana": "GPUs in proportion to the cache-K mix, load-unaware (NIRVANA)",
    "diffserve": "light/heavy cascade split solved from load (DiffServe)",
}
"""System policy name -> what the controller does for it."""


class PolicyError(ValueError):
    """Unknown policy name or invalid policy configuration."""


@dataclass(frozen=True)
class Observation:
    """What the controller saw this period. Rates in jobs/s.

    Attributes:
        workers: Live workers (heartbeats), sorted by instance.
        forecast: Arrival rate forecast for the next period.
        demand: Load to plan for: forecast plus backlog to drain.
        mix: Share of predictions per tier (sums to 1; empty: none seen).
        backlog: Jobs waiting (unread + pending) per tier stream.
    """

    workers: list[WorkerHeartbeat]
    forecast: float = 0.0
    demand: float = 0.0
    mix: Mapping[int, float] = field(default_factory=dict)
    backlog: Mapping[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Draft:
    """A plan before it gets a version, with what its policy expects of it.

    Attributes:
        gpus_per_tier: GPUs per tier id.
        assignments: Worker -> tier.
        routing: ``P[i][j]``, rows sum to 1.
        detail: Free-form facts for the plan's ``detail`` (formulation, sources...).
        unserved: Demand the allocation cannot serve, jobs/s (None: the policy does not
            know; the controller then estimates it from the tiers' capacities).
        served: Expected load per tier, jobs/s (empty when unknown).
        solve_ms: Time spent in the solver, if one ran.
    """

    gpus_per_tier: dict[int, int]
    assignments: dict[str, int]
    routing: dict[int, dict[int, float]]
    detail: dict[str, object] = field(default_factory=dict)
    unserved: float | None = None
    served: dict[int, float] = field(default_factory=dict)
    solve_ms: float | None = None


class Policy(Protocol):
    """Decides the allocation from one period's observation."""

    name: str

    def plan(self, obs: Observation, previous: AllocationPlan | None) -> Draft:
        """The allocation for ``obs`` (``previous``: the current plan, if any)."""
        ...


def assign(workers: list[str], gpus_per_tier: dict[int, int],
           previous: dict[str, int]) -> dict[str, int]:
    """Map workers to tiers, moving as few as possible.

    Args:
        workers: Live worker instances.
        gpus_per_tier: Target count per tier; counts beyond the workers available are
            left unfilled (lowest tiers are filled first).
        previous: The current assignment (may name dead workers; they are ignored).

    Returns:
        ``worker -> tier`` for assigned workers; workers left over are absent (idle).
        A worker keeps its previous tier whenever that tier still has room, so the
        number of kept workers, ``sum_k min(previous_k, target_k)``, is the maximum
        possible. Ties are broken by instance name, so the result is deterministic.
    """
    room = {k: n for k, n in gpus_per_tier.items() if n > 0}
    out: dict[str, int] = {}
    for w in sorted(workers):
        k = previous.get(w)
        if k is not None and room.get(k, 0) > 0:
            out[w] = k
            room[k] -= 1
    free = [w for w in sorted(workers) if w not in out]
    for k in sorted(room):
        while room[k] > 0 and free:
            out[free.pop(0)] = k
            room[k] -= 1
    return out


def current_allocation(workers: list[WorkerHeartbeat], previous: AllocationPlan | None
                       ) -> dict[int, int]:
    """GPUs per tier among the live workers under the previous plan."""
    out: dict[int, int] = {}
    prev = previous.assignments if previous else {}
    for w in workers:
        if w.instance in prev:
            out[prev[w.instance]] = out.get(prev[w.instance], 0) + 1
    return out


def clean_routing(routing: Mapping[int, Mapping[int, float]], digits: int = 3
                  ) -> dict[int, dict[int, float]]:
    """Routing rows rounded to ``digits`` decimals, zeros dropped, renormalised.

    Rounding keeps tiny float changes from republishing the plan every period; each row
    still sums to 1 (to float precision) and keeps every share >= ``10**-digits / 2``.
    """
    out: dict[int, dict[int, float]] = {}
    for i, row in routing.items():
        kept = {j: round(v, digits) for j, v in row.items() if round(v, digits) > 0}
        if not kept:
            kept = {max(row, key=lambda j: row[j]) if row else i: 1.0}
        total = sum(kept.values())
        out[i] = {j: v / total for j, v in sorted(kept.items())}
    return out


def plan_changed(current: AllocationPlan | None, draft: Draft) -> bool:
    """True when ``draft`` differs from ``current`` in assignments or routing."""
    if current is None:
        return True
    return current.assignments != draft.assignments or current.routing != draft.routing


class StaticPolicy:
    """Every live worker on one tier; every prediction is served there (Clipper-style)."""

    def __init__(self, tier: int, n_tiers: int, name: str = "static") -> None:
        if not 0 <= tier < n_tiers:
            raise PolicyError(f"static tier {tier} is not a tier of the registry "
                              f"(0..{n_tiers - 1})")
        self.name = name
        self.tier = tier
        self.n_tiers = n_tiers

    def plan(self, obs: Observation, previous: AllocationPlan | None) -> Draft:
        """All workers on ``tier``; routing sends every predicted tier to ``tier``."""
        names = [w.instance for w in obs.workers]
        gpus = {k: (len(names) if k == self.tier else 0) for k in range(self.n_tiers)}
        prev = previous.assignments if previous else {}
        routing = {k: {self.tier: 1.0} for k in range(self.n_tiers)}
        return Draft(gpus, assign(names, gpus, prev), routing)


def make_policy(settings: ControllerSettings, registry: Registry) -> Policy:
    """The controller side of the system policy named by ``settings.policy``.

    Raises:
        PolicyError: Unknown name, or a configuration the policy rejects (e.g. a solver
            policy on a registry without latency profiles for the planning device).
    """
    from services.controller import allocators

    name, n = settings.policy, len(registry.tiers)
    if name in ("static", "fixed"):
        return StaticPolicy(settings.static_tier, n, name)
    if name == "clipper-ha":
        return StaticPolicy(0, n, name)
    if name == "clipper-ht":
        return StaticPolicy(n - 1, n, name)
    if name in ("argus", "proteus", "nirvana", "diffserve"):
        return allocators.make(name, settings, registry)
    raise PolicyError(f"unknown policy {name!r} (T2I_POLICY); choose one of "
                      f"{', '.join(POLICIES)}")
