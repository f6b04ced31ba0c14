"""The gateway's ASGI application: :func:`create_app` wires settings, Redis, the job
store, routes, error handlers, middleware and ``/metrics``.

The Redis client is created in the lifespan (not at import or construction), so building
the app never touches the network and one process can host several apps (tests).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from prometheus_client import make_asgi_app
from redis.exceptions import RedisError
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from common.jobs import JobStore
from common.metrics import BACKLOG
from common.redisutil import connect
from common.settings import GatewaySettings
from services.gateway.errors import install_exception_handlers
from services.gateway.middleware import BodyLimitMiddleware, RequestContextMiddleware
from services.gateway.routes import router
from services.gateway.service import JobService

log = logging.getLogger(__name__)

# A request must not hang on a Redis that accepts nothing: fail (503) instead. Pub/sub
# waits pass their own timeout, so long SSE streams are not cut by these.
REDIS_CONNECT_TIMEOUT_S = 5.0
REDIS_SOCKET_TIMEOUT_S = 10.0
# A scrape must not hang on a sick Redis: the backlog gauge keeps its last value instead.
_SCRAPE_REDIS_TIMEOUT_S = 1.0


class MetricsApp:
    """``prometheus_client``'s ASGI app, refreshing ``t2i_backlog_jobs`` on each scrape."""

    path = "/metrics"

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.inner: ASGIApp = make_asgi_app()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Starlette's plain routes do not record themselves in the scope as FastAPI's do;
        # this names the route for the request metrics (route="/metrics").
        scope.setdefault("route", self)
        store: JobStore | None = getattr(self.app.state, "store", None)
        if store is not None and scope["type"] == "http":
            try:
                BACKLOG.set(await asyncio.wait_for(store.backlog(), _SCRAPE_REDIS_TIMEOUT_S))
            except (RedisError, TimeoutError) as exc:
                log.warning("backlog gauge not refreshed: %s", exc)
        await self.inner(scope, receive, send)


def create_app(settings: GatewaySettings, *, sse_keepalive_s: float | None = None) -> FastAPI:
    """Build the gateway app. Redis is connected in the lifespan and closed after it.

    Args:
        settings: the gateway's settings (``T2I_*``).
        sse_keepalive_s: overrides ``settings.sse_keepalive_s``: seconds of silence after
            which an SSE stream sends a ``: keepalive`` comment (keeps proxies from
            closing idle streams).

    Returns:
        The FastAPI app; ``app.state`` holds ``settings``, and during the lifespan
        ``redis``, ``store`` (JobStore) and ``service`` (JobService).
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redis = connect(
            settings.redis_url,
            socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S,
            socket_timeout=REDIS_SOCKET_TIMEOUT_S,
        )
        store = JobStore(redis, job_ttl_s=settings.job_ttl_s, result_ttl_s=settings.result_ttl_s)
        app.state.redis = redis
        app.state.store = store
        app.state.service = JobService(store, settings)
        app.state.shutting_down = False
        log.info("gateway ready to serve (redis %s)", settings.redis_url)
        try:
            yield
        finally:
            app.state.shutting_down = True
            await redis.aclose()

    app = FastAPI(
        title="Argus gateway",
        summary="Quality-aware text-to-image serving: async jobs, SSE progress and an "
        "OpenAI-compatible images endpoint.",
        version="0.1.0",
        lifespan=lifespan,
        docs_url="/docs",
        openapi_url="/openapi.json",
    )
    app.state.settings = settings
    app.state.sse_keepalive_s = (
        settings.sse_keepalive_s if sse_keepalive_s is None else sse_keepalive_s
    )
    app.state.shutting_down = False
    install_exception_handlers(app)
    app.include_router(router)
    # A route, not a Mount: a Mount answers "/metrics" with a 307 to "/metrics/".
    app.router.routes.append(Route(MetricsApp.path, MetricsApp(app), include_in_schema=False))
    # Added last = outermost: the request id and metrics cover even the 413 answers.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestContextMiddleware)
    return app
