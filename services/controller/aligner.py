"""Argus's distribution aligner (ODA): the routing matrix that matches the predicted-tier
mix of the prompts to the capacity the allocation gives each tier.

Tiers are positions ``0..K-1``, from exact (0) to most approximate (K-1). A prompt's
*predicted tier* ``i`` is the cheapest tier that is still safe for it, so serving it at a
tier ``j <= i`` (a *demotion*, or its own tier) loses no quality, while serving it at
``j > i`` (a *promotion* to a more approximate tier) does.

The algorithm (Argus artifact ``solver_milp_oda.py``, restated with exact bookkeeping of
where each class's prompts go, and with spare capacity handled explicitly):

1. Lossless pass, from the most approximate tier down: tier ``k`` takes its own prompts
   first, then prompts demoted from above; whatever does not fit is demoted to ``k-1``.
   What is left below tier 0 is the *overflow*: load that cannot be served without
   quality loss.
2. If there is overflow, the spare capacity left by pass 1 is used from the least
   approximate spare tier upwards, just enough to absorb the overflow; capacity beyond
   that stays idle (it would only add approximation).
3. ODA proper on those capacities (which now equal the demand): from the most
   approximate tier down, own prompts first, then demoted ones, excess demoted to the
   next tier; a tier with room left pulls the *nearest* prompts up from the tiers just
   below it (``k-1`` first, then ``k-2``...).

Demand ``h`` and capacity ``f`` are in the same unit (jobs/s, or fractions of the load).
When total capacity is below total demand (overload), capacity is scaled up to the demand
before step 1: the routing then spreads the excess in proportion to capacity, and the
queues absorb it.

Guarantees (for non-negative finite inputs; all are checked by ``tests/test_aligner``):
- G1 (stochastic): every row has non-negative entries that sum to 1.
- G2 (capacity): when ``sum(f) >= sum(h)``, the load routed to tier ``j``,
  ``sum_i h_i P[i][j]``, is at most ``f_j``; when ``sum(f) < sum(h)`` it is at most
  ``f_j * sum(h) / sum(f)``.
- G3 (lossless first): a prompt is promoted (``P[i][j] > 0`` with ``j > i``) only when
  every tier ``t <= i`` is full; in particular no promotion happens at all when the
  demand can be served losslessly.
- G4 (least approximation): the promoted load weighted by the number of tiers it moves,
  ``sum_{i<j} h_i P[i][j] (j - i)``, is the minimum over all routings that respect G2:
  ``sum_b max(0, sum_{i<=b} h_i - sum_{t<=b} f_t)``.
- G5 (own tier first): a prompt leaves its predicted tier only when that tier is full.
- Rows of classes with no demand route to the nearest tier with capacity at or below
  the predicted tier (lossless), else the nearest above; with no capacity anywhere a row
  is the identity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

_EPS = 1e-12


def _check(name: str, values: Sequence[float]) -> list[float]:
    out = [float(v) for v in values]
    if any(not (math.isfinite(v) and v >= 0) for v in out):
        raise ValueError(f"{name} must hold finite numbers >= 0, got {list(values)}")
    return out


def fallback_row(tier: int, capacity: Sequence[float]) -> list[float]:
    """Routing of a class with no predicted demand.

    Args:
        tier: The predicted tier of the class.
        capacity: Capacity per tier (only which entries are positive matters).

    Returns:
        A one-hot row: the nearest tier ``<= tier`` with capacity (lossless), else the
        nearest tier above with capacity, else ``tier`` itself.
    """
    k = len(capacity)
    row = [0.0] * k
    below = [t for t in range(tier, -1, -1) if capacity[t] > _EPS]
    above = [t for t in range(tier + 1, k) if capacity[t] > _EPS]
    row[below[0] if below else above[0] if above else tier] = 1.0
    return row


def _lossless_pass(h: list[float], f: list[float]) -> tuple[list[float], float]:
    """Step 1: load each tier serves losslessly (own first, then demoted) and overflow."""
    served = [0.0] * len(h)
    carry = 0.0
    for k in range(len(h) - 1, -1, -1):
        pool = h[k] + carry
        served[k] = min(pool, f[k])
        carry = pool - served[k]
    return served, carry


def _oda(h: list[float], cap: list[float]) -> list[list[float]]:
    """Step 3: flows ``F[i][j]`` of class ``i`` to tier ``j`` for ``sum(cap) == sum(h)``."""
    k_n = len(h)
    flow = [[0.0] * k_n for _ in range(k_n)]
    rem = list(h)  # own demand of each class not yet placed
    carry = [0.0] * k_n  # demand demoted from above, by class
    for k in range(k_n - 1, -1, -1):
        room = cap[k]
        own = min(rem[k], room)
        flow[k][k] += own
        rem[k] -= own
        room -= own
        total = sum(carry)
        take = min(total, room)
        if take > _EPS:
            share = take / total
            for i in range(k_n):
                moved = carry[i] * share
                flow[i][k] += moved
                carry[i] -= moved
            room -= take
        for m in range(k - 1, -1, -1):  # pull the nearest prompts up (lossy)
            if room <= _EPS:
                break
            shift = min(rem[m], room)
            flow[m][k] += shift
            rem[m] -= shift
            room -= shift
        carry[k] += rem[k]
        rem[k] = 0.0
    for i in range(k_n):  # rounding dust only: keep every row complete
        flow[i][0] += carry[i]
    return flow


def align(mix: Sequence[float], capacity: Sequence[float]) -> list[list[float]]:
    """The routing matrix ``P[i][j]``: share of prompts predicted at tier ``i`` that are
    served at tier ``j``.

    Args:
        mix: Demand per predicted tier, ``h_i`` (any non-negative unit; fractions of the
            load or jobs/s).
        capacity: Capacity per tier ``f_j`` in the same unit as ``mix``.

    Returns:
        A ``K x K`` row-stochastic matrix satisfying the guarantees G1-G5 of the module
        docstring.

    Raises:
        ValueError: The lengths differ, are 0, or an entry is negative or not finite.
    """
    h = _check("mix", mix)
    f = _check("capacity", capacity)
    k_n = len(h)
    if k_n == 0 or len(f) != k_n:
        raise ValueError(f"mix and capacity need the same length >= 1, got {k_n}, {len(f)}")
    demand, cap_total = sum(h), sum(f)
    if demand <= _EPS or cap_total <= _EPS:
        return [fallback_row(i, f) for i in range(k_n)]
    if cap_total < demand:
        f = [v * demand / cap_total for v in f]
    served, overflow = _lossless_pass(h, f)
    for t in range(k_n):  # step 2: spare capacity, least approximate first
        if overflow <= _EPS:
            break
        extra = min(f[t] - served[t], overflow)
        served[t] += extra
        overflow -= extra
    flow = _oda(h, served)
    rows: list[list[float]] = []
    for i in range(k_n):
        total = sum(flow[i])
        if h[i] <= _EPS or total <= _EPS:
            rows.append(fallback_row(i, f))
        else:
            rows.append([max(0.0, v) / total for v in flow[i]])
    return rows


def routed_load(mix: Sequence[float], routing: Sequence[Sequence[float]]) -> list[float]:
    """Load arriving at each tier under ``routing``: ``sum_i mix_i P[i][j]``."""
    k_n = len(mix)
    return [sum(mix[i] * routing[i][j] for i in range(k_n)) for j in range(k_n)]


def promotion_distance(mix: Sequence[float], routing: Sequence[Sequence[float]]) -> float:
    """Promoted load times tiers moved: ``sum_{i<j} mix_i P[i][j] (j - i)`` (G4's measure)."""
    k_n = len(mix)
    return sum(mix[i] * routing[i][j] * (j - i)
               for i in range(k_n) for j in range(i + 1, k_n))


def min_promotion_distance(mix: Sequence[float], capacity: Sequence[float]) -> float:
    """The least promotion distance any capacity-respecting routing needs (G4's bound):
    ``sum_b max(0, sum_{i<=b} h_i - sum_{t<=b} f_t)``, with capacity scaled up to the
    demand under overload as :func:`align` does."""
    h = _check("mix", mix)
    f = _check("capacity", capacity)
    demand, cap_total = sum(h), sum(f)
    if demand <= _EPS or cap_total <= _EPS:
        return 0.0
    if cap_total < demand:
        f = [v * demand / cap_total for v in f]
    total, ph, pf = 0.0, 0.0, 0.0
    for b in range(len(h)):
        ph += h[b]
        pf += f[b]
        total += max(0.0, ph - pf)
    return total
