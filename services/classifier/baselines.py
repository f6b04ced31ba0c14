"""Classifier sides of two baselines: NIRVANA (cache-similarity K) and DiffServe
(confidence-ranked cascade). Pure: the cache lookup is injected.

NIRVANA (NSDI'24): a prompt is served from the latent of its most similar cached prompt,
skipping K of N steps, K from the top-1 CLIP similarity by NIRVANA's thresholds
(``services.worker.cache_index.k_for_similarity``, scaled to the exact tier's N) and
capped by the Ks the neighbour has stored (``choose_k``). In tier terms the prediction is
the ``cache`` tier skipping the largest K not above that (tier 0 on a miss). Load never
enters: the controller's ``nirvana`` side serves every prompt at its tier.

DiffServe (MLSys'25) runs a light model first and defers to the heavy model the queries
whose light image a discriminator scores below a threshold ``t``; its controller picks
``t`` (a deferral share ``f``) from the load. Here the decision is taken before
generation, so a deferred prompt does not pay for the light pass. The confidence is the
per-prompt predictor's probability that the cheapest tier is safe for the prompt (its
last probability; a one-hot predictor gives 1 or 0) until a discriminator exists. The
prompt's *rank* among the last ``window`` confidences (ties broken by a job-seeded
uniform draw) is its routing draw: with the controller's rows ``{exact: f, cheapest:
1 - f}``, the ``f`` least confident prompts go to the exact tier.
"""

from __future__ import annotations

import bisect
import random
from collections import deque
from collections.abc import Callable, Sequence

from common.messages import PromptJob
from common.tiers import Registry, Strategy
from services.classifier.policies import Decision, Policy
from services.worker.cache_index import choose_k, k_for_similarity

Neighbour = tuple[float, Sequence[int]]
"""Top-1 cache neighbour of a prompt: (cosine similarity, Ks stored for it)."""

Lookup = Callable[[list[PromptJob]], list[Neighbour | None]]
"""The cache lookup: one neighbour (or None on an empty cache) per job, in order."""


def cache_tier(k: int, cache_tiers: Sequence[tuple[int, int]]) -> int:
    """The tier serving skip ``k``: the ``cache`` tier with the largest skip ``<= k``
    (``cache_tiers`` is ``(skip, tier id)`` pairs); 0 (exact) when none fits."""
    fits = [(skip, tier) for skip, tier in cache_tiers if 0 < skip <= k]
    return max(fits)[1] if fits else 0


class NirvanaPolicy:
    """Predicted tier = the cache tier NIRVANA's similarity rule allows."""

    name = "nirvana"

    def __init__(self, lookup: Lookup, registry: Registry) -> None:
        self.lookup = lookup
        self.n_tiers = len(registry.tiers)
        self.steps = registry.tiers[0].steps
        self.cache_tiers = [(t.skip, t.id) for t in registry.tiers
                            if t.strategy is Strategy.CACHE]

    def decide(self, jobs: list[PromptJob]) -> list[Decision]:
        """One lookup per batch; K from similarity, capped by the stored Ks."""
        out = []
        for hit in self.lookup(jobs):
            k = 0 if hit is None else choose_k(k_for_similarity(hit[0], self.steps), hit[1])
            tier = cache_tier(k, self.cache_tiers)
            out.append(Decision(tier, [1.0 if j == tier else 0.0 for j in range(self.n_tiers)]))
        return out


def confidence(decision: Decision, n_tiers: int) -> float:
    """Probability that the cheapest tier is safe: the last probability, or 1/0 from the
    predicted tier when no probabilities are given."""
    if len(decision.probabilities) == n_tiers:
        return float(decision.probabilities[-1])
    return 1.0 if decision.predicted_tier == n_tiers - 1 else 0.0


def rank_draw(value: float, window: Sequence[float], tie: float) -> float:
    """Mid-rank of ``value`` in the sorted ``window``, in [0, 1): the share of
    remembered values below it plus ``tie`` times the share equal to it."""
    if not window:
        return tie
    below = bisect.bisect_left(window, value)
    equal = bisect.bisect_right(window, value) - below
    return min((below + tie * equal) / len(window), 1.0 - 1e-12)


class CascadePolicy:
    """DiffServe's deferral decision (module doc) over a per-prompt predictor."""

    name = "diffserve"

    def __init__(self, predictor: Policy, n_tiers: int, window: int = 1000) -> None:
        self.predictor = predictor
        self.n_tiers = n_tiers
        self.recent: deque[float] = deque(maxlen=window)

    def decide(self, jobs: list[PromptJob]) -> list[Decision]:
        """The predictor's decisions, each with its confidence rank as the draw."""
        decisions = self.predictor.decide(jobs)
        window = sorted(self.recent)
        out = []
        for job, d in zip(jobs, decisions, strict=True):
            c = confidence(d, self.n_tiers)
            u = rank_draw(c, window, random.Random(job.job_id).random())
            out.append(Decision(d.predicted_tier, d.probabilities, u))
            self.recent.append(c)
        return out
