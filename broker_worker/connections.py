"""Redis connections from a URL (``redis://``, ``rediss://`` for TLS, AUTH/ACL user and password in the URL).

Connections retry transient errors briefly and check their health, so a Redis restart is survived by the next
command instead of by a process restart.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

SOCKET_TIMEOUT_S = 10.0
_RETRY_ON = [redis.ConnectionError, redis.TimeoutError]


def _options() -> dict[str, Any]:
    return {
        "decode_responses": True,
        "socket_connect_timeout": 5.0,
        "socket_keepalive": True,
        "health_check_interval": 15,
        "retry_on_error": _RETRY_ON,
    }


def async_redis(url: str, socket_timeout: float | None = SOCKET_TIMEOUT_S) -> aioredis.Redis:
    from redis.asyncio.retry import Retry as AsyncRetry

    return aioredis.Redis.from_url(
        url, socket_timeout=socket_timeout, retry=AsyncRetry(ExponentialBackoff(cap=1.0, base=0.05), 3), **_options()
    )


def sync_redis(url: str, socket_timeout: float | None = SOCKET_TIMEOUT_S) -> redis.Redis:
    return redis.Redis.from_url(
        url, socket_timeout=socket_timeout, retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 3), **_options()
    )


def redact(url: str) -> str:
    """The URL with its password replaced, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
