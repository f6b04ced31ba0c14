"""Tier-decision policies of the classifier, and the routing draw. Pure: no I/O.

A policy maps a batch of prompt jobs to one :class:`Decision` each: the predicted
(cheapest safe) tier and per-tier probabilities. The served tier is then drawn from the
controller's routing matrix with :func:`route`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Protocol

from common.messages import PromptJob
from common.settings import ClassifierSettings
from common.tiers import Registry

POLICIES = ("fixed",)


@dataclass(frozen=True)
class Decision:
    """A policy's verdict for one prompt."""

    predicted_tier: int
    probabilities: list[float]


class Policy(Protocol):
    """Decides a tier per prompt. ``decide`` returns one decision per job, in order."""

    name: str

    def decide(self, jobs: list[PromptJob]) -> list[Decision]:
        """Decide the predicted tier of each job."""
        ...


class PolicyError(ValueError):
    """Unknown policy name or invalid policy configuration."""


class FixedPolicy:
    """Every prompt to one tier: Clipper-HA (tier 0) or Clipper-HT (the cheapest tier)."""

    name = "fixed"

    def __init__(self, tier: int, n_tiers: int) -> None:
        if not 0 <= tier < n_tiers:
            raise PolicyError(f"fixed tier {tier} is not a tier of the registry "
                              f"(0..{n_tiers - 1})")
        self.tier = tier
        self.n_tiers = n_tiers

    def decide(self, jobs: list[PromptJob]) -> list[Decision]:
        """The fixed tier for every job, with probability 1."""
        probs = [1.0 if k == self.tier else 0.0 for k in range(self.n_tiers)]
        return [Decision(self.tier, list(probs)) for _ in jobs]


def make_policy(settings: ClassifierSettings, registry: Registry) -> Policy:
    """The policy named by ``settings.policy``.

    Raises:
        PolicyError: Unknown name, or a configuration the policy rejects.
    """
    if settings.policy == "fixed":
        return FixedPolicy(settings.fixed_tier, len(registry.tiers))
    raise PolicyError(f"unknown classifier policy {settings.policy!r}; "
                      f"choose one of {POLICIES}")


def route(predicted: int, routing: dict[int, dict[int, float]], u: float) -> int:
    """The served tier for a prompt predicted at ``predicted``, given a uniform draw.

    Args:
        predicted: The policy's tier k.
        routing: ``routing[k][j]``: share of tier-k predictions served at tier j. Rows
            need not be normalised; a missing or all-zero row means identity.
        u: A uniform draw in [0, 1).

    Returns:
        The tier j whose cumulative share (in ascending j) first exceeds ``u``.
    """
    row = {j: p for j, p in routing.get(predicted, {}).items() if p > 0}
    total = sum(row.values())
    if total <= 0:
        return predicted
    acc = 0.0
    for j in sorted(row):
        acc += row[j] / total
        if u < acc:
            return j
    return max(row)  # u within rounding of 1.0


def draw(job_id: str, plan_version: int) -> float:
    """A uniform draw seeded by the job and plan: the same job routes the same way under
    one plan, whichever classifier instance (or retry) handles it."""
    return random.Random(f"{job_id}:{plan_version}").random()
