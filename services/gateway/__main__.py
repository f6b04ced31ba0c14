"""``python -m services.gateway``: serve the gateway on ``T2I_HOST``:``T2I_PORT``.

With ``T2I_GATEWAY_WORKERS`` > 1, uvicorn runs that many processes on the same port,
each building its app from the environment (:func:`app_from_env`). Each process then has
its own Prometheus registry: a scrape of ``/metrics`` sees one process's counters.
"""

from __future__ import annotations

import asyncio
import contextlib

import uvicorn
from fastapi import FastAPI

from common.logging import configure_logging
from common.settings import GatewaySettings
from services.gateway.app import create_app

# Seconds open SSE streams get to finish once shutdown starts.
GRACEFUL_SHUTDOWN_S = 10


def _configured_settings() -> GatewaySettings:
    settings = GatewaySettings()
    configure_logging(settings.service_name, settings.log_level, settings.log_json)
    return settings


def app_from_env() -> FastAPI:
    """App factory for multi-process serving: settings and logging from the environment."""
    return create_app(_configured_settings())


async def run(settings: GatewaySettings) -> None:
    """Serve in this process until SIGINT/SIGTERM (uvicorn handles signals and lifespan)."""
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,  # keep the structured logging configured in main()
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        proxy_headers=True,
    )
    await uvicorn.Server(config).serve()


def main() -> None:
    """Build the settings from the environment, configure logging and serve."""
    settings = _configured_settings()
    if settings.gateway_workers > 1:
        uvicorn.run(
            "services.gateway.__main__:app_from_env",
            factory=True,
            workers=settings.gateway_workers,
            host=settings.host,
            port=settings.port,
            log_config=None,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
            proxy_headers=True,
        )
        return
    # uvicorn re-raises the captured SIGINT after its graceful shutdown: a clean exit.
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run(settings))


if __name__ == "__main__":
    main()
