"""How fast the gateway refuses bad requests, and what refusing costs it in memory.

docs/reliability.md promises 40301 "in < 1 s" and hostile input refused "in milliseconds, without decoding";
the tests check what is refused and how (tests/test_security.py, tests/test_gateway.py), this measures how fast.
Every payload is built before its clock starts.
"""

from __future__ import annotations

import base64
import socket
import statistics
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from bench.measures import pct, stack
from tests.helpers import png_b64

REPEATS = 20
RAW_BODY_BYTES = 100 * 1024 * 1024


def png_header_bomb(width: int = 40_000, height: int = 40_000) -> str:
    """A PNG that announces 1.6 G pixels in a few hundred bytes (only its header must ever be read)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    return base64.b64encode(b"\x89PNG\r\n\x1a\n" + body).decode()


def hostile_payloads() -> dict[str, dict[str, Any]]:
    def prompt(images: list[str], model: str = "fake") -> dict[str, Any]:
        return {"model": model, "prompt": [{"role": "user", "content": "hi", "image": images}], "max_new_tokens": 4}

    return {
        "no_worker_40301": prompt([], model="no-such-model"),
        "bomb_40001": prompt([png_header_bomb()]),
        "truncated_base64_40001": prompt([png_b64(200, 200)[:101]]),
        "images_1000_40001": prompt([png_b64(8, 8)] * 1000),
        "max_new_tokens_40001": prompt([]) | {"max_new_tokens": 20_000},  # over the hard limit
    }


def raw_body_refusal(base: str) -> None:
    """Announce 100 MB, send 1 MB of it, read the status line (413)."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(
            f"POST /worker_generate_stream HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {RAW_BODY_BYTES}\r\n\r\n".encode()
            + b"x" * 1_000_000
        )
        status = conn.recv(4096).split(b"\r\n")[0]
    if b" 413 " not in status:
        raise AssertionError(f"expected 413, got {status!r}")


def timed(call: Callable[[], None]) -> list[float]:
    """Milliseconds of ``call``, REPEATS times after one warm-up."""
    call()
    out = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        call()
        out.append((time.perf_counter() - started) * 1000)
    return out


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def refusals(workdir: Path) -> dict[str, Any]:
    """Per refusal: p50 and max milliseconds over REPEATS; the gateway's RSS growth over all of them."""
    payloads = hostile_payloads()
    with stack(workdir, [{"delay": 0.001}]) as (_server, base, procs):
        gateway_pid = procs[-1].popen.pid
        before = rss_mb(gateway_pid)
        ms: dict[str, list[float]] = {}
        with httpx.Client(timeout=30) as client:
            for name, payload in payloads.items():
                body = httpx.Request("POST", base + "/worker_generate_stream", json=payload)

                def send(request: httpx.Request = body) -> None:
                    if client.send(request).status_code < 400:
                        raise AssertionError(f"{request.url} was not refused")

                ms[name] = timed(send)
        ms["body_100mb_413"] = timed(lambda: raw_body_refusal(base))
        growth = rss_mb(gateway_pid) - before
    everything = [v for values in ms.values() for v in values]
    return {
        "refusal_ms": {
            **{f"{name}_p50": round(statistics.median(v), 2) for name, v in ms.items()},
            "p99": round(pct(everything, 99), 2),
            "max": round(max(everything), 2),
        },
        "refusal_rss_growth_mb": round(growth, 1),
    }
