"""Per-request judgement and the replay summary: pure functions over request records.

Records are plain mappings, the lines of ``requests.jsonl`` (see
:class:`loadgen.replay.RequestRecord`), so a summary can be recomputed from saved results.

Definitions (all times in seconds, offsets from the replay start):

* ``e2e_s``: server-side end to end, ``finished − enqueued`` (gateway admission to the
  image stored). ``client_e2e_s``: from handing the POST to the HTTP client to the poll
  that saw the job terminal, so it is up to one poll interval late (more when the
  lower-priority poller is short of CPU). Latency percentiles are over ``client_e2e_s``
  of succeeded jobs; server-side ones (exact) are reported beside them.
* Queue wait: ``started − enqueued`` of every job that started, whatever its outcome.
* SLO met: the job succeeded and its latency (``e2e_s``, else ``client_e2e_s``) is within
  ``slo_ms``. Any other outcome (late, failed, rejected, cancelled, unfinished, error) is
  a violation; the violation ratio is over every offered request.
* Throughput: succeeded jobs per minute of run duration (start to last completion seen);
  goodput: the same for jobs that met the SLO. Offered rate: requests per minute of the
  arrival span.
* Per-minute series: ``offered`` and ``violations`` by scheduled minute (when the request
  arrived), ``completed`` and ``tier_mix`` by the minute its completion was seen.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

SUCCEEDED = "succeeded"
SERVER_TERMINAL = ("succeeded", "failed", "cancelled", "expired")
OUTCOMES = (*SERVER_TERMINAL, "rejected", "error", "unfinished")

Record = Mapping[str, Any]


def slo_met(record: Record, slo_ms: float | None) -> bool | None:
    """Whether one request met ``slo_ms`` (None when no SLO is set)."""
    if slo_ms is None:
        return None
    if record.get("status") != SUCCEEDED:
        return False
    latency = record.get("e2e_s")
    if latency is None:
        latency = record.get("client_e2e_s")
    return latency is not None and float(latency) * 1000.0 <= slo_ms


def percentiles(values: Sequence[float], qs: Sequence[int] = (50, 90, 99),
                scale: float = 1.0) -> dict[str, float | None]:
    """``{"p50": ...}`` (linear interpolation) times ``scale``; None values when empty."""
    if not values:
        return {f"p{q}": None for q in qs}
    arr = np.asarray(values, dtype=np.float64) * scale
    return {f"p{q}": float(np.percentile(arr, q)) for q in qs}


def _values(records: Sequence[Record], key: str, status: str | None = None) -> list[float]:
    return [float(r[key]) for r in records
            if r.get(key) is not None and (status is None or r.get("status") == status)]


def _per_min(x: float | None) -> int | None:
    return None if x is None else math.floor(x / 60.0)


def _series(records: Sequence[Record]) -> list[dict[str, Any]]:
    offered: Counter[int] = Counter()
    violations: Counter[int] = Counter()
    completed: Counter[int] = Counter()
    tiers: dict[int, Counter[str]] = {}
    for r in records:
        m = _per_min(r.get("scheduled_s"))
        if m is not None:
            offered[m] += 1
            if r.get("slo_met") is False:
                violations[m] += 1
        c = _per_min(r.get("completed_s"))
        if c is not None and r.get("status") == SUCCEEDED:
            completed[c] += 1
            tiers.setdefault(c, Counter())[str(r.get("tier"))] += 1
    last = max([*offered, *completed], default=-1)
    return [{"minute": m, "offered": offered[m], "completed": completed[m],
             "violations": violations[m], "tier_mix": dict(sorted(tiers.get(m, {}).items()))}
            for m in range(last + 1)]


def summarize(records: Sequence[Record], slo_ms: float | None = None) -> dict[str, Any]:
    """Aggregate request records into the replay summary (see the module docstring).

    Args:
        records: one mapping per offered request.
        slo_ms: the latency objective used to judge records; when None, each record's own
            ``slo_met`` is trusted and SLO figures are None if no record carries one.

    Returns:
        A JSON-serialisable dict (no NaN): counts, rates per minute, SLO figures,
        latency, queue-wait and send-lag percentiles, tier mix and per-minute series.
    """
    if slo_ms is not None:
        records = [{**r, "slo_met": slo_met(r, slo_ms)} for r in records]
    status = Counter(str(r.get("status")) for r in records)
    offered = len(records)
    completed = status[SUCCEEDED]
    judged = [r["slo_met"] for r in records if r.get("slo_met") is not None]
    met = sum(1 for v in judged if v)
    span = max(_values(records, "scheduled_s"), default=0.0)
    duration = max([span, *_values(records, "completed_s"), *_values(records, "sent_s")])
    tiers = Counter(str(r.get("tier")) for r in records if r.get("status") == SUCCEEDED)

    def rate(count: int, seconds: float) -> float | None:
        return count * 60.0 / seconds if seconds > 0 else None

    return {
        "offered": offered,
        "accepted": sum(1 for r in records if r.get("http_status") == 202),
        "completed": completed,
        **{k: status[k] for k in OUTCOMES if k != SUCCEEDED},
        "arrival_span_s": span,
        "duration_s": duration,
        "offered_per_min": rate(offered, span),
        "throughput_per_min": rate(completed, duration),
        "goodput_per_min": rate(met, duration) if judged else None,
        "slo_ms": slo_ms,
        "slo_met": met if judged else None,
        "slo_violations": len(judged) - met if judged else None,
        "slo_violation_ratio": (len(judged) - met) / len(judged) if judged else None,
        "latency_s": percentiles(_values(records, "client_e2e_s", SUCCEEDED)),
        "server_e2e_s": percentiles(_values(records, "e2e_s", SUCCEEDED)),
        "queue_wait_s": percentiles(_values(records, "queue_wait_s"), (50, 99)),
        "tier_mix": dict(sorted(tiers.items())),
        "tier_fraction": {k: v / completed for k, v in sorted(tiers.items())},
        "send_lag_ms": {**percentiles(_values(records, "send_lag_s"), (50, 95, 99), 1000.0),
                        "max": max((v * 1000.0 for v in _values(records, "send_lag_s")),
                                   default=None)},
        "per_minute": _series(records),
    }
