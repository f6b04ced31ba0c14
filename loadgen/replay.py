"""Open-loop replay of a trace against the gateway, with per-request records.

Each arrival is POSTed to ``/v1/jobs`` at its scheduled offset; accepted jobs are then
polled on ``GET /v1/jobs/{id}`` until terminal. Guarantees:

* Schedule: due times are ``t0 + offset`` on the monotonic clock, and the scheduler
  sleeps until each one; a late arrival is sent at once, never skipped, and its lag is
  recorded. ``sent_s`` is when the request is handed to the HTTP client (as vLLM's
  ``bench serve`` measures); the pool has no connection cap, so no request waits for a
  connection, and connection set-up counts in the request's latency.
* One ``GET /healthz`` before the start (its outcome ignored) warms the connection,
  so the first arrivals do not pay the client's first-use costs.
* Open loop: arrivals never wait for earlier jobs, unless ``max_concurrency`` caps the
  jobs outstanding (sent, not yet final); then an arrival waits and its lag shows it.
* 429 answers are recorded as ``rejected`` with their ``Retry-After`` and never retried
  (a retry would change the offered load). Other failures are ``error`` records.
* Polling runs in a child process (:mod:`loadgen.poller`), so its CPU never delays a
  send; it uses at most ``max_pollers`` concurrent requests, each job polled every
  ``poll_interval_s``.
* Bounded: the run ends ``drain_timeout_s`` after the last scheduled arrival at the
  latest, whatever happens (even with ``max_concurrency`` and stuck jobs); jobs still
  open, or arrivals never sent, are recorded as ``unfinished`` (with the last status
  seen). Exactly one record per arrival, in arrival order.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from loadgen import poller
from loadgen.summary import slo_met

JOBS_PATH = "/v1/jobs"
HEALTH_PATH = "/healthz"


@dataclass
class ReplayConfig:
    """How to replay: target, request options, and the limits of the run.

    Attributes:
        url: gateway base URL.
        slo_ms: sent with each job and used to judge it (None: neither).
        size: image size ``"WxH"`` sent with each job (None: the server's default).
        max_concurrency: cap on jobs outstanding (None: open loop).
        poll_interval_s: seconds between two polls of one job.
        max_pollers: status requests in flight at once, in the polling process.
        drain_timeout_s: how long after the last scheduled arrival the run may last.
        request_timeout_s: timeout of each HTTP request.
        progress: show a tqdm bar on stderr.
    """

    url: str = "http://127.0.0.1:8000"
    slo_ms: int | None = None
    size: str | None = None
    max_concurrency: int | None = None
    poll_interval_s: float = 0.2
    max_pollers: int = 32
    drain_timeout_s: float = 120.0
    request_timeout_s: float = 30.0
    progress: bool = True


@dataclass
class RequestRecord:
    """Everything measured about one arrival (one line of ``requests.jsonl``).

    Offsets (``*_s`` without ``e2e``/``wait``) are seconds from the replay start.
    """

    index: int
    prompt: str
    seed: int
    scheduled_s: float
    slo_ms: int | None = None
    sent_s: float | None = None
    send_lag_s: float | None = None
    http_status: int | None = None
    retry_after_s: float | None = None
    job_id: str | None = None
    status: str = "pending"
    last_status: str | None = None
    tier: int | None = None
    timings: dict[str, float | None] = field(default_factory=dict)
    accepted_s: float | None = None
    completed_s: float | None = None
    e2e_s: float | None = None
    client_e2e_s: float | None = None
    queue_wait_s: float | None = None
    slo_met: bool | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The record as a JSON-serialisable dict."""
        return asdict(self)


def _retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _child_env() -> dict[str, str]:
    """Our environment, with this package importable whatever the working directory."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def _span(timings: dict[str, Any], start: str, end: str) -> float | None:
    a, b = timings.get(start), timings.get(end)
    return float(b) - float(a) if a is not None and b is not None else None


class Replayer:
    """One replay run; build it, then ``await run()`` once."""

    def __init__(self, arrivals: list[float], prompts: list[str], seeds: list[int],
                 config: ReplayConfig) -> None:
        if not len(arrivals) == len(prompts) == len(seeds):
            raise ValueError("arrivals, prompts and seeds must have the same length")
        self.config = config
        self.records = [RequestRecord(i, p, s, float(t), config.slo_ms)
                        for i, (t, p, s) in enumerate(zip(arrivals, prompts, seeds, strict=True))]
        self._outstanding = 0
        self._idle = asyncio.Event()
        self._child_done = asyncio.Event()
        self._slots = asyncio.Semaphore(config.max_concurrency or 1)
        self._t0 = 0.0
        self._bar: tqdm[Any] | None = None
        self._child: asyncio.subprocess.Process | None = None

    def _final(self, rec: RequestRecord, status: str) -> None:
        """Record a final outcome (exactly once per record) and free its slot."""
        rec.status = status
        rec.slo_met = slo_met(rec.to_json(), rec.slo_ms)
        self._outstanding -= 1
        if self.config.max_concurrency:
            self._slots.release()
        if self._bar is not None:
            self._bar.update(1)
        if self._outstanding == 0:
            self._idle.set()

    async def _send(self, client: httpx.AsyncClient, rec: RequestRecord) -> None:
        body: dict[str, Any] = {"prompt": rec.prompt, "seed": rec.seed}
        if rec.slo_ms is not None:
            body["slo_ms"] = rec.slo_ms
        if self.config.size:
            body["size"] = self.config.size
        rec.sent_s = time.monotonic() - self._t0
        rec.send_lag_s = rec.sent_s - rec.scheduled_s
        try:
            resp = await client.post(JOBS_PATH, json=body)
            answer = resp.json() if resp.status_code == 202 else None
        except (httpx.HTTPError, ValueError) as exc:
            rec.error = f"{type(exc).__name__}: {exc}"
            self._final(rec, "error")
            return
        rec.http_status = resp.status_code
        if resp.status_code == 429:
            rec.retry_after_s = _retry_after(resp.headers.get("retry-after"))
            self._final(rec, "rejected")
            return
        if not isinstance(answer, dict) or "id" not in answer:
            rec.error = f"HTTP {resp.status_code}: {resp.text[:300]}"
            self._final(rec, "error")
            return
        rec.job_id = str(answer["id"])
        rec.accepted_s = time.monotonic() - self._t0
        rec.last_status = str(answer.get("status", "queued"))
        assert self._child is not None and self._child.stdin is not None
        due = time.monotonic() + self.config.poll_interval_s
        self._child.stdin.write(json.dumps([rec.index, rec.job_id, due]).encode() + b"\n")

    def _observe(self, rec: RequestRecord, body: dict[str, Any] | None, at: float,
                 final: bool) -> None:
        """Apply a status body from the poller (``final``: the job is done)."""
        if body:
            rec.last_status = str(body.get("status"))
            if body.get("tier") is not None:
                rec.tier = int(body["tier"])
            timings = body.get("timings") or {}
            rec.timings = {k: timings.get(k)
                           for k in ("enqueued", "classified", "started", "finished")}
            rec.queue_wait_s = _span(timings, "enqueued", "started")
            rec.error = body.get("error") or rec.error
        if not final or body is None:
            return
        rec.completed_s = at - self._t0
        rec.e2e_s = _span(rec.timings, "enqueued", "finished")
        if rec.sent_s is not None:
            rec.client_e2e_s = rec.completed_s - rec.sent_s
        self._final(rec, str(body.get("status")))

    async def _read_results(self, stdout: asyncio.StreamReader) -> None:
        done = False
        while not done and (line := await stdout.readline()):
            try:
                msg = json.loads(line)
            except ValueError:  # not the protocol (stray output): ignore the line
                continue
            done = msg[0] == "done"
            if msg[0] in ("final", "last"):
                _, index, body, at = msg
                self._observe(self.records[index], body, at, msg[0] == "final")
        if not done:  # the poller died: its open jobs can no longer be followed
            for rec in self.records:
                if rec.status == "pending" and rec.job_id is not None:
                    rec.error = "the poller process exited early"
        self._child_done.set()
        self._idle.set()  # nothing more can complete

    async def _schedule(self, client: httpx.AsyncClient) -> None:
        """Send every arrival at its due time, then wait for the jobs to finish."""
        sends: set[asyncio.Task[None]] = set()
        try:
            for rec in self.records:
                delay = self._t0 + rec.scheduled_s - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                if self.config.max_concurrency:
                    await self._slots.acquire()
                task = asyncio.create_task(self._send(client, rec))
                sends.add(task)
                task.add_done_callback(sends.discard)
            if sends:
                await asyncio.gather(*sends)
            await self._idle.wait()
        finally:  # on the deadline: requests still being sent are abandoned
            for task in list(sends):
                task.cancel()
            await asyncio.gather(*sends, return_exceptions=True)

    async def _start_poller(self) -> asyncio.Task[None]:
        cfg = self.config
        self._child = await asyncio.create_subprocess_exec(
            *poller.command(cfg.url, cfg.poll_interval_s, max(1, cfg.max_pollers),
                            cfg.request_timeout_s),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=_child_env())
        assert self._child.stdout is not None
        try:
            ready = await asyncio.wait_for(self._child.stdout.readline(), 60)
        except TimeoutError:
            ready = b""
        if json.loads(ready or b"null") != ["ready"]:
            self._child.kill()
            await self._child.wait()
            raise RuntimeError("the loadgen poller process did not start")
        return asyncio.create_task(self._read_results(self._child.stdout))

    async def _stop_poller(self, reader: asyncio.Task[None]) -> None:
        child = self._child
        assert child is not None and child.stdin is not None
        with contextlib.suppress(OSError):
            child.stdin.close()  # end of input: the child reports open jobs and exits
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._child_done.wait(), 10)
        try:
            await asyncio.wait_for(child.wait(), 5)
        except TimeoutError:
            child.kill()
            await child.wait()
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)

    async def run(self) -> list[RequestRecord]:
        """Replay every arrival, wait for the jobs (bounded), return the records."""
        cfg = self.config
        poller.fast_fail_missing_sniffio()
        self._outstanding = len(self.records)
        if not self.records:
            return []
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=32)
        self._bar = tqdm(total=len(self.records), unit="req", file=sys.stderr,
                         disable=not cfg.progress, mininterval=0.5, desc="replay")
        reader = await self._start_poller()
        # Objects created before the run (records, client) need no more collection; freezing
        # them keeps full GC passes, which stall the event loop, short during the replay.
        gc.collect()
        gc.freeze()
        try:
            async with httpx.AsyncClient(base_url=cfg.url, limits=limits,
                                         timeout=cfg.request_timeout_s) as client:
                # Warm-up: open a connection and run httpx's first-use code before t0, so
                # the first arrival is not late for reasons of our own.
                with contextlib.suppress(httpx.HTTPError):
                    await client.get(HEALTH_PATH)
                self._t0 = time.monotonic() + 0.05
                # One deadline bounds everything, sends included: with --max-concurrency
                # and stuck jobs, the schedule itself may never get to its last arrival.
                limit = self.records[-1].scheduled_s + cfg.drain_timeout_s + 0.05
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._schedule(client), limit)
        finally:
            gc.unfreeze()
            await self._stop_poller(reader)
            self._bar.close()
        return self.finish()

    def finish(self) -> list[RequestRecord]:
        """Close the books: every record not final becomes ``unfinished``; the records.

        Safe to call after an interrupted :meth:`run` (Ctrl-C) to keep partial results.
        """
        for rec in self.records:
            if rec.status == "pending":
                rec.status = "unfinished"
                rec.slo_met = slo_met(rec.to_json(), rec.slo_ms)
        return self.records
