"""Pure batching decisions of the worker (no I/O)."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TypeVar

from common.messages import ClassifiedJob
from common.tiers import Tier

T = TypeVar("T")


def batch_limit(max_batch: int, tier: Tier, device: str = "",
                budget_s: float | None = None) -> int:
    """Largest batch to read: ``max_batch`` when set (> 0), else the tier's serving batch
    (:meth:`common.tiers.Tier.serving_batch`: the largest profiled size whose latency on
    ``device`` fits ``budget_s``, a share of the SLO; the largest size without a budget).
    The controller plans capacity at the same size."""
    return max_batch if max_batch > 0 else tier.serving_batch(device, budget_s)


def shape_key(job: ClassifiedJob) -> tuple[int, int, int]:
    """Jobs batch together only with the same (width, height, n)."""
    return job.width, job.height, job.n


def group_batches(items: list[T], key: Callable[[T], Hashable], limit: int) -> list[list[T]]:
    """Split ``items`` into groups of equal ``key``, each at most ``limit`` long.

    Guarantees: every item is in exactly one group; groups come in the order of their
    first item and keep the items' order (oldest entries run first).
    """
    if limit <= 0:
        raise ValueError("limit must be positive")
    groups: dict[Hashable, list[list[T]]] = {}
    order: list[list[T]] = []
    for item in items:
        chunks = groups.setdefault(key(item), [])
        if not chunks or len(chunks[-1]) >= limit:
            chunks.append([])
            order.append(chunks[-1])
        chunks[-1].append(item)
    return order


def reclaim_period_s(claim_idle_ms: int) -> float:
    """How often to look for entries of dead consumers: half the claim idle time."""
    return claim_idle_ms / 2000
