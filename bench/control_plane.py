"""Control-plane overhead of Argus, measured on the real services with the emulated
backend at zero latency (no generation time at all).

Prints and writes JSON (``--out``, default ``bench/results/control_plane.json``):

- ``latency``: open-loop submissions at ``--rate`` jobs/s for ``--seconds``; for each job,
  the time from the client's POST to the worker's start (``started_at`` minus the client
  send time, same machine clock) and from the gateway's enqueue to the start: p50/p99.
- ``throughput``: closed-loop submissions by ``--concurrency`` clients for
  ``--burst-seconds``; accepted submissions per second (202 answers), and the answer
  latency p50/p99.

Targets (issue 2, 2-core machine): p99 <= 10 ms at 200 jobs/s; >= 1,000 submissions/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.up import StackConfig, running_stack


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), nearest rank."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def ms(values: list[float]) -> dict[str, float]:
    """p50/p99/max/mean in milliseconds."""
    return {"p50_ms": round(pct(values, 50) * 1e3, 3), "p99_ms": round(pct(values, 99) * 1e3, 3),
            "max_ms": round(max(values) * 1e3, 3),
            "mean_ms": round(statistics.fmean(values) * 1e3, 3), "n": len(values)}


async def open_loop(url: str, rate: float, seconds: float) -> dict[str, Any]:
    """Submit at a fixed rate, then read every job's start time."""
    n = int(rate * seconds)
    sent: dict[str, float] = {}
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:

        async def one(i: int, due: float) -> None:
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            t0 = time.time()
            r = await client.post("/v1/jobs", json={"prompt": f"a red circle {i}", "seed": i})
            if r.status_code == 202:
                sent[r.json()["id"]] = t0

        start = time.monotonic() + 0.2
        await asyncio.gather(*(one(i, start + i / rate) for i in range(n)))
        post_to_start: list[float] = []
        enqueue_to_start: list[float] = []
        deadline = time.monotonic() + 60
        pending = set(sent)
        while pending and time.monotonic() < deadline:
            for job_id in list(pending):
                rec = (await client.get(f"/v1/jobs/{job_id}")).json()
                if rec["status"] in ("succeeded", "failed", "cancelled"):
                    pending.discard(job_id)
                    started = rec["timings"]["started"]
                    if started:
                        post_to_start.append(started - sent[job_id])
                        enqueue_to_start.append(started - rec["timings"]["enqueued"])
            await asyncio.sleep(0.2)
    return {"rate_per_s": rate, "submitted": n, "accepted": len(sent),
            "unfinished": len(pending), "post_to_worker_start": ms(post_to_start),
            "enqueue_to_worker_start": ms(enqueue_to_start)}


async def closed_loop(url: str, concurrency: int, seconds: float) -> dict[str, Any]:
    """As many submissions as ``concurrency`` clients can get answered."""
    lat: list[float] = []
    codes: dict[int, int] = {}
    stop = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:

        async def loop(k: int) -> None:
            i = 0
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                r = await client.post("/v1/jobs", json={"prompt": f"p{k}-{i}", "seed": i})
                lat.append(time.perf_counter() - t0)
                codes[r.status_code] = codes.get(r.status_code, 0) + 1
                i += 1

        t0 = time.monotonic()
        await asyncio.gather(*(loop(k) for k in range(concurrency)))
        elapsed = time.monotonic() - t0
    return {"concurrency": concurrency, "seconds": round(elapsed, 2), "codes": codes,
            "accepted_per_s": round(codes.get(202, 0) / elapsed, 1), "answer": ms(lat)}


def main() -> int:
    """Run both measurements on a fresh local stack; print and write JSON."""
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--burst-seconds", type=float, default=10.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--gateway-workers", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("bench/results/control_plane.json"))
    args = ap.parse_args()
    env = {"T2I_EMULATED_LATENCY_SCALE": "0", "T2I_LOG_LEVEL": "WARNING",
           "T2I_MAX_BACKLOG": "1000000", "T2I_GATEWAY_WORKERS": str(args.gateway_workers)}
    config = StackConfig(workers=args.workers, backend="emulated", port=8765, env=env,
                         with_tasks=False)
    with running_stack(config) as stack:
        latency = asyncio.run(open_loop(stack.url, args.rate, args.seconds))
        throughput = asyncio.run(closed_loop(stack.url, args.concurrency, args.burst_seconds))
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version()},
              "workers": args.workers, "gateway_workers": args.gateway_workers,
              "latency": latency, "throughput": throughput,
              "targets": {"p99_ms_at_200_per_s": 10, "submissions_per_s": 1000}}
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
