"""Deadline handling at routing time (``T2I_DEADLINE_POLICY``). Pure.

A job with a deadline (``PromptJob.deadline``, from the request's ``slo_ms``) whose
estimated finish at its routed tier is too late is, by policy:

- ``degrade`` (default): served at the least approximate *cheaper* tier (higher id, with
  GPUs) whose estimated finish meets the deadline; when none does, at the cheaper tier
  that finishes first if that is earlier than the routed tier's; else left where it is.
  Never dropped.
- ``expire``: ended with status ``expired`` and error ``deadline exceeded before start``
  when it cannot even *start* before its deadline (already past, or the routed tier's
  queueing delay alone reaches it). The worker repeats the check when the job starts.

Estimates come from the controller's state: ``finish_j = now + wait_j + service_j``,
``wait_j`` = the tier's queueing delay (backlog / service rate), ``service_j`` = its
profiled batch-1 latency. Without an estimate for a tier (no state, stale state, or no
GPUs there) only the "already past" check applies.

Between two controller states the router adds each job it sends to a tier to that tier's
estimate (:func:`charge`: ``service / GPUs`` more waiting), so the jobs of one control
period do not all herd onto the one cheaper tier the last state called fast.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

Action = Literal["ok", "degraded", "late", "expire"]


@dataclass(frozen=True)
class Verdict:
    """Where the job goes, and why: ``ok`` (meets its deadline or has none),
    ``degraded`` (moved to a cheaper tier), ``late`` (kept, expected to miss),
    ``expire`` (end it as expired)."""

    tier: int
    action: Action


def charge(wait: Mapping[int, float], tier: int, service: Mapping[int, float],
           gpus: Mapping[int, int]) -> dict[int, float]:
    """``wait`` after one more job is queued at ``tier``: that tier's delay grows by its
    service time spread over its GPUs. Tiers without an estimate, a service time or GPUs
    are unchanged (a new copy is returned; ``wait`` is not modified)."""
    out = dict(wait)
    n = gpus.get(tier, 0)
    if tier in out and tier in service and n > 0:
        out[tier] += service[tier] / n
    return out


def decide(tier: int, now: float, deadline: float | None, wait: Mapping[int, float],
           service: Mapping[int, float], policy: str) -> Verdict:
    """The deadline verdict for a job routed to ``tier`` (see the module doc).

    Args:
        tier: The tier the routing matrix drew.
        now: Current time (epoch seconds).
        deadline: The job's deadline (epoch seconds), or None.
        wait: Estimated queueing delay per tier with GPUs (seconds).
        service: Profiled service time per tier (seconds).
        policy: ``"degrade"`` or ``"expire"``.
    """
    if deadline is None:
        return Verdict(tier, "ok")
    if policy == "expire":
        if now >= deadline or now + wait.get(tier, 0.0) >= deadline:
            return Verdict(tier, "expire")
        return Verdict(tier, "ok")

    def finish(j: int) -> float | None:
        if j not in wait or j not in service:
            return None
        return now + wait[j] + service[j]

    own = finish(tier)
    if own is not None and own <= deadline:
        return Verdict(tier, "ok")
    if own is None and now < deadline:
        return Verdict(tier, "ok")  # no estimate: nothing says it will be late
    cheaper = sorted(j for j in wait if j > tier and finish(j) is not None)
    for j in cheaper:
        f = finish(j)
        if f is not None and f <= deadline:
            return Verdict(j, "degraded")
    best = min(cheaper, key=lambda j: (finish(j) or float("inf"), j), default=None)
    if best is not None and (own is None or (finish(best) or own) < own):
        return Verdict(best, "degraded")
    return Verdict(tier, "late")
