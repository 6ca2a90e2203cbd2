"""Least-privilege Redis ACL users, TLS, and hostile input: refused fast with typed errors, service unharmed."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
from pathlib import Path

import httpx
import pytest
import redis

from tests.helpers import BIN, ROOT, Proc, RedisServer, end_to_end, png_b64
from tests.test_images import png_bomb

# The ACL users docs/reliability.md documents (keys and channels under ivl:, only the commands each side uses).
WORKER_ACL = (
    "on >worker-secret ~ivl:* &ivl:* -@all +ping +xreadgroup +xack +xdel +xautoclaim +xclaim +xgroup|create "
    "+xgroup|delconsumer +xgroup|setid +xsetid +xinfo|consumers +xadd +xrange +xrevrange +xlen +evalsha +eval "
    "+script|load +set +get +mget +del "
    "+zadd +zrem +zrangebyscore +zremrangebyscore +expire +hget +hset +hincrby +exists +spublish +getex +multi +exec "
    "+time +hmget"
)
GATEWAY_ACL = (
    "on >gateway-secret ~ivl:* &ivl:* -@all +ping +xadd +xlen +xrange +hget +hset +hsetnx +del +eval "
    "+expire +exists +set +zrangebyscore +mget +ssubscribe +sunsubscribe +multi +exec "
    "+evalsha +script|load +script|exists +time +zadd +zrem +zremrangebyscore +zcard +pexpire"
)


def test_least_privilege_acl_users(tmp_path: Path, procs: list[Proc]) -> None:
    server = RedisServer(tmp_path).start()
    try:
        admin = server.client()
        admin.execute_command("ACL", "SETUSER", "ivl-worker", *WORKER_ACL.split())
        admin.execute_command("ACL", "SETUSER", "ivl-gateway", *GATEWAY_ACL.split())
        admin.execute_command("ACL", "SETUSER", "admin", "on", ">admin-secret", "~*", "&*", "+@all")
        admin.execute_command("ACL", "SETUSER", "default", "off")  # nobody gets in without a password
        server.admin = ("admin", "admin-secret")
        text = end_to_end(
            server.url_for("ivl-worker", "worker-secret"),
            server.url_for("ivl-gateway", "gateway-secret"),
            tmp_path,
            procs,
        )
        assert text == "t0:6 t1:6 t2:6 t3:6 t4:6 t5:6 "
        worker = redis.Redis.from_url(server.url_for("ivl-worker", "worker-secret"))
        for forbidden in (
            lambda: worker.flushall(),
            lambda: worker.set("other:key", 1),
            lambda: worker.keys("*"),
            lambda: worker.config_get("*"),
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                forbidden()
        gateway = redis.Redis.from_url(server.url_for("ivl-gateway", "gateway-secret"))
        with pytest.raises(redis.exceptions.NoPermissionError):
            gateway.xreadgroup("workers", "me", {"ivl:jobs:fake": ">"})  # the gateway cannot take jobs
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(port=server.port).ping()
        for proc in procs:
            assert "worker-secret" not in proc.log() and "gateway-secret" not in proc.log()  # passwords not logged
    finally:
        server.kill()


@pytest.mark.parametrize("user", ["wrong password", "the gateway's user"])
def test_a_worker_whose_user_redis_refuses_exits_with_one_line(tmp_path: Path, user: str) -> None:
    """A setup error, not an outage: no retry loop, no traceback (a Redis that is down or full is waited for)."""
    server = RedisServer(tmp_path).start()
    try:
        admin = server.client()
        admin.execute_command("ACL", "SETUSER", "ivl-gateway", *GATEWAY_ACL.split())  # may not create groups
        admin.execute_command("ACL", "SETUSER", "admin", "on", ">admin-secret", "~*", "&*", "+@all")
        admin.execute_command("ACL", "SETUSER", "default", "off")
        server.admin = ("admin", "admin-secret")
        url = server.url_for("ivl-gateway", "wrong" if user == "wrong password" else "gateway-secret")
        args = [str(BIN / "broker-worker"), "run", "--fake-engine", "--redis-url", url]
        done = subprocess.run(args, capture_output=True, text=True, timeout=60)
        output = done.stdout + done.stderr
        lines = [line for line in output.splitlines() if line.strip()]
        assert done.returncode != 0 and "Traceback" not in output, output[-2000:]
        assert lines[-1].startswith("broker-worker: Redis refused this worker's user ("), lines[-1]
        assert lines[-1].endswith("the ACL a worker needs is in docs/reliability.md, 'Security model'")
        assert "gateway-secret" not in output  # the URL is never printed with its password
    finally:
        server.kill()


def make_tls_files(directory: Path) -> Path:
    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    ssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
    )
    ssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (directory / "ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost")
    ssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "ext",
    )
    return directory / "ca.crt"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make test certificates")
def test_tls_end_to_end(tmp_path: Path, procs: list[Proc]) -> None:
    ca = make_tls_files(tmp_path)
    tls = [
        "--tls-cert-file",
        str(tmp_path / "server.crt"),
        "--tls-key-file",
        str(tmp_path / "server.key"),
        "--tls-ca-cert-file",
        str(ca),
        "--tls-auth-clients",
        "no",
    ]
    if not redis_has_tls():
        pytest.skip("this redis-server build has no TLS support")
    server = RedisServer(tmp_path, extra=tls, tls_ca=ca).start()  # any other start-up failure fails the test
    try:
        assert end_to_end(server.url, server.url, tmp_path, procs) == "t0:6 t1:6 t2:6 t3:6 t4:6 t5:6 "
        with pytest.raises(redis.exceptions.ConnectionError):
            redis.Redis(port=server.port, socket_timeout=2).ping()  # plaintext is refused
    finally:
        server.kill()


def redis_has_tls() -> bool:
    """Whether redis-server was built with TLS (Debian's is). Its config parser stops at the first unknown
    directive without starting: ``tls-port`` when TLS is not built in, else the made-up one after it."""
    probe = subprocess.run(["redis-server", "--port", "0", "--tls-port", "0", "--no-such-option"], capture_output=True)
    return b"no-such-option" in probe.stdout + probe.stderr


def test_hostile_inputs_refused_before_queueing(start_worker, start_gateway, r: redis.Redis) -> None:  # type: ignore[no-untyped-def]
    start_worker(delay=0.001)
    _, base = start_gateway()

    def prompt(images: list[str]) -> dict[str, object]:
        return {"model": "fake", "prompt": [{"role": "user", "content": "hi", "image": images}], "max_new_tokens": 4}

    truncated = png_b64(200, 200)[:101]
    cases = {
        "bomb": (prompt([png_bomb()]), 40001, "image 1: refused as a decompression bomb"),
        "truncated base64": (prompt([truncated]), 40001, "image 1: invalid base64"),
        "1000 images": (prompt([png_b64(8, 8)] * 1000), 40001, "prompt.0.image: List should have at most 32 items"),
    }
    for name, (payload, code, fragment) in cases.items():
        response = httpx.post(base + "/worker_generate_stream", json=payload, timeout=30)
        chunk = json.loads(response.content.split(b"\0")[0])
        assert response.status_code == 400, name
        assert chunk["error_code"] == code and fragment in chunk["text"], (name, chunk)
    assert post_raw_body(base, 100 * 1024 * 1024) == 413  # answered after 1 MB of the 100 MB were sent
    assert r.xlen("ivl:jobs:fake") == 0 and not list(r.scan_iter("ivl:job:*"))  # nothing was queued
    ok = httpx.post(base + "/worker_generate_stream", json=prompt([png_b64(64, 64)]), timeout=30).content
    assert json.loads(ok.split(b"\0")[-2])["error_code"] == 0  # how fast, and the memory: bench/refusals.py


def post_raw_body(base: str, size: int) -> int:
    """Announce a body of ``size`` bytes, send 1 MB of it, and read the status line the gateway answers with."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(
            f"POST /worker_generate_stream HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {size}\r\n\r\n".encode()
            + b"x" * 1_000_000
        )
        status_line = conn.recv(4096).split(b"\r\n")[0]
    return int(status_line.split()[1])


def test_no_pickle_anywhere() -> None:
    """Every message on Redis is JSON (docs/reliability.md): no serializer that runs code on load is imported."""
    sources = [*Path(ROOT / "broker_worker").rglob("*.py"), *Path(ROOT / "gateway").rglob("*.py")]
    found = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in sources
        for n, line in enumerate(path.read_text().splitlines(), start=1)
        if re.match(r"\s*(import|from)\s+(pickle|cPickle|cloudpickle|dill|marshal|shelve)\b", line)
    ]
    assert len(sources) > 20 and found == []
