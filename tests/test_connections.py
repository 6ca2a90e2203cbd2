"""Connection URLs: password redaction, and a Sentinel-managed primary end to end."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx

from broker_worker.connections import parse_sentinel_url, redact
from tests.helpers import BIN, Proc, RedisServer, free_port, spawn, wait_for, worker_args


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
        procs.append(spawn("worker", worker_args(url, delay=0.001), tmp_path))
        port = free_port()
        procs.append(spawn("gateway", [str(BIN / "broker-gateway"), "--redis-url", url, "--port", str(port)], tmp_path))
        base = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            try:
                return httpx.post(base + "/worker_get_status", timeout=2).json()["model_names"] == ["fake"]
            except (httpx.HTTPError, ValueError, KeyError):
                return False

        wait_for(ready, 60, "worker and gateway through Sentinel")
        payload = {"model": "fake", "prompt": [{"role": "user", "content": "via sentinel"}], "max_new_tokens": 3}
        last = json.loads(
            httpx.post(base + "/worker_generate_stream", json=payload, timeout=30).content.split(b"\0")[-2]
        )
        assert (last["error_code"], last["text"]) == (0, "t0:12 t1:12 t2:12 ")
        assert primary.client().exists("ivl:workers")  # the data is on the primary the sentinel pointed to
    finally:
        sentinel.kill()
        sentinel.wait()
        primary.kill()
