"""Allocation policies of the controller, and worker assignment. Pure: no I/O.

A policy turns the live workers (and the previous plan) into a :class:`Draft`: GPUs per
tier, the worker -> tier assignment and the routing matrix. The controller publishes a
draft only when it differs from the current plan (:func:`plan_changed`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from common.messages import AllocationPlan, WorkerHeartbeat
from common.settings import ControllerSettings
from common.tiers import Registry

POLICIES = ("static",)


class PolicyError(ValueError):
    """Unknown policy name or invalid policy configuration."""


@dataclass(frozen=True)
class Draft:
    """A plan before it gets a version."""

    gpus_per_tier: dict[int, int]
    assignments: dict[str, int]
    routing: dict[int, dict[int, float]]
    detail: dict[str, object] = field(default_factory=dict)


class Policy(Protocol):
    """Decides the allocation from the live workers."""

    name: str

    def plan(self, workers: list[WorkerHeartbeat], previous: AllocationPlan | None) -> Draft:
        """The allocation for ``workers`` (``previous``: the current plan, if any)."""
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


def plan_changed(current: AllocationPlan | None, draft: Draft) -> bool:
    """True when ``draft`` differs from ``current`` in assignments or routing."""
    if current is None:
        return True
    return current.assignments != draft.assignments or current.routing != draft.routing


class StaticPolicy:
    """Every live worker on one tier; every prediction is served there (Clipper-style)."""

    name = "static"

    def __init__(self, tier: int, n_tiers: int) -> None:
        if not 0 <= tier < n_tiers:
            raise PolicyError(f"static tier {tier} is not a tier of the registry "
                              f"(0..{n_tiers - 1})")
        self.tier = tier
        self.n_tiers = n_tiers

    def plan(self, workers: list[WorkerHeartbeat], previous: AllocationPlan | None) -> Draft:
        """All workers on ``tier``; routing sends every predicted tier to ``tier``."""
        names = [w.instance for w in workers]
        gpus = {k: (len(names) if k == self.tier else 0) for k in range(self.n_tiers)}
        prev = previous.assignments if previous else {}
        routing = {k: {self.tier: 1.0} for k in range(self.n_tiers)}
        return Draft(gpus, assign(names, gpus, prev), routing)


def make_policy(settings: ControllerSettings, registry: Registry) -> Policy:
    """The policy named by ``settings.policy``.

    Raises:
        PolicyError: Unknown name, or a configuration the policy rejects.
    """
    if settings.policy == "static":
        return StaticPolicy(settings.static_tier, len(registry.tiers))
    raise PolicyError(f"unknown controller policy {settings.policy!r}; "
                      f"choose one of {POLICIES}")
