"""Redis connection helpers shared by every service."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis


def connect(url: str, **kwargs: Any) -> aioredis.Redis:
    """An asyncio Redis client returning raw bytes (images travel through the same client).

    Connection errors surface as ``redis.exceptions.ConnectionError`` on first use; the
    client reconnects by itself afterwards.
    """
    opts: dict[str, Any] = {"decode_responses": False, "health_check_interval": 30}
    opts.update(kwargs)
    return aioredis.Redis.from_url(url, **opts)


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
