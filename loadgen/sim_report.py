"""Records, summary and result files of ``loadgen simulate``, in the replay's format.

Each simulated arrival becomes one record with the keys of
:class:`loadgen.replay.RequestRecord` (``requests.jsonl`` of a replay), plus
``predicted_tier``, ``quality``, ``rel_quality``, ``degraded`` and ``reject_code``; the
summary is
:func:`loadgen.summary.summarize` of those records, plus:

- ``mean_quality``: mean quality (relative to exact, in ``[0, 1]``) of the succeeded jobs
  (None when none succeeded); ``mean_rel_quality``: the same with table values not
  clipped at 1 (:mod:`loadgen.sim_quality`); ``p99_latency_s``: ``latency_s.p99``;
- per minute: ``quality`` (mean quality of the jobs completed in that minute) and
  ``gpus`` (mean GPUs per tier of the plans of the control periods starting in it);
- ``sim``: the run's counters, policy, predictor, predicted-tier mix and quality source.

In the simulation the client sees the server: ``sent_s`` = ``scheduled_s``,
``client_e2e_s`` = ``e2e_s`` (no HTTP or polling delay), ``send_lag_s`` = 0.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common.messages import DEADLINE_EXCEEDED
from loadgen.replay_cli import _clean
from loadgen.sim_engine import SimResult
from loadgen.summary import slo_met, summarize

SERVER_DONE = ("succeeded", "expired")


def records(result: SimResult, prompts: Sequence[str], seeds: Sequence[int],
            slo_ms: int | None, quality: Any, unclipped: Any, run_seed: int
            ) -> list[dict[str, Any]]:
    """One record per arrival, in arrival order (module doc).

    Args:
        result: The simulation's outcome.
        prompts: Distinct prompts (``Job.prompt`` indexes them).
        seeds: Image seed per arrival (recorded, as the replay sends them).
        slo_ms: The SLO the run judged against.
        quality: ``P x K`` array of the quality of each prompt at each tier.
        unclipped: The same, table values not clipped at 1 (``rel_quality``).
        run_seed: The run's seed (part of the job ids).
    """
    out = []
    for job in result.jobs:
        accepted = job.http_status == 202
        done = job.status in SERVER_DONE
        e2e = job.finished - job.arrival if done and job.finished is not None else None
        served = job.status == "succeeded" and job.tier is not None
        rec: dict[str, Any] = {
            "index": job.index, "prompt": prompts[job.prompt], "seed": int(seeds[job.index]),
            "scheduled_s": job.arrival, "slo_ms": slo_ms, "sent_s": job.arrival,
            "send_lag_s": 0.0, "http_status": job.http_status,
            "retry_after_s": job.retry_after_s,
            "job_id": f"sim{run_seed}-{job.index}" if accepted else None,
            "status": job.status,
            "last_status": job.last_status if job.status == "unfinished" else job.status,
            "tier": job.tier if accepted else None,
            "timings": {"enqueued": job.arrival if accepted else None,
                        "classified": job.arrival if accepted else None,
                        "started": job.started, "finished": job.finished},
            "accepted_s": job.arrival if accepted else None,
            "completed_s": job.finished if done else None,
            "e2e_s": e2e, "client_e2e_s": e2e,
            "queue_wait_s": job.started - job.arrival if job.started is not None else None,
            "slo_met": None,
            "error": DEADLINE_EXCEEDED if job.status == "expired" else None,
            "predicted_tier": job.predicted,
            "quality": (float(quality[job.prompt, job.tier]) if served else None),
            "rel_quality": (float(unclipped[job.prompt, job.tier]) if served else None),
            "degraded": job.degraded, "reject_code": job.reject_code,
        }
        rec["slo_met"] = slo_met(rec, slo_ms)
        out.append(rec)
    return out


def _mean(values: Sequence[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


def summary(recs: Sequence[dict[str, Any]], result: SimResult, slo_ms: int | None,
            n_tiers: int, extra: dict[str, Any]) -> dict[str, Any]:
    """The replay summary of ``recs`` plus the simulator's figures (module doc)."""
    out = summarize(recs, slo_ms)
    succeeded = [r for r in recs if r["status"] == "succeeded"]
    out["mean_quality"] = _mean([r["quality"] for r in succeeded])
    out["mean_rel_quality"] = _mean([r["rel_quality"] for r in succeeded])
    out["p99_latency_s"] = out["latency_s"]["p99"]
    by_minute: dict[int, list[float]] = defaultdict(list)
    for r in succeeded:
        by_minute[math.floor(r["completed_s"] / 60.0)].append(r["quality"])
    gpus: dict[int, list[dict[int, int]]] = defaultdict(list)
    for row in result.control:
        gpus[math.floor(row["t"] / 60.0)].append(row["gpus"])
    for entry in out["per_minute"]:
        m = entry["minute"]
        entry["quality"] = _mean(by_minute.get(m, []))
        rows = gpus.get(m, [])
        entry["gpus"] = {str(k): round(sum(g.get(k, 0) for g in rows) / len(rows), 3)
                         for k in range(n_tiers)} if rows else None
    predicted = Counter(str(r["predicted_tier"]) for r in recs
                        if r["predicted_tier"] is not None)
    rejected = Counter(str(r["reject_code"]) for r in recs if r["reject_code"])
    out["sim"] = {
        **extra,
        "plans": result.counters["plans"], "batches": result.counters["batches"],
        "model_switches": result.counters["model_switches"],
        "rehomed": result.counters["rehomed"],
        "degraded": sum(1 for r in recs if r["degraded"]),
        "rejected_by_reason": dict(sorted(rejected.items())),
        "unfinished_queued": result.counters["unfinished_queued"],
        "unfinished_running": result.counters["unfinished_running"],
        "predicted_mix": dict(sorted(predicted.items(), key=lambda kv: int(kv[0]))),
        "control_periods": len(result.control),
    }
    return out


def write(out_dir: Path, recs: Sequence[dict[str, Any]], result: SimResult,
          summ: dict[str, Any]) -> None:
    """Write ``requests.jsonl`` (one line per arrival), ``control.jsonl`` (one line per
    control period: plan version, GPUs per tier, demand, backlog, overload) and
    ``summary.json`` into ``out_dir`` (created if needed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "requests.jsonl").open("w", encoding="utf-8") as f:
        for rec in recs:
            f.write(json.dumps(_clean(rec), allow_nan=False) + "\n")
    with (out_dir / "control.jsonl").open("w", encoding="utf-8") as f:
        for row in result.control:
            f.write(json.dumps(_clean(row), allow_nan=False) + "\n")
    (out_dir / "summary.json").write_text(
        json.dumps(_clean(summ), indent=2, allow_nan=False) + "\n", encoding="utf-8")
