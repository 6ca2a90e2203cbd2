"""Redis connections from a URL: ``redis://``, ``rediss://`` (TLS), AUTH/ACL ``user:password@`` in the URL, and
``redis+sentinel://[user:password@]host:26379,host2:26379/<service>/<db>`` for a Sentinel-managed primary
(every new connection asks the sentinels where the primary is, so a failover is followed).

Connections retry transient errors briefly and check their health, so a Redis restart is survived by the next
command instead of by a process restart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

SOCKET_TIMEOUT_S = 10.0
_RETRY_ON = [redis.ConnectionError, redis.TimeoutError]


def _options(socket_timeout: float | None, retry: Any) -> dict[str, Any]:
    return {
        "decode_responses": True,
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": 5.0,
        "socket_keepalive": True,
        "health_check_interval": 15,
        "retry": retry,
        "retry_on_error": _RETRY_ON,
    }


SENTINEL_SCHEME = "redis+sentinel"


@dataclass(frozen=True)
class SentinelTarget:
    sentinels: list[tuple[str, int]]
    service: str
    db: int
    username: str | None
    password: str | None

    def auth(self) -> dict[str, Any]:
        """Database and credentials of the primary (the sentinels themselves are asked without them)."""
        return {"db": self.db, "username": self.username, "password": self.password}


def parse_sentinel_url(url: str) -> SentinelTarget:
    parts = urlsplit(url)
    credentials, _, hosts = parts.netloc.rpartition("@")
    username, _, password = credentials.partition(":") if credentials else ("", "", "")
    sentinels = []
    for host in hosts.split(","):
        name, _, port = host.rpartition(":") if ":" in host else (host, "", "26379")
        sentinels.append((name, int(port)))
    path = [p for p in parts.path.split("/") if p]
    if not path:
        raise ValueError(f"{redact(url)}: a Sentinel URL names the service: redis+sentinel://host:26379/mymaster/0")
    return SentinelTarget(
        sentinels, path[0], int(path[1]) if len(path) > 1 else 0, unquote(username) or None, unquote(password) or None
    )


def async_redis(
    url: str, socket_timeout: float | None = SOCKET_TIMEOUT_S, encoding_errors: str = "strict"
) -> aioredis.Redis:
    """``encoding_errors="surrogateescape"`` reads any bytes (workers: one bad entry must not stop the loop)."""
    from redis.asyncio.retry import Retry as AsyncRetry

    options = _options(socket_timeout, AsyncRetry(ExponentialBackoff(cap=1.0, base=0.05), 3))
    options["encoding_errors"] = encoding_errors
    if not url.startswith(SENTINEL_SCHEME):
        return aioredis.Redis.from_url(url, **options)
    from redis.asyncio.sentinel import Sentinel as AsyncSentinel

    target = parse_sentinel_url(url)
    sentinel = AsyncSentinel(target.sentinels, socket_timeout=socket_timeout)  # type: ignore[no-untyped-call]
    primary: aioredis.Redis = sentinel.master_for(target.service, **target.auth(), **options)
    return primary


def sync_redis(url: str, socket_timeout: float | None = SOCKET_TIMEOUT_S) -> redis.Redis:
    options = _options(socket_timeout, Retry(ExponentialBackoff(cap=1.0, base=0.05), 3))
    if not url.startswith(SENTINEL_SCHEME):
        return redis.Redis.from_url(url, **options)
    from redis.sentinel import Sentinel

    target = parse_sentinel_url(url)
    sentinel = Sentinel(target.sentinels, socket_timeout=socket_timeout)  # type: ignore[no-untyped-call]
    primary: redis.Redis = sentinel.master_for(target.service, **target.auth(), **options)  # type: ignore[no-untyped-call]
    return primary


def redact(url: str) -> str:
    """The URL with its password replaced, for logs."""
    parts = urlsplit(url)
    credentials, at, hosts = parts.netloc.rpartition("@")
    if not at or ":" not in credentials:
        return url
    netloc = f"{credentials.split(':', 1)[0]}:***@{hosts}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
