"""Process-level entry points of the worker: ``run`` (serve) and ``check`` (health)."""

from __future__ import annotations

import asyncio
import logging

from common.heartbeat import any_live
from common.metrics import start_metrics_server
from common.redisutil import connect
from common.service_main import stop_on_signals
from common.settings import WorkerSettings
from common.tiers import load_registry
from services.worker.backends import make_backend
from services.worker.worker import Worker

log = logging.getLogger(__name__)


async def run(settings: WorkerSettings, stop: asyncio.Event | None = None) -> None:
    """Serve as one worker until ``stop`` is set (or SIGTERM/SIGINT when ``stop`` is None).

    Raises:
        common.tiers.RegistryError: The tier registry is invalid.
        services.worker.backends.BackendError: The backend rejects the configuration.
    """
    registry = load_registry(settings.tiers_file)
    if settings.cpu_threads and settings.backend == "diffusers":
        import torch  # only the diffusers backend pays for the import

        # Several CPU workers on few cores: one intra-op thread each avoids OpenMP threads
        # spinning against each other (measured 2-6x slower per step on 2 shared cores).
        torch.set_num_threads(settings.cpu_threads)
    backend = make_backend(settings, registry)
    if stop is None:
        stop = stop_on_signals()
    start_metrics_server(settings.metrics_port)
    redis = connect(settings.redis_url)
    log.info("worker %s starting (backend %s, device %s)", settings.instance,
             settings.backend, settings.device)
    try:
        await Worker(settings, redis, registry, backend).run(stop)
    finally:
        await redis.aclose()


async def check(settings: WorkerSettings) -> bool:
    """True when at least one worker heartbeat is live (:func:`common.heartbeat.any_live`)."""
    return await any_live(settings.redis_url, "worker")
