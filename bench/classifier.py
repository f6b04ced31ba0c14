"""Classifier speed: prompts/s of the ``lgbm`` predictor per batch size, and per-prompt
latency at a fixed arrival rate, in process and through the real service over Redis.

    python bench/classifier.py [--model models/classifier/model.json] [--rate 100]
                               [--seconds 10] [--no-service]

Prints one JSON object:
- ``throughput``: per batch size B, the median wall time of ``LgbmPolicy.decide`` on B
  prompts (embedding + features + safety models + decision) and ``prompts_per_s``.
- ``latency_inprocess``: Poisson arrivals at ``rate``/s into a loop that decides
  whatever has arrived (up to 64 at once); per-prompt latency = decided - arrived
  (includes waking late on a busy CPU), and the ``decide`` call times alone.
- ``latency_service``: the classifier service (``services.classifier.service.run``)
  on a private redis-server, jobs created at ``rate``/s; latency = the tier-stream
  entry's server time minus the job's ``enqueued_at``; for ``lgbm`` and, as the
  reference, the ``fixed`` predictor (what the service costs without a model).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from common.messages import ClassifiedJob, PromptJob  # noqa: E402
from common.settings import DEFAULT_TIERS_FILE, ClassifierSettings  # noqa: E402
from services.classifier.lgbm import LgbmPolicy  # noqa: E402


def prompts(n: int) -> list[str]:
    """``n`` varied world captions."""
    from world.scenes import train_captions

    return [t for t, _ in train_captions(n, seed=11)]


def jobs_of(texts: list[str]) -> list[PromptJob]:
    return [PromptJob(job_id=uuid.uuid4().hex, prompt=t, seed=0) for t in texts]


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def throughput(policy: LgbmPolicy, texts: list[str], batches: list[int],
               budget_s: float) -> list[dict[str, Any]]:
    out = []
    for b in batches:
        times: list[float] = []
        start = time.perf_counter()
        i = 0
        while time.perf_counter() - start < budget_s or len(times) < 5:
            batch = jobs_of([texts[(i + j) % len(texts)] for j in range(b)])
            i += b
            t0 = time.perf_counter()
            policy.decide(batch)
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        out.append({"batch": b, "calls": len(times), "ms_per_batch_median": med * 1e3,
                    "prompts_per_s": b / med})
    return out


def latency_inprocess(policy: LgbmPolicy, texts: list[str], rate: float, seconds: float,
                      max_batch: int = 64) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    arrivals = np.cumsum(rng.exponential(1 / rate, int(rate * seconds)))
    lat: list[float] = []
    calls: list[float] = []
    t0 = time.perf_counter()
    nxt = 0
    while nxt < len(arrivals):
        now = time.perf_counter() - t0
        if arrivals[nxt] > now:
            time.sleep(arrivals[nxt] - now)
            continue
        end = min(int(np.searchsorted(arrivals, now, side="right")), nxt + max_batch)
        end = max(end, nxt + 1)
        batch = jobs_of([texts[i % len(texts)] for i in range(nxt, end)])
        c0 = time.perf_counter()
        policy.decide(batch)
        calls.append(time.perf_counter() - c0)
        done = time.perf_counter() - t0
        lat += [done - a for a in arrivals[nxt:end]]
        nxt = end
    return {"rate": rate, "prompts": len(lat), "p50_ms": pct(lat, 50) * 1e3,
            "p99_ms": pct(lat, 99) * 1e3, "max_ms": max(lat) * 1e3,
            "decide_calls": len(calls), "decide_p50_ms": pct(calls, 50) * 1e3,
            "decide_p99_ms": pct(calls, 99) * 1e3}


async def _service_run(cfg: ClassifierSettings, texts: list[str], rate: float,
                       seconds: float) -> dict[str, Any]:
    from common import keys
    from common.jobs import JobStore
    from common.redisutil import connect
    from services.classifier.service import run

    redis = connect(cfg.redis_url)
    await redis.flushdb()
    stop = asyncio.Event()
    task = asyncio.create_task(run(cfg, stop))
    store = JobStore(redis)
    await asyncio.sleep(1.0)
    for t in texts[:20]:  # warm-up, not measured
        await store.create(PromptJob(job_id=uuid.uuid4().hex, prompt=t, seed=0))
    await asyncio.sleep(1.0)
    rng = np.random.default_rng(1)
    n = int(rate * seconds)
    start = time.perf_counter()
    due = np.cumsum(rng.exponential(1 / rate, n))
    sent: set[str] = set()
    for i in range(n):
        wait = due[i] - (time.perf_counter() - start)
        if wait > 0:
            await asyncio.sleep(wait)
        job_id = uuid.uuid4().hex
        sent.add(job_id)
        await store.create(PromptJob(job_id=job_id, prompt=texts[i % len(texts)], seed=0))
    lat: list[float] = []
    deadline = time.monotonic() + 30
    while len(lat) < n and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        lat = []
        for k in range(16):
            for eid, fields in await redis.xrange(keys.tier_stream(k)):
                job = ClassifiedJob.from_fields(fields)
                if job.job_id in sent:  # not the warm-up jobs
                    lat.append(int(eid.split(b"-")[0]) / 1000 - job.enqueued_at)
    stop.set()
    await asyncio.wait_for(task, 10)
    await redis.aclose()
    return {"rate": rate, "prompts": len(lat), "sent": n, "p50_ms": pct(lat, 50) * 1e3,
            "p99_ms": pct(lat, 99) * 1e3, "max_ms": max(lat) * 1e3}


def latency_service(model: Path, tiers: Path, texts: list[str], rate: float,
                    seconds: float) -> dict[str, Any]:
    exe = shutil.which("redis-server")
    if exe is None:
        return {"skipped": "redis-server not found"}
    sys.path.insert(0, str(REPO))
    from tests.conftest import free_port

    port = free_port()
    tmp = tempfile.mkdtemp()
    proc = subprocess.Popen([exe, "--port", str(port), "--save", "", "--appendonly", "no",
                             "--dir", tmp], stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        out = {}
        for predictor in ("fixed", "lgbm"):
            cfg = ClassifierSettings(redis_url=f"redis://127.0.0.1:{port}/0",
                                     instance=f"bench-{predictor}", tiers_file=tiers,
                                     policy="argus", predictor=predictor,
                                     classifier_model=model, stream_block_ms=100)
            out[predictor] = asyncio.run(_service_run(cfg, texts, rate, seconds))
        return out
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(REPO / "models" / "classifier" / "model.json"))
    ap.add_argument("--tiers", default=str(DEFAULT_TIERS_FILE))
    ap.add_argument("--batches", default="1,2,4,8,16,32,64")
    ap.add_argument("--budget-s", type=float, default=2.0, help="seconds per batch size")
    ap.add_argument("--rate", type=float, default=100.0)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--no-service", action="store_true")
    args = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    import torch

    torch.set_num_threads(1)  # as the service does (T2I_CLASSIFIER_THREADS=1)
    policy = LgbmPolicy(args.model, args.tiers, reload_s=3600, threads=1)
    texts = prompts(2000)
    policy.decide(jobs_of(texts[:64]))  # warm-up
    result: dict[str, Any] = {
        "model": args.model, "embedder": policy.loaded.model.embedder,
        "cpus": os.cpu_count(), "nice": os.nice(0), "loadavg_start": os.getloadavg(),
        "throughput": throughput(policy, texts, [int(b) for b in args.batches.split(",")],
                                 args.budget_s),
        "latency_inprocess": latency_inprocess(policy, texts, args.rate, args.seconds)}
    if not args.no_service:
        result["latency_service"] = latency_service(Path(args.model), Path(args.tiers),
                                                    texts, args.rate, args.seconds)
    result["loadavg_end"] = os.getloadavg()
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
