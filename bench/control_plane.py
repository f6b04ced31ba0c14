"""Control-plane overhead of Argus, measured on the real services with the emulated
backend at zero latency (no generation time at all).

Prints and writes JSON (``--out``, default ``bench/results/control_plane.json``):

- ``latency``: open-loop submissions at ``--rate`` jobs/s for ``--seconds`` from a lean
  keep-alive HTTP/1.1 client (raw asyncio streams, so the client's own CPU cost does not
  delay the schedule); for each job, the time from the client's send to the worker's
  start (``started_at``, read from the job's Redis hash, same machine clock), and from
  the gateway's enqueue to the start: p50/p99. ``send_lag`` says how late the client
  sent against its schedule.
- ``throughput``: the highest rate of accepted submissions (202 answers) the gateway
  sustains, measured with ``wrk`` (``--connections`` keep-alive connections, unique
  prompts, for ``--burst-seconds``), twice: ``gateway_only`` with the consumers
  (classifier, controller, workers) paused by SIGSTOP for the burst, as when the gateway
  has cores of its own, and ``whole_stack`` with everything running on the same cores
  (then also ``finished_per_s``: jobs that went all the way through). Without ``wrk``,
  the lean client in closed loop (its own CPU is then part of the measurement, and the
  JSON says ``"tool": "python"``). ``make bench`` installs ``wrk`` when apt-get can.

Targets (issue 2, 2-core machine): p99 <= 10 ms at 200 jobs/s; >= 1,000 submissions/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import keys
from services.up import StackConfig, running_stack

WRK_SCRIPT = """
counter = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  counter = counter + 1
  local body = '{"prompt":"a red circle ' .. counter .. ' ' .. math.random(1e9) .. '","seed":1}'
  return wrk.format(nil, "/v1/jobs", nil, body)
end
"""


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), nearest rank."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def ms(values: list[float]) -> dict[str, float]:
    """p50/p99/max/mean in milliseconds."""
    if not values:
        return {"n": 0}
    return {"p50_ms": round(pct(values, 50) * 1e3, 3), "p99_ms": round(pct(values, 99) * 1e3, 3),
            "max_ms": round(max(values) * 1e3, 3),
            "mean_ms": round(statistics.fmean(values) * 1e3, 3), "n": len(values)}


class Conn:
    """One keep-alive HTTP/1.1 connection that POSTs JSON and returns (status, body)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    def send(self, path: str, body: bytes) -> None:
        assert self.writer is not None
        self.writer.write(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (path.encode(), self.host.encode(),
                                                             len(body), body))

    async def answer(self) -> tuple[int, bytes]:
        assert self.reader is not None
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        m = re.search(rb"(?i)content-length:\s*(\d+)", head)
        body = await self.reader.readexactly(int(m.group(1))) if m else b""
        return status, body


async def open_loop(url: str, rate: float, seconds: float, conns: int) -> dict[str, Any]:
    """Submit at a fixed rate; returns job id -> client send time, and the send lags."""
    u = urlsplit(url)
    host, port = u.hostname or "127.0.0.1", u.port or 80
    idle: asyncio.Queue[Conn] = asyncio.Queue()
    for _ in range(conns):
        c = Conn(host, port)
        await c.open()
        idle.put_nowait(c)
    sent: dict[str, float] = {}
    lags: list[float] = []
    codes: dict[int, int] = {}
    n = int(rate * seconds)
    start = time.monotonic() + 0.2

    async def one(i: int, due: float) -> None:
        c = await idle.get()
        t_send, lag = time.time(), time.monotonic() - due
        c.send("/v1/jobs", b'{"prompt":"a red circle %d","seed":%d}' % (i, i))
        status, body = await c.answer()
        idle.put_nowait(c)
        lags.append(lag)
        codes[status] = codes.get(status, 0) + 1
        if status == 202:
            sent[json.loads(body)["id"]] = t_send

    tasks = []
    for i in range(n):
        due = start + i / rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, due)))
    await asyncio.gather(*tasks)
    return {"sent": sent, "lags": lags, "codes": codes}


def read_timings(redis_url: str, sent: dict[str, float], wait_s: float = 60.0
                 ) -> dict[str, Any]:
    """Wait until every job has started; returns the latency figures."""
    r = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + wait_s
    started: dict[str, tuple[float, float]] = {}
    while len(started) < len(sent) and time.monotonic() < deadline:
        pipe = r.pipeline(transaction=False)
        todo = [j for j in sent if j not in started]
        for job_id in todo:
            pipe.hmget(keys.job_key(job_id), ["started_at", "enqueued_at"])
        for job_id, (st, enq) in zip(todo, pipe.execute(), strict=True):
            if st is not None:
                started[job_id] = (float(st), float(enq))
        if len(started) < len(sent):
            time.sleep(0.2)
    post = [st - sent[j] for j, (st, _) in started.items()]
    enq = [st - e for st, e in started.values()]
    return {"unstarted": len(sent) - len(started), "post_to_worker_start": ms(post),
            "enqueue_to_worker_start": ms(enq)}


