"""Connection URLs: password redaction, and a Sentinel-managed primary end to end; cluster connections closed
under a write."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import redis

from broker_worker.protocol.connections import parse_sentinel_url
from broker_worker.protocol.redaction import redact
from tests.helpers import Proc, RedisServer, end_to_end, free_port


def test_redact_hides_passwords_only() -> None:
    assert redact("redis://user:s3cret@host:6379/0") == "redis://user:***@host:6379/0"
    assert (
        redact("rediss://:s3cret@host:6380/0?ssl_ca_certs=/ca.crt") == "rediss://:***@host:6380/0?ssl_ca_certs=/ca.crt"
    )
    assert (
        redact("redis+sentinel://u:p@a:26379,b:26380/mymaster/2") == "redis+sentinel://u:***@a:26379,b:26380/mymaster/2"
    )
    assert redact("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_parse_sentinel_url() -> None:
    target = parse_sentinel_url("redis+sentinel://ivl-worker:p%40ss@s1:26379,s2/mymaster/2")
    assert target.sentinels == [("s1", 26379), ("s2", 26379)]
    assert (target.service, target.db, target.username, target.password) == ("mymaster", 2, "ivl-worker", "p@ss")


def test_workers_and_gateway_through_sentinel(tmp_path: Path, procs: list[Proc]) -> None:
    primary = RedisServer(tmp_path).start()
    sentinel_port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {sentinel_port}\nbind 127.0.0.1\nsentinel monitor ivl 127.0.0.1 {primary.port} 1\n"
        f"sentinel down-after-milliseconds ivl 5000\n"
    )
    sentinel = subprocess.Popen(
        ["redis-server", str(conf), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        url = f"redis+sentinel://127.0.0.1:{sentinel_port}/ivl/0"
        assert end_to_end(url, url, tmp_path, procs, question="via sentinel", tokens=3) == "t0:12 t1:12 t2:12 "
        assert primary.client().exists("ivl:workers")  # the data is on the primary the sentinel pointed to
    finally:
        sentinel.kill()
        sentinel.wait()
        primary.kill()


async def test_a_cluster_connection_disconnected_under_a_write_raises_a_connection_error(
    redis_server: RedisServer,
) -> None:
    """A cluster client resetting its nodes (a failover) disconnects connections other tasks are writing on; the
    write then finds no writer. That must be a ConnectionError (the client retries elsewhere), not an
    AttributeError that fails a worker's job (seen as 50001 "'NoneType' object has no attribute 'writelines'")."""
    from broker_worker.protocol.connections import _ClusterConnection

    conn = _ClusterConnection(host="127.0.0.1", port=redis_server.port)
    await conn.connect()

    async def disconnected_meanwhile() -> None:  # what another task's disconnect does during the health check
        conn._writer = None

    conn.check_health = disconnected_meanwhile  # type: ignore[method-assign]
    try:
        with pytest.raises(redis.ConnectionError, match="connection closed under a write: 'NoneType' object"):
            await conn.send_packed_command(conn.pack_command("PING"))
    finally:
        await conn.disconnect()
