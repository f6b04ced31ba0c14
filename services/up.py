"""``argus up``: run the whole stack locally as processes.

Starts a private ``redis-server`` (unless ``T2I_REDIS_URL``/``--redis-url`` names one),
then the gateway, classifier, controller, the arq tasks worker and N workers; waits until
``/readyz`` answers 200, prints where the API is, and on Ctrl-C (or SIGTERM) stops every
process it started, in reverse order, before returning.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from common.settings import REPO_ROOT


def free_port() -> int:
    """A TCP port free on 127.0.0.1 a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class StackConfig:
    """What to launch."""

    workers: int = 1
    backend: str = "diffusers"
    port: int = 8000
    redis_url: str | None = None
    tiers_file: Path | None = None
    log_dir: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    worker_env: list[dict[str, str]] = field(default_factory=list)
    with_tasks: bool = True


@dataclass
class Stack:
    """Processes of a running stack; ``url`` is the gateway's base URL."""

    url: str
    redis_url: str
    procs: dict[str, subprocess.Popen[bytes]]
    log_dir: Path
    config: StackConfig
    redis_proc: subprocess.Popen[bytes] | None = None

    def stop(self, timeout: float = 15.0) -> None:
        """Stop every process (SIGTERM, then SIGKILL after ``timeout``), redis last."""
        for proc in reversed(list(self.procs.values())):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if self.redis_proc is not None and self.redis_proc.poll() is None:
            self.redis_proc.terminate()
            self.redis_proc.wait(10)

    def worker_names(self) -> list[str]:
        """Names of the worker processes (also their instance ids)."""
        return [n for n in self.procs if n.startswith("worker-")]

    def start_worker(self, name: str, extra_env: dict[str, str] | None = None) -> None:
        """Start (or restart) one worker process named ``name``."""
        self.procs[name] = _spawn(name, "services.worker", self._env(name, extra_env),
                                  self.log_dir)

    def _env(self, instance: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = base_env(self.config, self.redis_url)
        env["T2I_INSTANCE"] = instance
        env.update(extra or {})
        return env


def base_env(config: StackConfig, redis_url: str) -> dict[str, str]:
    """Environment shared by every service process of the stack."""
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "T2I_REDIS_URL": redis_url, "T2I_BACKEND": config.backend,
                "PYTHONPATH": str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")})
    if config.tiers_file:
        env["T2I_TIERS_FILE"] = str(config.tiers_file)
    if config.workers > 1 and (os.cpu_count() or 1) <= 2 * config.workers:
        env.setdefault("T2I_CPU_THREADS", "1")  # CPU workers share few cores
    env.update(config.env)
    return env


def start_redis(log_dir: Path) -> tuple[str, subprocess.Popen[bytes]]:
    """A private redis-server on a free port (AOF off, nothing persisted)."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server not found: apt-get install redis-server, "
                         "or set T2I_REDIS_URL to a running Redis")
    port = free_port()
    with open(log_dir / "redis.log", "wb") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no", "--dir", str(log_dir)],
                                stdout=log, stderr=subprocess.STDOUT)
    for _ in range(250):
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.1):
            return f"redis://127.0.0.1:{port}/0", proc
        time.sleep(0.02)
    proc.kill()
    raise SystemExit("redis-server did not start; see " + str(log_dir / "redis.log"))


def _spawn(name: str, module: str, env: dict[str, str], log_dir: Path,
           args: list[str] | None = None) -> subprocess.Popen[bytes]:
    with open(log_dir / f"{name}.log", "ab") as log:  # the child keeps its own descriptor
        return subprocess.Popen([sys.executable, "-m", module, *(args or [])], env=env,
                                stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)


def start_stack(config: StackConfig) -> Stack:
    """Start Redis (if needed) and every service; returns before readiness (see ``wait``)."""
    log_dir = config.log_dir or Path(tempfile.mkdtemp(prefix="argus-up-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    redis_proc = None
    redis_url = config.redis_url or os.environ.get("T2I_REDIS_URL")
    if not redis_url:
        redis_url, redis_proc = start_redis(log_dir)
    stack = Stack(url=f"http://127.0.0.1:{config.port}", redis_url=redis_url, procs={},
                  log_dir=log_dir, config=config, redis_proc=redis_proc)
    env = base_env(config, redis_url)
    gw_env = {**env, "T2I_PORT": str(config.port), "T2I_HOST": "127.0.0.1"}
    stack.procs["controller"] = _spawn("controller", "services.controller", env, log_dir)
    stack.procs["classifier"] = _spawn("classifier", "services.classifier", env, log_dir)
    if config.with_tasks:
        stack.procs["tasks"] = _spawn("tasks", "services.tasks", env, log_dir)
    for i in range(config.workers):
        extra = config.worker_env[i] if i < len(config.worker_env) else None
        stack.start_worker(f"worker-{i}", extra)
    stack.procs["gateway"] = _spawn("gateway", "services.gateway", gw_env, log_dir)
    return stack


def wait_ready(stack: Stack, timeout: float = 120.0) -> dict[str, Any]:
    """Poll ``/readyz`` until 200; raises RuntimeError (with the last answer and any dead
    process) on timeout."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        dead = [n for n, p in stack.procs.items() if p.poll() is not None]
        if dead:
            raise RuntimeError(f"processes exited early: {dead}; logs in {stack.log_dir}")
        try:
            resp = httpx.get(stack.url + "/readyz", timeout=2)
            last = resp.json()
            if resp.status_code == 200:
                return dict(last)
        except (httpx.HTTPError, ValueError) as exc:
            last = str(exc)
        time.sleep(0.3)
    raise RuntimeError(f"stack not ready after {timeout:.0f}s: {last}; logs in {stack.log_dir}")


@contextlib.contextmanager
def running_stack(config: StackConfig, timeout: float = 120.0) -> Iterator[Stack]:
    """Context manager: a ready stack, stopped on exit whatever happens."""
    stack = start_stack(config)
    try:
        wait_ready(stack, timeout)
        yield stack
    finally:
        stack.stop()


def cmd_up(args: argparse.Namespace) -> int:
    """``argus up``: run until Ctrl-C."""
    config = StackConfig(workers=args.workers, backend=args.backend, port=args.port,
                         redis_url=args.redis_url, tiers_file=args.tiers,
                         log_dir=args.log_dir)
    stack = start_stack(config)
    stopping = False

    def _stop(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    try:
        info = wait_ready(stack, args.ready_timeout)
        print(f"Argus is up: API {stack.url}  (docs {stack.url}/docs)")  # noqa: T201
        print(f"Redis {stack.redis_url}; logs in {stack.log_dir}; ready: {info}")  # noqa: T201
        print("Ctrl-C stops everything.")  # noqa: T201
        while not stopping:
            dead = [n for n, p in stack.procs.items() if p.poll() is not None]
            if dead:
                print(f"exited: {dead}; see {stack.log_dir}", file=sys.stderr)  # noqa: T201
                return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    except RuntimeError as exc:
        print(str(exc), file=sys.stderr)  # noqa: T201
        return 1
    finally:
        print("stopping...", file=sys.stderr)  # noqa: T201
        stack.stop()
    return 0


def register(sub: Any) -> None:
    """Add ``argus up`` to the CLI."""
    p = sub.add_parser("up", help="run the whole stack locally (Ctrl-C stops it)")
    p.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--backend", choices=["diffusers", "emulated"], default="diffusers")
    p.add_argument("--port", type=int, default=8000, help="gateway port (default 8000)")
    p.add_argument("--redis-url", default=None, help="use this Redis instead of a private one")
    p.add_argument("--tiers", type=Path, default=None, help="tier registry (profiles/tiers.yaml)")
    p.add_argument("--log-dir", type=Path, default=None, help="where service logs go")
    p.add_argument("--ready-timeout", type=float, default=180.0)
    p.set_defaults(func=cmd_up)
