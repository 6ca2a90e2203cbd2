"""Test helpers: a real redis-server per session, worker and gateway processes, and waiting on conditions."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis
from PIL import Image

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(condition: Callable[[], Any], timeout: float = 30.0, what: str = "condition", step: float = 0.05) -> Any:
    """Poll until ``condition()`` is truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@dataclass
class RedisServer:
    directory: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    extra: list[str] = field(default_factory=list)
    #: When set, the server listens with TLS only and clients trust this CA (rediss://).
    tls_ca: Path | None = None
    #: Credentials of the test's own admin client (after ACL changes).
    admin: tuple[str, str] | None = None

    @property
    def url(self) -> str:
        if self.tls_ca is not None:
            return f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls_ca}"
        return f"redis://127.0.0.1:{self.port}/0"

    def url_for(self, user: str, password: str) -> str:
        return self.url.replace("://", f"://{user}:{password}@", 1)

    def start(self) -> RedisServer:
        ports = ["--port", "0", "--tls-port", str(self.port)] if self.tls_ca else ["--port", str(self.port)]
        log = str(self.directory / f"redis-{self.port}.log")
        cmd = ["redis-server", *ports, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        cmd += ["--dir", str(self.directory), "--logfile", log, *self.extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(self._pings, 10, "redis-server to answer")
        except BaseException:
            self.kill()  # never leave a server behind when start-up fails
            raise
        return self

    def _pings(self) -> bool:
        try:
            return bool(self.client().ping())
        except redis.RedisError:
            return False

    def client(self) -> redis.Redis:
        url = self.url_for(*self.admin) if self.admin else self.url
        return redis.Redis.from_url(url, decode_responses=True, socket_timeout=5)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def restart(self) -> None:
        self.kill()
        self.start()


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, pattern: str, timeout: float = 30.0, count: int = 1) -> None:
        wait_for(lambda: len(re.findall(pattern, self.log())) >= count, timeout, f"{self.name} log {pattern!r}")

    def signal(self, sig: signal.Signals) -> None:
        self.popen.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGCONT)
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return int(self.popen.returncode)

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None


def spawn(name: str, args: list[str], log_dir: Path, env: dict[str, str] | None = None) -> Proc:
    log_path = log_dir / f"{name}-{time.monotonic_ns()}.log"
    handle = log_path.open("wb")
    # This checkout's code first, even where the venv's package is installed from another one (a shared venv)
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path, **(env or {})}
    popen = subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, env=full_env, cwd=ROOT)
    return Proc(name, popen, log_path)


def worker_args(
    redis_url: str,
    *,
    model: str = "fake",
    model_path: Path | None = None,
    delay: float = 0.01,
    lease_s: float = 2.0,
    slots: int = 5,
    extra: list[str] | None = None,
) -> list[str]:
    args = [
        str(BIN / "broker-worker"),
        "run",
        "--redis-url",
        redis_url,
        "--model-name",
        model,
        "--lease-s",
        str(lease_s),
        "--lease-renew-s",
        str(lease_s / 4),
        "--heartbeat-s",
        "0.5",
        "--limit-model-concurrency",
        str(slots),
        "--shutdown-grace-s",
        "1",
    ]
    if model_path is None:
        args += ["--fake-engine", "--fake-token-delay-s", str(delay)]
    else:
        args += ["--model-path", str(model_path)]
    return args + (extra or [])


def live_worker_ids(r: redis.Redis, model: str) -> list[str]:
    ids = r.zrangebyscore("ivl:workers", int(time.time() * 1000), "+inf")
    out = []
    for worker_id in ids:
        raw = r.get(f"ivl:worker:{worker_id}")
        if raw and json.loads(raw)["model"] == model:
            out.append(worker_id)
    return out


def png_b64(width: int = 320, height: int = 240, seed: int = 0) -> str:
    image = Image.effect_noise((width, height), 40 + seed).convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def events(r: redis.Redis, job_id: str) -> list[dict[str, Any]]:
    return [json.loads(f["e"]) for _, f in r.xrange(f"ivl:job:{{{job_id}}}:events")]


def text_of(evs: list[dict[str, Any]]) -> str:
    return "".join(e["text"] for e in evs if e["type"] == "delta")


def wait_terminal(r: redis.Redis, job_id: str, timeout: float = 60.0) -> list[dict[str, Any]]:
    def terminal() -> list[dict[str, Any]] | None:
        evs = events(r, job_id)
        return evs if evs and evs[-1]["type"] in ("done", "failed", "cancelled") else None

    result: list[dict[str, Any]] = wait_for(terminal, timeout, f"job {job_id} to end")
    return result


def submit(r: redis.Redis, job: dict[str, Any]) -> None:
    r.xadd(f"ivl:jobs:{job['model']}", {"job": json.dumps(job)})


def job(job_id: str, model: str = "fake", question: str = "hello", tokens: int = 20, **extra: Any) -> dict[str, Any]:
    return {
        "id": job_id,
        "model": model,
        "prompt": [{"role": "user", "content": question}],
        "max_new_tokens": tokens,
        **extra,
    }


def served_models(base: str) -> list[str]:
    """The gateway's ``model_names`` (models with a live worker); [] while it does not answer."""
    try:
        return list(httpx.post(base + "/worker_get_status", timeout=2).json()["model_names"])
    except (httpx.HTTPError, ValueError, KeyError):
        return []


def spawn_gateway(redis_url: str, log_dir: Path, *extra: str, port: int | None = None) -> tuple[Proc, str]:
    """A ``broker-gateway`` process, once it answers /health; returns it and its base URL."""
    port = port or free_port()
    args = [str(BIN / "broker-gateway"), "--redis-url", redis_url, "--host", "127.0.0.1", "--port", str(port), *extra]
    proc = spawn("gateway", args, log_dir)
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(base + "/health", timeout=2).status_code in (200, 503)
        except httpx.HTTPError:
            if not proc.alive:
                raise AssertionError(proc.log()) from None
            return False

    try:
        wait_for(up, 30, "the gateway to answer /health")
    except BaseException:
        proc.stop(5)
        raise
    return proc, base


def end_to_end(
    worker_url: str, gateway_url: str, tmp_path: Path, procs: list[Proc], question: str = "secure", tokens: int = 6
) -> str:
    """A fake-engine worker and a gateway on these Redis URLs; one request through both; its text."""
    procs.append(spawn("worker", worker_args(worker_url, delay=0.001), tmp_path))
    gateway, base = spawn_gateway(gateway_url, tmp_path)
    procs.append(gateway)

    def ready() -> bool:
        assert all(p.alive for p in procs), [p.log()[-2000:] for p in procs]
        return served_models(base) == ["fake"]

    wait_for(ready, 60, "worker and gateway")
    payload = {"model": "fake", "prompt": [{"role": "user", "content": question}], "max_new_tokens": tokens}
    body = httpx.post(base + "/worker_generate_stream", json=payload, timeout=30).content
    last = json.loads(body.split(b"\0")[-2])
    assert last["error_code"] == 0, last
    return str(last["text"])
