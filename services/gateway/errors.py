"""The gateway's one error body and every exception handler.

Every error answer, whatever raised it, has the body
``{"error": {"type": ..., "message": ..., "code": ...}}`` (OpenAI style): ``type`` is a
broad category, ``code`` a stable machine-readable reason and ``message`` says what to
fix. Domain errors are :class:`ApiError` subclasses raised by the service layer; library
errors (validation, Redis, tier registry, Starlette's own 404/405/413) are mapped here,
in one place. No handler ever lets a traceback reach a client.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from common.jobs import IdempotencyConflict
from common.tiers import RegistryError

log = logging.getLogger(__name__)


class ErrorDetail(BaseModel):
    """The inside of the error body."""

    type: str
    message: str
    code: str


class ErrorBody(BaseModel):
    """The one error body of every non-2xx answer (except ``/readyz``'s report)."""

    error: ErrorDetail


class ApiError(Exception):
    """A domain error with its HTTP status, error type and code."""

    status_code = 500
    type = "server_error"
    code = "internal_error"

    def __init__(
        self, message: str, *, code: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.headers = headers or {}


class InvalidRequest(ApiError):
    """The request is well-formed JSON but not acceptable (422)."""

    status_code = 422
    type = "invalid_request_error"
    code = "invalid_request"


class NotFound(ApiError):
    """Unknown job, or a result that does not exist (yet) (404)."""

    status_code = 404
    type = "not_found_error"
    code = "job_not_found"


class Conflict(ApiError):
    """The request conflicts with the job's state (409)."""

    status_code = 409
    type = "conflict_error"
    code = "conflict"


class Gone(ApiError):
    """The result existed and has expired (410)."""

    status_code = 410
    type = "gone_error"
    code = "result_expired"


class Overloaded(ApiError):
    """Too many unfinished jobs; retry after ``Retry-After`` seconds (429)."""

    status_code = 429
    type = "rate_limit_error"
    code = "backlog_full"


class GenerationFailed(ApiError):
    """A synchronous generation ended in failure upstream (502)."""

    status_code = 502
    type = "generation_error"
    code = "generation_failed"


class Unavailable(ApiError):
    """A dependency (Redis, the tier registry) is unavailable (503)."""

    status_code = 503
    type = "service_unavailable"
    code = "unavailable"


class SyncTimeout(ApiError):
    """A synchronous generation did not finish in time; the job goes on (504)."""

    status_code = 504
    type = "timeout_error"
    code = "sync_timeout"


def error_response(
    status_code: int, type_: str, message: str, code: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """A JSON response carrying the one error body."""
    body = ErrorBody(error=ErrorDetail(type=type_, message=message, code=code))
    return JSONResponse(body.model_dump(), status_code=status_code, headers=headers)


def error_bytes(type_: str, message: str, code: str) -> bytes:
    """The error body, encoded, for raw ASGI middleware that answers by itself."""
    body = ErrorBody(error=ErrorDetail(type=type_, message=message, code=code))
    return body.model_dump_json().encode()


def validation_message(errors: Any) -> tuple[str, str]:
    """``(message, code)`` for pydantic/FastAPI validation errors, locations kept.

    Example message: ``body.n: Input should be less than or equal to 4``.
    """
    parts: list[str] = []
    code = "validation_error"
    for err in errors:
        if err.get("type") == "json_invalid":
            detail = (err.get("ctx") or {}).get("error", "")
            loc = err.get("loc", ())
            pos = f" at position {loc[-1]}" if len(loc) > 1 else ""
            return f"request body is not valid JSON: {detail}{pos}".rstrip(), "invalid_json"
        loc = ".".join(str(p) for p in err.get("loc", ()))
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts) or "invalid request", code


_HTTP_CODES = {
    400: ("invalid_request_error", "bad_request"),
    404: ("not_found_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
}


async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.status_code, exc.type, exc.message, exc.code, exc.headers)


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    message, code = validation_message(exc.errors())
    return error_response(422, "invalid_request_error", message, code)


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    default = (
        ("invalid_request_error", f"http_{status}")
        if status < 500
        else ("server_error", f"http_{status}")
    )
    type_, code = _HTTP_CODES.get(status, default)
    headers = dict(exc.headers) if exc.headers else None
    return error_response(status, type_, str(exc.detail), code, headers)


async def _redis_error(_: Request, exc: Exception) -> JSONResponse:
    log.warning("Redis unavailable: %s", exc)
    return error_response(
        503, "service_unavailable", f"Redis unavailable: {exc}", "redis_unavailable"
    )


async def _idempotency_conflict(_: Request, exc: Exception) -> JSONResponse:
    return error_response(
        422,
        "invalid_request_error",
        f"Idempotency-Key {exc} was already used with a different request body",
        "idempotency_conflict",
    )


async def _registry_error(_: Request, exc: Exception) -> JSONResponse:
    log.error("tier registry error: %s", exc)
    return error_response(503, "service_unavailable", str(exc), "tier_registry_invalid")


def install_exception_handlers(app: FastAPI) -> None:
    """Map every known exception to the one error body. Anything else is answered 500
    with the same body by :class:`services.gateway.middleware.RequestContextMiddleware`."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RedisConnectionError, _redis_error)
    app.add_exception_handler(RedisTimeoutError, _redis_error)
    app.add_exception_handler(IdempotencyConflict, _idempotency_conflict)
    app.add_exception_handler(RegistryError, _registry_error)
