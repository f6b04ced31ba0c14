"""Pure-ASGI middleware of the gateway (pure ASGI so SSE streams pass through unbuffered).

- :class:`RequestContextMiddleware` (outermost): gives every response an ``x-request-id``
  (the client's when it sent a sane one, else a new uuid4 hex), counts
  ``t2i_requests_total{route,code}`` by route *template* (``/v1/jobs/{job_id}``, never
  the raw path, so label cardinality stays bounded), logs one line per request, and
  turns any exception that escaped every handler into the one error body (500) instead
  of a bare traceback.
- :class:`BodyLimitMiddleware`: refuses bodies over the limit with 413, both by the
  declared ``Content-Length`` (before reading anything) and by the bytes actually
  streamed (chunked uploads, lying clients).
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from fastapi import HTTPException
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.metrics import REQUESTS
from services.gateway.errors import error_bytes

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
_SANE_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
# Probes and scrapes come every few seconds: their access lines are DEBUG, not INFO.
_QUIET_ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return None


def route_template(scope: Scope) -> str:
    """The matched route's path template, ``unmatched`` when no route matched."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return str(path) if path else "unmatched"


class RequestContextMiddleware:
    """Request id, request metrics, access log and last-resort 500 for every request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client_id = _header(scope, REQUEST_ID_HEADER.encode())
        request_id = client_id if client_id and _SANE_ID.fullmatch(client_id) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500
        started = False
        t0 = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = int(message["status"])
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception(
                "unhandled error on %s %s",
                scope.get("method"),
                scope.get("path"),
                extra={"request_id": request_id},
            )
            if not started:
                await send_with_id(
                    {
                        "type": "http.response.start",
                        "status": 500,
                        "headers": [(b"content-type", b"application/json")],
                    }
                )
                await send_with_id(
                    {
                        "type": "http.response.body",
                        "body": error_bytes(
                            "server_error",
                            f"internal error; see the gateway logs for request {request_id}",
                            "internal_error",
                        ),
                    }
                )
        finally:
            route = route_template(scope)
            REQUESTS.labels(route=route, code=str(status)).inc()
            log.log(
                logging.DEBUG if route in _QUIET_ROUTES and status < 500 else logging.INFO,
                "%s %s -> %d (%.1f ms)",
                scope.get("method"),
                route,
                status,
                1000 * (time.perf_counter() - t0),
                extra={"request_id": request_id},
            )


class BodyLimitMiddleware:
    """413 for request bodies over ``max_bytes`` (declared or streamed)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _message(self) -> str:
        return f"request body exceeds the limit of {self.max_bytes} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await send(
                {
                    "type": "http.response.start",
                    "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
                }
            )
            await send(
                {
                    "type": "http.response.body",
                    "body": error_bytes(
                        "invalid_request_error", self._message(), "request_too_large"
                    ),
                }
            )
            return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # An HTTPException survives FastAPI's body reader (other errors become
                    # a generic 400) and reaches the handler that writes the error body.
                    raise HTTPException(status_code=413, detail=self._message())
            return message

        await self.app(scope, limited_receive, send)
