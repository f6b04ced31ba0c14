"""Redis connection helpers shared by every service."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable
from typing import Any, TypeVar

import redis.asyncio as aioredis

T = TypeVar("T")


async def aw(value: Awaitable[T] | T) -> T:
    """Await a redis-py reply typed ``Awaitable[T] | T`` (its stubs cover sync and async
    clients at once); keeps ``mypy --strict`` precise without ignores."""
    if inspect.isawaitable(value):
        return await value
    return value


def connect(url: str, **kwargs: Any) -> aioredis.Redis:
    """An asyncio Redis client returning raw bytes (images travel through the same client).

    Connection errors surface as ``redis.exceptions.ConnectionError`` on first use; the
    client reconnects by itself afterwards.
    """
    opts: dict[str, Any] = {"decode_responses": False, "health_check_interval": 30}
    opts.update(kwargs)
    client: aioredis.Redis = aioredis.Redis.from_url(url, **opts)
    return client


def text(value: Any) -> str:
    """Decode a Redis reply value (bytes or str) to str; None becomes ''."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode()
    return str(value)


def text_dict(raw: dict[Any, Any]) -> dict[str, str]:
    """Decode a hash reply to a str -> str dict."""
    return {text(k): text(v) for k, v in raw.items()}
