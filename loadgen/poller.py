"""Status polling in a separate process, so polls never delay the replay's sends.

Polling costs as much CPU per request as sending (httpx: ~1.5 ms per request on a busy
2-core machine), and in one event loop it delayed scheduled sends by tens of milliseconds
at 200 req/s. The parent keeps the schedule and the POSTs; this child process polls
``GET /v1/jobs/{id}`` with at most ``max_pollers`` requests in flight, at a lower CPU
priority (nice +10), so that on a busy machine the sends (and the server under test) get
the CPU first; the cost is that completions may be *seen* later, which only affects the
client-side latency (the server-side timings are exact).

The child is ``python -m loadgen.poller`` (a plain subprocess, so it works from any
caller, unlike multiprocessing's spawn, which re-imports the caller's main script).
Protocol, JSON lines over the child's stdin and stdout:

* parent -> child: ``[index, job_id, due]`` (poll from ``due``, a ``time.monotonic``
  value: CLOCK_MONOTONIC is system-wide, so both processes share it); end of input
  (the parent closes stdin) asks the child to stop.
* child -> parent: ``["ready"]`` once its client is up; ``["final", index, body, t]`` when
  a job is seen terminal (``body`` is the status JSON, or ``{"status": "error", "error"}``
  for a job the server does not know); after a stop, ``["last", index, body, t]`` for
  every job still open (the last status seen, body None if never polled), then
  ``["done"]``.

Guarantees: each submitted job gets exactly one ``final`` or one ``last`` message; a job
is polled no more often than every ``poll_interval_s``; transport errors and 5xx answers
are retried at the next interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import sys
import time
from typing import Any

import httpx

TERMINAL = frozenset({"succeeded", "failed", "cancelled", "expired"})
JOBS_PATH = "/v1/jobs"
POLLER_NICENESS = 10


class _Child:
    def __init__(self, url: str, poll_interval_s: float, max_pollers: int,
                 timeout_s: float) -> None:
        self.url, self.interval, self.max_pollers = url, poll_interval_s, max_pollers
        self.timeout_s = timeout_s
        self.queue: asyncio.Queue[tuple[float, int, str]] = asyncio.Queue()
        self.open: dict[int, dict[str, Any] | None] = {}

    def _send(self, *msg: Any) -> None:
        # Blocking write of one short line: the parent reads continuously.
        sys.stdout.buffer.write(json.dumps(msg).encode() + b"\n")
        sys.stdout.buffer.flush()

    async def _intake(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            index, job_id, due = json.loads(line)
            self.open[index] = None
            # FIFO with due = submission time + interval, so the head is the earliest.
            self.queue.put_nowait((due, index, job_id))

    async def _worker(self, client: httpx.AsyncClient) -> None:
        while True:
            due, index, job_id = await self.queue.get()
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                resp = await client.get(f"{JOBS_PATH}/{job_id}")
                code = resp.status_code
                body = resp.json() if code == 200 else None
            except (httpx.HTTPError, ValueError):
                code, body = 0, None
            if code == 404:
                body = {"status": "error", "error": "poll: job not found (404)"}
            if isinstance(body, dict):
                self.open[index] = body
                if body.get("status") in TERMINAL or body.get("status") == "error":
                    del self.open[index]
                    self._send("final", index, body, time.monotonic())
                    continue
            self.queue.put_nowait((time.monotonic() + self.interval, index, job_id))

    async def run(self) -> None:
        limits = httpx.Limits(max_connections=self.max_pollers,
                              max_keepalive_connections=self.max_pollers)
        async with httpx.AsyncClient(base_url=self.url, limits=limits,
                                     timeout=self.timeout_s) as client:
            workers = [asyncio.create_task(self._worker(client))
                       for _ in range(self.max_pollers)]
            self._send("ready")
            await self._intake()
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        now = time.monotonic()
        for index, body in self.open.items():
            self._send("last", index, body, now)
        self._send("done")


def fast_fail_missing_sniffio() -> None:
    """Make ``import sniffio`` fail at once when sniffio is not installed.

    httpcore imports sniffio on every request and falls back to asyncio when it is absent;
    a failed import is not cached, so each request rescanned ``sys.path`` (4 times, ~1 ms
    of CPU on a busy 2-core machine, which showed as send lag). A ``None`` entry in
    ``sys.modules`` makes the import fail immediately with the same ImportError. No-op
    when sniffio is installed.
    """
    if "sniffio" not in sys.modules and importlib.util.find_spec("sniffio") is None:
        sys.modules["sniffio"] = None  # type: ignore[assignment]


def command(url: str, poll_interval_s: float, max_pollers: int,
            timeout_s: float) -> list[str]:
    """The command line that starts a polling process."""
    return [sys.executable, "-m", "loadgen.poller", url, str(poll_interval_s),
            str(max_pollers), str(timeout_s)]


def main(argv: list[str] | None = None) -> None:
    """Entry point of the polling process: ``URL INTERVAL_S MAX_POLLERS TIMEOUT_S``."""
    url, interval, pollers, timeout = argv if argv is not None else sys.argv[1:]
    fast_fail_missing_sniffio()
    # Polls are less urgent than sends: when CPUs are short, the sender (and the server
    # under test) go first. Lowering one's own priority needs no privilege.
    with contextlib.suppress(OSError, AttributeError):
        os.nice(POLLER_NICENESS)
    asyncio.run(_Child(url, float(interval), int(pollers), float(timeout)).run())


if __name__ == "__main__":
    main()
