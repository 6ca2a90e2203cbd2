"""Redis connections from a URL: ``redis://``, ``rediss://`` (TLS), AUTH/ACL ``user:password@`` in the URL, and
``redis+sentinel://[user:password@]host:26379,host2:26379/<service>/<db>`` for a Sentinel-managed primary
(every new connection asks the sentinels where the primary is, so a failover is followed), and
``redis+cluster://[user:password@]host:port[,host:port…][/?options]`` (``rediss+cluster://`` for TLS) for a Redis
Cluster: redis-py's cluster clients, which follow ``MOVED``/``ASK``, slot migrations and a replica's promotion.
A plain URL that reaches a cluster node is refused at start-up (``plain_url_problem``): commands on keys of other
nodes' slots would fail one by one.

Connections retry transient errors briefly and check their health, so a Redis restart is survived by the next
command instead of by a process restart.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from importlib import metadata
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.backoff import ExponentialBackoff
from redis.driver_info import DriverInfo
from redis.retry import Retry

from broker_worker.protocol.redaction import redact

SOCKET_TIMEOUT_S = 10.0
#: Connections per asyncio client, and how long a command waits for a free one before a ConnectionError: a burst
#: of requests queues for connections instead of failing.
POOL_SIZE = 64
POOL_TIMEOUT_S = 20.0
_RETRY_ON = [redis.ConnectionError, redis.TimeoutError]


#: redis-py looks its own version up in the installed packages' metadata for every new connection (a scan of
#: sys.path: a few percent of a gateway's CPU while its pool grows under load); one lookup serves them all.
_DRIVER = DriverInfo(name="redis-py", lib_version=metadata.version("redis"))


def _options(socket_timeout: float | None, retry: Any) -> dict[str, Any]:
    return {
        "driver_info": _DRIVER,
        "decode_responses": True,
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": 5.0,
        "socket_keepalive": True,
        "health_check_interval": 15,
        "retry": retry,
        "retry_on_error": _RETRY_ON,
    }


SENTINEL_SCHEME = "redis+sentinel"
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
#: Clients the connection functions return: one Redis (or a Sentinel-managed primary) or a Redis Cluster.
AsyncRedis = aioredis.Redis | aioredis.RedisCluster
SyncRedis = redis.Redis | redis.RedisCluster


def is_cluster_url(url: str) -> bool:
    return url.partition("://")[0].lower() in CLUSTER_SCHEMES


def is_cluster(client: object) -> bool:
    """Whether a client (sync or asyncio) talks to a Redis Cluster."""
    return isinstance(client, aioredis.RedisCluster | redis.RedisCluster)


@dataclass(frozen=True)
class ClusterTarget:
    """A cluster URL as redis-py takes it: a plain URL of the first node (credentials, TLS, query options) and
    the other startup nodes."""

    first_node_url: str
    others: list[tuple[str, int]]


def parse_cluster_url(url: str) -> ClusterTarget:
    scheme, _, rest = url.partition("://")
    query_at = min((i for i in (rest.find("?"), rest.find("/")) if i >= 0), default=len(rest))
    netloc, tail = rest[:query_at], rest[query_at:]
    credentials, at, hosts = netloc.rpartition("@")
    nodes = []
    for host in hosts.split(","):
        name, _, port = host.rpartition(":") if ":" in host else (host, "", "6379")
        if not name or not port.isdigit():
            raise ValueError(f"{redact(url)}: a cluster URL lists host:port nodes: redis+cluster://h1:6379,h2:6379")
        nodes.append((name, int(port)))
    query = tail.partition("?")[2]  # the path (a database number) means nothing on a cluster: only db 0 exists
    plain = "rediss" if scheme.lower().startswith("rediss") else "redis"
    first = f"{plain}://{credentials}{at}{nodes[0][0]}:{nodes[0][1]}" + (f"/?{query}" if query else "")
    return ClusterTarget(first, nodes[1:])


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
    url: str,
    socket_timeout: float | None = SOCKET_TIMEOUT_S,
    *,
    max_connections: int = POOL_SIZE,
    pool_timeout_s: float = POOL_TIMEOUT_S,
    encoding_errors: str = "strict",
) -> aioredis.Redis:
    """An asyncio client whose pool holds at most ``max_connections``; a command that finds them all busy waits
    up to ``pool_timeout_s`` for one (redis-py's default pool raises "Too many connections" at once instead).
    ``encoding_errors="surrogateescape"`` reads any bytes (workers: one bad entry must not stop the loop)."""
    from redis.asyncio.retry import Retry as AsyncRetry

    options = _options(socket_timeout, AsyncRetry(ExponentialBackoff(cap=1.0, base=0.05), 3))
    options |= {"max_connections": max_connections, "timeout": pool_timeout_s, "encoding_errors": encoding_errors}
    if is_cluster_url(url):
        # The cluster client's bound is per node and it has no pool wait: max_connections is kept, the wait not.
        del options["timeout"]
        cluster_target = parse_cluster_url(url)
        nodes = [aioredis.cluster.ClusterNode(host, port) for host, port in cluster_target.others]
        cluster = _WaitingCluster.from_url(cluster_target.first_node_url, startup_nodes=nodes, **options)
        assert isinstance(cluster, _WaitingCluster)
        cluster.slots = asyncio.Semaphore(max_connections)
        _closed_transport_is_a_connection_error(cluster)
        return cluster  # type: ignore[return-value]  # every caller uses the commands both clients share
    if not url.startswith(SENTINEL_SCHEME):
        return aioredis.Redis.from_pool(aioredis.BlockingConnectionPool.from_url(url, **options))
    from redis.asyncio.sentinel import Sentinel as AsyncSentinel

    target = parse_sentinel_url(url)
    sentinel = AsyncSentinel(target.sentinels, socket_timeout=socket_timeout)  # type: ignore[no-untyped-call]
    primary: aioredis.Redis = sentinel.master_for(
        target.service, connection_pool_class=_BlockingSentinelPool, **target.auth(), **options
    )
    return primary


class _WaitingCluster(aioredis.RedisCluster):
    """The asyncio cluster client raises MaxConnectionsError at once when a node's ``max_connections`` are busy
    (e.g. a gateway renewing a thousand readers at once). Here a command waits for one of ``max_connections``
    slots for the whole client instead, as the blocking pool of a single Redis does; no node can then exceed its
    own bound."""

    slots: asyncio.Semaphore

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        async with self.slots:
            return await super().execute_command(*args, **kwargs)


class _ClosedTransportMixin:
    """Under uvloop, a write on a socket its (killed) node closed raises RuntimeError, which the cluster client
    does not treat as a connection failure: no topology refresh, and callers see an unexpected error. And when
    the cluster client resets its nodes after a failure (a failover), it disconnects connections other tasks
    are writing on: their write finds no writer (AttributeError on None). Here both are a ConnectionError, so
    the client re-reads the slot map and retries on the promoted replica; a worker's job does not fail on it."""

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        try:
            await super().send_packed_command(command, check_health)  # type: ignore[misc]
        except RuntimeError as exc:
            await self.disconnect(nowait=True)  # type: ignore[attr-defined]
            raise redis.ConnectionError(f"connection closed under a write: {exc}") from exc
        except AttributeError as exc:
            if getattr(self, "_writer", None) is not None:
                raise  # not a closed connection: a bug, shown as it is
            raise redis.ConnectionError(f"connection closed under a write: {exc}") from exc


class _ClusterConnection(_ClosedTransportMixin, aioredis.Connection):
    pass


class _ClusterSSLConnection(_ClosedTransportMixin, aioredis.SSLConnection):
    pass


def _closed_transport_is_a_connection_error(cluster: aioredis.RedisCluster) -> None:
    manager = cluster.nodes_manager
    tls = manager.connection_kwargs.get("connection_class") is aioredis.SSLConnection
    kind = _ClusterSSLConnection if tls else _ClusterConnection
    manager.connection_kwargs["connection_class"] = kind  # nodes found later
    for node in manager.startup_nodes.values():
        node.connection_class = kind


class _BlockingSentinelPool(aioredis.BlockingConnectionPool, SentinelConnectionPool):
    """A Sentinel-managed pool that waits for a free connection like ``BlockingConnectionPool``.

    ``Sentinel.master_for`` passes (service, sentinel) positionally, which ``BlockingConnectionPool.__init__``
    does not take: initialise the Sentinel side, then the blocking side's own state."""

    def __init__(self, service_name: str, sentinel_manager: Any, *, timeout: float | None = 20, **kwargs: Any) -> None:
        SentinelConnectionPool.__init__(self, service_name, sentinel_manager, **kwargs)  # type: ignore[no-untyped-call]
        self._condition = asyncio.Condition()
        self.timeout = timeout
        self._in_maintenance = False


def sync_redis(url: str, socket_timeout: float | None = SOCKET_TIMEOUT_S) -> redis.Redis:
    options = _options(socket_timeout, Retry(ExponentialBackoff(cap=1.0, base=0.05), 3))
    if is_cluster_url(url):
        from redis.cluster import ClusterNode

        cluster_target = parse_cluster_url(url)
        startup = [ClusterNode(h, p) for h, p in cluster_target.others]  # type: ignore[no-untyped-call]
        cluster: redis.RedisCluster = redis.RedisCluster.from_url(
            cluster_target.first_node_url, startup_nodes=startup, **options
        )
        return cluster  # type: ignore[return-value]  # every caller uses the commands both clients share
    if not url.startswith(SENTINEL_SCHEME):
        return redis.Redis.from_url(url, **options)
    from redis.sentinel import Sentinel

    target = parse_sentinel_url(url)
    sentinel = Sentinel(target.sentinels, socket_timeout=socket_timeout)  # type: ignore[no-untyped-call]
    primary: redis.Redis = sentinel.master_for(target.service, **target.auth(), **options)  # type: ignore[no-untyped-call]
    return primary


def plain_url_problem(url: str) -> str | None:
    """One line saying why ``url`` must not be used, when it is a plain URL that reaches a Redis Cluster node
    (``INFO cluster`` says ``cluster_enabled:1``); else None. A Redis that cannot be reached now is not a problem
    here: the usual reconnecting reports that."""
    if is_cluster_url(url) or url.startswith(SENTINEL_SCHEME):
        return None
    client = sync_redis(url, socket_timeout=5.0)
    try:
        info = client.info("cluster")
    except (redis.RedisError, OSError):
        return None
    finally:
        client.close()
    if str(info.get("cluster_enabled", "0")) != "1":
        return None
    return (
        f"{redact(url)} reaches a Redis Cluster node: use redis+cluster://host:port[,host:port...] "
        "(rediss+cluster:// for TLS) so that every node's keys are reached"
    )
