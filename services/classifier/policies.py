"""Tier-decision policies of the classifier, and the routing draw. Pure: no I/O.

A policy maps a batch of prompt jobs to one :class:`Decision` each: the predicted
(cheapest safe) tier and per-tier probabilities. The served tier is then drawn from the
controller's routing matrix with :func:`route`, using the decision's own ``draw`` when
the policy sets one (DiffServe's confidence rank), else a uniform draw seeded by the job.

``T2I_POLICY`` names a *system* policy read by the classifier and the controller alike;
:data:`POLICIES` lists this service's side of each (``docs/policies.md``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from common.messages import PromptJob
from common.settings import ClassifierSettings
from common.tiers import Registry

if TYPE_CHECKING:
    from services.classifier.baselines import Lookup

POLICIES: dict[str, str] = {
    "static": "every prompt predicted at T2I_FIXED_TIER",
    "fixed": "alias of static",
    "clipper-ha": "every prompt predicted exact",
    "clipper-ht": "every prompt predicted at the cheapest tier",
    "argus": "the per-prompt predictor (T2I_PREDICTOR)",
    "proteus": "the per-prompt predictor (only its mix is reported; routing ignores it)",
    "nirvana": "K from the top-1 cache similarity (NIRVANA's rule)",
    "diffserve": "the predictor's confidence that the cheapest tier is safe, ranked",
}
"""System policy name -> what the classifier does for it."""

PREDICTORS = ("fixed", "lgbm")
"""Per-prompt predictors usable by ``argus``, ``proteus`` and ``diffserve``."""


@dataclass(frozen=True)
class Decision:
    """A policy's verdict for one prompt.

    Attributes:
        predicted_tier: The cheapest tier predicted safe for the prompt.
        probabilities: Per-tier probabilities of the prediction (may be empty).
        draw: The value in [0, 1) to route with, when the policy chooses it; None for the
            job-seeded uniform draw.
    """

    predicted_tier: int
    probabilities: list[float]
    draw: float | None = None


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

    def __init__(self, tier: int, n_tiers: int, name: str = "fixed") -> None:
        if not 0 <= tier < n_tiers:
            raise PolicyError(f"fixed tier {tier} is not a tier of the registry "
                              f"(0..{n_tiers - 1})")
        self.name = name
        self.tier = tier
        self.n_tiers = n_tiers

    def decide(self, jobs: list[PromptJob]) -> list[Decision]:
        """The fixed tier for every job, with probability 1."""
        probs = [1.0 if k == self.tier else 0.0 for k in range(self.n_tiers)]
        return [Decision(self.tier, list(probs)) for _ in jobs]


def make_predictor(settings: ClassifierSettings, registry: Registry, name: str) -> Policy:
    """The per-prompt predictor named by ``settings.predictor``, reporting as ``name``.

    Raises:
        PolicyError: Unknown predictor.
    """
    if settings.predictor == "fixed":
        return FixedPolicy(settings.fixed_tier, len(registry.tiers), name)
    if settings.predictor == "lgbm":
        from services.classifier.lgbm import make_lgbm_policy

        return make_lgbm_policy(settings, registry, name)
    raise PolicyError(f"unknown predictor {settings.predictor!r} (T2I_PREDICTOR); "
                      f"choose one of {', '.join(PREDICTORS)}")


def make_policy(settings: ClassifierSettings, registry: Registry,
                lookup: Lookup | None = None) -> Policy:
    """The classifier side of the system policy named by ``settings.policy``.

    Args:
        settings: Classifier settings (``policy``, ``predictor``, ``fixed_tier``...).
        registry: The tier registry.
        lookup: NIRVANA's cache lookup (:data:`services.classifier.baselines.Lookup`);
            required by ``nirvana`` only.

    Raises:
        PolicyError: Unknown name, or a configuration the policy rejects.
    """
    from services.classifier import baselines

    name, n = settings.policy, len(registry.tiers)
    if name in ("static", "fixed"):
        return FixedPolicy(settings.fixed_tier, n, name)
    if name == "clipper-ha":
        return FixedPolicy(0, n, name)
    if name == "clipper-ht":
        return FixedPolicy(n - 1, n, name)
    if name in ("argus", "proteus"):
        return make_predictor(settings, registry, name)
    if name == "diffserve":
        return baselines.CascadePolicy(make_predictor(settings, registry, name), n,
                                       settings.cascade_window)
    if name == "nirvana":
        if lookup is None:
            raise PolicyError("policy 'nirvana' needs the approximate cache's lookup "
                              "(a prompt embedder and services.worker.cache); none is "
                              "configured in this classifier")
        return baselines.NirvanaPolicy(lookup, registry)
    raise PolicyError(f"unknown policy {name!r} (T2I_POLICY); choose one of "
                      f"{', '.join(POLICIES)}")


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