def wrk_throughput(url: str, seconds: float, connections: int, threads: int
                   ) -> dict[str, Any]:
    """Accepted submissions/s under ``wrk`` (closed loop, ``connections`` in flight)."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(WRK_SCRIPT)
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{int(seconds)}s", "--latency",
           "-s", f.name, url]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    os.unlink(f.name)
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    elapsed_m = re.search(r"requests in ([\d.]+)(m?s)", out)
    assert elapsed_m is not None
    elapsed = float(elapsed_m.group(1)) * (1e-3 if elapsed_m.group(2) == "ms" else 1)
    bad_m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    bad = int(bad_m.group(1)) if bad_m else 0
    lat = dict(re.findall(r"\s+(50|99)%\s+([\d.]+\w+)", out))
    return {"tool": "wrk", "connections": connections, "threads": threads,
            "seconds": round(elapsed, 2), "requests": total, "non_2xx": bad,
            "accepted_per_s": round((total - bad) / elapsed, 1),
            "answer_p50": lat.get("50"), "answer_p99": lat.get("99")}


async def python_throughput(url: str, seconds: float, connections: int) -> dict[str, Any]:
    """Fallback without wrk: the lean client in closed loop."""
    u = urlsplit(url)
    codes: dict[int, int] = {}
    stop = time.monotonic() + seconds

    async def loop(k: int) -> None:
        c = Conn(u.hostname or "127.0.0.1", u.port or 80)
        await c.open()
        i = 0
        while time.monotonic() < stop:
            c.send("/v1/jobs", b'{"prompt":"p%d-%d","seed":1}' % (k, i))
            status, _ = await c.answer()
            codes[status] = codes.get(status, 0) + 1
            i += 1

    t0 = time.monotonic()
    await asyncio.gather(*(loop(k) for k in range(connections)))
    elapsed = time.monotonic() - t0
    return {"tool": "python", "connections": connections, "seconds": round(elapsed, 2),
            "codes": codes, "accepted_per_s": round(codes.get(202, 0) / elapsed, 1)}


def burst(url: str, args: argparse.Namespace) -> dict[str, Any]:
    """One closed-loop burst: wrk when installed, else the lean Python client."""
    if shutil.which("wrk"):
        return wrk_throughput(url, args.burst_seconds, args.connections, args.wrk_threads)
    return asyncio.run(python_throughput(url, args.burst_seconds, args.connections))


def main() -> int:
    """Run both measurements on a fresh local stack; print and write JSON."""
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--client-connections", type=int, default=8)
    ap.add_argument("--connections", type=int, default=32, help="wrk connections")
    ap.add_argument("--wrk-threads", type=int, default=1)
    ap.add_argument("--burst-seconds", type=float, default=10.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--gateway-workers", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("bench/results/control_plane.json"))
    args = ap.parse_args()
    env = {"T2I_EMULATED_LATENCY_SCALE": "0", "T2I_LOG_LEVEL": "WARNING",
           "T2I_MAX_BACKLOG": "10000000", "T2I_OVERLOAD_MAX_DELAY_S": "1e9",
           "T2I_GATEWAY_WORKERS": str(args.gateway_workers)}
    config = StackConfig(workers=args.workers, backend="emulated", port=8765, env=env,
                         with_tasks=False)
    with running_stack(config) as stack:
        loop = asyncio.run(open_loop(stack.url, args.rate, args.seconds,
                                     args.client_connections))
        latency = {"rate_per_s": args.rate, "submitted": int(args.rate * args.seconds),
                   "codes": loop["codes"], "send_lag": ms(loop["lags"]),
                   **read_timings(stack.redis_url, loop["sent"])}
        r = redis.Redis.from_url(stack.redis_url)
        # (a) The whole stack on the same cores: submissions accepted and jobs finished.
        before = int(r.zcard(keys.INFLIGHT))  # type: ignore[arg-type]
        whole = burst(stack.url, args)
        after = int(r.zcard(keys.INFLIGHT))  # type: ignore[arg-type]
        accepted = whole["requests"] - whole.get("non_2xx", 0) if "requests" in whole else \
            whole["codes"].get(202, 0)
        whole["finished_per_s"] = round((accepted - (after - before)) / whole["seconds"], 1)
        consumers = [proc for name, proc in stack.procs.items() if name != "gateway"]
        # (b) The gateway's own admission rate: consumers paused (SIGSTOP) for the burst,
        # as when the gateway has its own cores; the jobs stay queued, nothing is lost.
        for proc in consumers:
            proc.send_signal(signal.SIGSTOP)
        try:
            gateway_only = burst(stack.url, args)
        finally:
            for proc in consumers:
                proc.send_signal(signal.SIGCONT)
        throughput = {"gateway_only": gateway_only, "whole_stack": whole}
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version(),
                          "loadavg_1m_after": round(os.getloadavg()[0], 2)},
              "workers": args.workers, "gateway_workers": args.gateway_workers,
              "latency": latency, "throughput": throughput,
              "targets": {"p99_ms_at_200_per_s": 10, "submissions_per_s": 1000}}
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
