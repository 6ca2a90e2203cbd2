"""The gateway and client side of issue N's adversarial findings: each test breaks one promise's attack.

Real redis-server and real worker/gateway processes where the defect needs them; the in-process app (FastAPI's
TestClient, with its lifespan, against the session's real Redis) where a request/response is enough.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import logging
import random
import select
import signal
import socket
import struct
import sys
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from starlette.routing import BaseRoute, Route

from broker_worker.logs import RedactingFormatter
from broker_worker.protocol import health
from broker_worker.protocol.client import AsyncClient
from broker_worker.protocol.connections import async_redis
from broker_worker.protocol.messages import ChatMessage, SamplingParams, WorkerHealth
from broker_worker.protocol.pubsub import Subscriber
from broker_worker.protocol.readers import Readers, job_readers_key
from broker_worker.protocol.redaction import redact, redact_text
from broker_worker.protocol.subscription import RESYNC
from gateway import openai_request, validation
from gateway.app import create_app
from gateway.auth import OPEN_PATHS
from gateway.image_bytes import trim
from gateway.metrics import Metrics
from gateway.service import STATUS_REUSE_S, GatewayService
from gateway.settings import GatewaySettings
from tests.helpers import Proc, RedisServer, served_models, spawn, spawn_gateway, wait_for, worker_args
from tests.test_reliability import consistent, expected

RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset, the rudest hang-up


def raw_request(port: int, payload: dict[str, Any], path: str = "/worker_generate_stream") -> socket.socket:
    body = json.dumps(payload).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(head.encode() + body)
    return sock


def hang_up(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST)
    sock.close()


def port_of(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


def payload(question: str, tokens: int, **extra: Any) -> dict[str, Any]:
    return {"model": "fake", "prompt": [{"role": "user", "content": question}], "max_new_tokens": tokens, **extra}


def chunks(body: bytes) -> list[dict[str, Any]]:
    return [json.loads(p) for p in body.split(b"\0") if p.strip()]


def gauge(base: str, name: str) -> float:
    families = text_string_to_metric_families(httpx.get(base + "/metrics", timeout=10).text)
    return next(s.value for f in families for s in f.samples if s.name == name)


@pytest.fixture
def app_client(redis_server: RedisServer, r: redis.Redis) -> Iterator[TestClient]:
    """The app in-process (lifespan included) on the session's Redis, with no worker: nothing is ever run."""
    settings = GatewaySettings(redis_url=redis_server.url, max_images=64)
    with TestClient(create_app(settings)) as client:
        yield client


# 3. A hang-up cancels only a job no other reader wants.


def test_retry_through_another_gateway_is_not_cancelled_by_the_stale_hang_up(  # type: ignore[no-untyped-def]
    start_worker, start_gateway, r: redis.Redis
) -> None:
    start_worker(delay=0.02)
    stale_gateway, first = start_gateway()
    _, second = start_gateway()
    request = payload("retry me", 300, job_id="order-7")
    stale = raw_request(port_of(first), request)
    assert stale.recv(1024).startswith(b"HTTP/1.1 200")
    with httpx.stream("POST", second + "/worker_generate_stream", json=request, timeout=60) as retry:
        received = retry.iter_raw()
        next(received)
        wait_for(lambda: r.zcard(job_readers_key("order-7")) == 2, 10, "both requests registered as readers")
        hang_up(stale)
        stale_gateway.wait_log("job order-7: its client went away; 1 other reader")  # the hang-up was handled
        last = chunks(b"".join(received))[-1]
    assert last["error_code"] == 0 and last["finish_reason"] == "length"
    assert r.exists("ivl:job:{order-7}:cancel") == 0
    wait_for(lambda: r.exists(job_readers_key("order-7")) == 0, 10, "the last reader to leave")


@pytest.mark.parametrize("grace_s", [0.0, 3.0])
def test_a_retry_sent_after_the_hang_up_keeps_its_job_within_the_grace(  # type: ignore[no-untyped-def]
    start_worker, start_gateway, r: redis.Redis, grace_s: float
) -> None:
    """The connection drops first, the client retries the same id after: within --hangup-grace-s the retry's
    reader joins before the stale one leaves, so it streams the whole answer; with no grace it finds the job
    cancelled (which is what clients of a gateway without the grace saw)."""
    start_worker(delay=0.02)
    stale_gateway, first = start_gateway("--hangup-grace-s", str(grace_s))
    _, second = start_gateway()
    request = payload("retry me late", 400, job_id=f"late-{grace_s}")
    stale = raw_request(port_of(first), request)
    assert stale.recv(1024).startswith(b"HTTP/1.1 200")
    hang_up(stale)
    channel = f"ivl:job:{{late-{grace_s}}}:chan"
    wait_for(lambda: r.execute_command("PUBSUB", "SHARDNUMSUB", channel)[1] == 0, 10, "the stale request's end")
    if not grace_s:
        stale_gateway.wait_log(f"job late-{grace_s} cancelled: its client went away")
    with httpx.stream("POST", second + "/worker_generate_stream", json=request, timeout=60) as retry:
        received = retry.iter_raw()
        head = next(received)
        if grace_s:
            stale_gateway.wait_log(f"job late-{grace_s}: its client went away; 1 other reader")
        last = chunks(head + b"".join(received))[-1]
    assert last["finish_reason"] == ("length" if grace_s else "cancelled")
    assert r.exists(f"ivl:job:{{late-{grace_s}}}:cancel") == (0 if grace_s else 1)


async def test_a_reader_leaving_after_its_job_ended_sets_no_cancel_key(
    redis_server: RedisServer, r: redis.Redis
) -> None:
    client = async_redis(redis_server.url)
    readers = Readers(client, hangup_grace_s=0)
    try:
        r.hset("ivl:job:{ended}:state", "status", "done")
        reader = readers.new("ended")
        await readers.join(reader)
        assert await readers.leave(reader, cancel=True) is True  # nobody left...
        assert r.exists("ivl:job:{ended}:cancel") == 0  # ...but the job had ended: nothing to cancel
    finally:
        await readers.close()
        await client.aclose()


@pytest.mark.parametrize("grace_s", [0.0, 30.0])
def test_a_model_whose_workers_lapsed_a_moment_ago_is_still_admitted(  # type: ignore[no-untyped-def]
    start_worker, start_gateway, r: redis.Redis, grace_s: float
) -> None:
    """A Redis stall past the health TTL lapses every worker's health key at once; until their next heartbeat no
    worker is listed. Within --admit-grace-s of last seeing the model, the gateway queues instead of refusing."""
    worker = start_worker(delay=0.01)
    _, base = start_gateway("--admit-grace-s", str(grace_s))
    wait_for(lambda: served_models(base) == ["fake"], 30, "the gateway to see the model")
    worker.signal(signal.SIGSTOP)  # no heartbeat from now on...
    try:
        (worker_id,) = r.zrange("ivl:workers", 0, -1)
        r.delete(f"ivl:worker:{worker_id}")  # ...and its health lapsed, as after a long stall
        r.zrem("ivl:workers", worker_id)
        wait_for(lambda: served_models(base) == [], 10, "the gateway to list no worker")
        with httpx.stream("POST", base + "/worker_generate_stream", json=payload("lapsed", 5), timeout=60) as answer:
            status = answer.status_code
            worker.signal(signal.SIGCONT)
            last = chunks(answer.read())[-1]
    finally:
        worker.signal(signal.SIGCONT)
    if grace_s:
        assert (status, last["error_code"], last["finish_reason"]) == (200, 0, "length")
    else:
        assert (status, last["error_code"]) == (404, 40301)


async def test_only_the_last_live_reader_cancels(redis_server: RedisServer, r: redis.Redis) -> None:
    client = async_redis(redis_server.url)
    readers = Readers(client)
    try:
        first, second = readers.new("j1"), readers.new("j1")
        await asyncio.gather(readers.join(first), readers.join(second))
        assert r.zcard(job_readers_key("j1")) == 2 and 0 < r.pttl(job_readers_key("j1")) <= 30_000
        r.zadd(job_readers_key("j1"), {first: 1})  # as if its renewals had stopped long ago
        await readers.renew()  # what the background task does every 10 s
        now_ms = int(r.time()[0]) * 1000
        assert r.zscore(job_readers_key("j1"), first) > now_ms + 20_000
        assert await readers.leave(first, cancel=True) is False  # another reader still wants it
        assert r.exists("ivl:job:{j1}:cancel") == 0
        assert await readers.leave(second, cancel=True) is True
        assert r.get("ivl:job:{j1}:cancel") == "1"
        # A reader of a gateway that died stops renewing: once expired, it no longer keeps the job.
        r.zadd(job_readers_key("j2"), {"dead-gateway:1": 1})
        r.zadd(job_readers_key("j3"), {"live-gateway:1": 2**50})
        for job_id in ("j2", "j3"):
            reader = readers.new(job_id)
            await readers.join(reader)
            await readers.leave(reader, cancel=True)
        assert r.exists("ivl:job:{j2}:cancel") == 1 and r.exists("ivl:job:{j3}:cancel") == 0
    finally:
        await readers.close()
        await client.aclose()


# 10. Bursts queue for Redis connections instead of failing; cancels of a mass hang-up are not dropped.


def test_a_burst_far_over_the_redis_pool_waits_for_connections(  # type: ignore[no-untyped-def]
    start_worker, start_gateway
) -> None:
    start_worker(delay=0.001, slots=100)
    gateway, base = start_gateway("--redis-max-connections", "4", "--max-queue", "10000")

    def one(k: int) -> dict[str, Any]:
        return chunks(httpx.post(base + "/worker_generate_stream", json=payload(f"b{k}", 8), timeout=120).content)[-1]

    with ThreadPoolExecutor(150) as pool:
        lasts = list(pool.map(one, range(150)))
    assert [last["error_code"] for last in lasts] == [0] * 150
    assert "Too many connections" not in gateway.log()


@pytest.mark.slow
def test_thousand_concurrent_streams(start_worker, start_gateway) -> None:  # type: ignore[no-untyped-def]
    start_worker(delay=0.001, slots=256)
    start_worker(delay=0.001, slots=256)
    _, base = start_gateway("--max-queue", "10000")

    async def burst() -> list[str]:
        limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
        async with httpx.AsyncClient(timeout=300, limits=limits) as client:

            async def one(k: int) -> str:
                response = await client.post(base + "/worker_generate_stream", json=payload(f"s{k}", 8))
                return str(chunks(response.content)[-1]["text"])

            return await asyncio.gather(*(one(k) for k in range(1000)))

    texts = asyncio.run(burst())
    assert texts == [expected(f"s{k}", 8) for k in range(1000)]


def test_mass_hang_up_cancels_every_job(start_worker, start_gateway, r: redis.Redis) -> None:  # type: ignore[no-untyped-def]
    start_worker(delay=0.05, slots=10)
    _, base = start_gateway("--redis-max-connections", "4", "--max-queue", "10000")
    socks = [raw_request(port_of(base), payload("hang", 400, job_id=f"c{k}")) for k in range(120)]
    wait_for(lambda: sum(r.exists(f"ivl:job:{{c{k}}}:state") for k in range(120)) == 120, 60, "every job queued")
    for sock in socks:
        hang_up(sock)
    wait_for(lambda: sum(r.exists(f"ivl:job:{{c{k}}}:cancel") for k in range(120)) == 120, 60, "120 cancels")


# 11. /v1/chat/completions answers hostile bodies with typed 4xx, on every field path.


def _png(width: int = 2, height: int = 2) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height)).save(buf, "PNG")
    return buf.getvalue()


def _openai_body() -> dict[str, Any]:
    """A valid body that sets every field of every model in OpenAIChatRequest (checked below)."""
    url = "data:image/png;base64," + base64.b64encode(_png()).decode()
    return {
        "model": "fake",
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": url}}],
            }
        ],
        "stream": False,
        "stream_options": {"include_usage": True},
        "temperature": 0.5,
        "top_p": 0.9,
        "max_tokens": 3,
        "max_completion_tokens": 3,
        "repetition_penalty": 1.0,
        "max_input_tiles": 6,
        "n": 1,
        "stop": ["x"],
        "logprobs": False,
    }


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else []
    for key, child in items:
        yield from _paths(child, (*prefix, key))


def _with(body: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    copy = json.loads(json.dumps(body))
    node = copy
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return copy


HOSTILE: list[Any] = [
    "\udfff",  # a lone surrogate (json.dumps writes it as the escape \\udfff)
    "x" * 200_001,
    -1,
    10**30,
    1e308,
    None,
    [],
    {},
    True,
    [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}] * 33,
]


def test_every_openai_field_path_refuses_hostile_values_with_a_typed_4xx(app_client: TestClient) -> None:
    body = _openai_body()
    models = (openai_request.OpenAIChatRequest, openai_request.OpenAIMessage, openai_request.OpenAIPart)
    parts = body["messages"][0]["content"]
    covered = [set(body), set(body["messages"][0]), set(parts[0]) | set(parts[1])]
    assert [set(m.model_fields) for m in models] == covered  # a new field must be added to the body above
    assert set(body["messages"][0]["content"][1]["image_url"]) == set(openai_request.OpenAIImageUrl.model_fields)
    assert set(body["stream_options"]) == set(openai_request.StreamOptions.model_fields)
    paths = [p for p in _paths(body) if p]
    for path in paths:
        for value in HOSTILE:
            for stream in (False, True):
                sent = _with(_with(body, ("stream",), stream), path, value)
                response = app_client.post(
                    "/v1/chat/completions", content=json.dumps(sent), headers={"content-type": "application/json"}
                )
                assert 400 <= response.status_code < 500, (path, str(value)[:40], stream, response.text[:200])
                error = response.json()["error"]
                assert 40000 <= error["code"] < 50000 and error["message"], (path, error)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("a" * 200_001, "messages.0.content: String should have at most 200000 characters"),
        ([{"type": "text", "text": "a" * 150_000}] * 2, "messages.0.content: String should have at most 200000"),
        ("a\udfffb", "messages.0.content: Input should be a valid string, unable to parse raw data"),
        (
            [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(_png()).decode()}}]
            * 33,
            "messages.0.images: List should have at most 32 items",
        ),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_openai_message_the_job_cannot_hold_is_a_400(
    app_client: TestClient, content: Any, message: str, stream: bool
) -> None:
    sent = {"model": "fake", "messages": [{"role": "user", "content": content}], "max_tokens": 3, "stream": stream}
    response = app_client.post(
        "/v1/chat/completions", content=json.dumps(sent), headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == 40001 and message in error["message"], error


# 14. Slow headers and slow bodies are timed out.


def test_slow_headers_and_slow_bodies_get_408_and_are_closed(start_worker, start_gateway) -> None:  # type: ignore[no-untyped-def]
    start_worker()
    gateway, base = start_gateway("--header-timeout-s", "1", "--body-timeout-s", "1")
    port = port_of(base)
    idle = socket.create_connection(("127.0.0.1", port))
    idle.settimeout(60)  # a hang guard only: the deadline is 1 s
    assert _read_all(idle).startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    head = socket.create_connection(("127.0.0.1", port))
    head.sendall(b"POST /worker_generate_stream HTTP/1.1\r\nHost: x\r\n")
    _dribble_until_closed(head, b"X-Slow: 1\r\n")
    body = socket.create_connection(("127.0.0.1", port))
    body.sendall(b"POST /worker_generate_stream HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
    _dribble_until_closed(body, b" ")
    gateway.wait_log("closed a connection whose request headers took over 1s", count=2)
    gateway.wait_log("closed a connection whose request body took over 1s")
    ok = httpx.post(base + "/worker_generate", json=payload("still serving", 3), timeout=30).json()
    assert ok["error_code"] == 0 and ok["text"] == expected("still serving", 3)


def _dribble_until_closed(sock: socket.socket, piece: bytes) -> None:
    """Send a piece every 0.3 s (steady progress does not extend the deadline) until the gateway answers or
    closes; then the connection must end (a reset is fine: the gateway closed with our last piece in flight)."""
    sock.settimeout(60)
    for _ in range(200):  # 60 s hang guard
        if select.select([sock], [], [], 0.3)[0]:
            break
        sock.sendall(piece)
    with contextlib.suppress(ConnectionResetError):
        _read_all(sock)


def _read_all(sock: socket.socket) -> bytes:
    received = b""
    while data := sock.recv(4096):
        received += data
    return received


# 15. With --api-token, every route but /health and /metrics needs the token.


def test_every_route_of_the_app_needs_the_token(redis_server: RedisServer, r: redis.Redis) -> None:
    app = create_app(GatewaySettings(redis_url=redis_server.url, api_token="s3cret"))
    routes = [(method, route.path) for route in _routes(app.routes) for method in route.methods or ()]
    assert {p for _, p in routes} >= {"/docs", "/openapi.json", "/redoc", "/jobs/{job_id}/stream", "/metrics"}
    assert {p for _, p in routes} >= set(app.openapi()["paths"])  # every documented route is enumerated
    with TestClient(app) as client:
        for method, path in [*routes, ("GET", "/no/such/path")]:
            url = path.replace("{job_id}", "some-job")
            bare = client.request(method, url, json={} if method == "POST" else None)
            authorized = client.request(
                method, url, json={} if method == "POST" else None, headers={"Authorization": "Bearer s3cret"}
            )
            if path in OPEN_PATHS:
                assert bare.status_code == 200, (method, path)
                continue
            assert bare.status_code == 401, (method, path, bare.status_code)
            assert bare.headers["www-authenticate"] == "Bearer"
            if method != "HEAD":
                body = bare.json()["error"] if path.startswith("/v1/") else json.loads(bare.content.rstrip(b"\0"))
                assert body["code" if path.startswith("/v1/") else "error_code"] == 40101, (method, path)
            assert authorized.status_code != 401, (method, path)
            wrong = client.request(method, url, headers={"Authorization": "Bearer s3cret2"})
            assert wrong.status_code == 401, (method, path)
        assert client.post("/jobs/planted/cancel").status_code == 401
    assert {"/health", "/metrics"} == OPEN_PATHS
    assert r.exists("ivl:job:{planted}:cancel") == 0  # a refused request plants nothing


def _routes(routes: list[BaseRoute]) -> Iterator[Route]:
    """Every route of the app, those of included routers too (FastAPI keeps them behind an included router)."""
    for route in routes:
        router = getattr(route, "original_router", None)
        if router is not None:
            yield from _routes(router.routes)
        elif isinstance(route, Route):
            yield route


# 17. No password of a URL is ever logged.


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0?password=TopSecret123", "redis://127.0.0.1:6379/0?password=***"),
        ("redis://u:TopSecret123@h:1/0?db=0&password=TopSecret123", "redis://u:***@h:1/0?db=0&password=***"),
        ("unix:///run/redis.sock?db=0&password=TopSecret123#x", "unix:///run/redis.sock?db=0&password=***#x"),
        ("redis+sentinel://u:TopSecret123@a:26379,b:26380/ivl/0", "redis+sentinel://u:***@a:26379,b:26380/ivl/0"),
        ("redis+sentinel://u:TopSecret123@a:1,v:TopSecret123@b:2/ivl", "redis+sentinel://u:***@b:2/ivl"),
        ("redis://:Top@Secret123@h:1/0?sentinel_password=TopSecret123", "redis://:***@h:1/0?sentinel_password=***"),
        ("redis://[::1", "redis://[::1"),
        ("http://user:TopSecret123@controller:21001", "http://user:***@controller:21001"),
    ],
)
def test_redact_masks_every_url_form(url: str, shown: str) -> None:
    assert redact(url) == shown
    assert "TopSecret123" not in redact_text(f"connecting to {url}, then retrying")


def test_log_lines_and_tracebacks_are_redacted() -> None:
    try:
        raise ConnectionError("Error connecting to redis://127.0.0.1:1/0?password=TopSecret123")
    except ConnectionError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "lost %s", ("redis://:TopSecret123@h:1",), None)
        record.exc_info = sys.exc_info()
    line = RedactingFormatter("%(message)s").format(record)
    assert "TopSecret123" not in line and "password=***" in line and "redis://:***@h:1" in line


def test_worker_and_gateway_never_log_a_query_string_password(tmp_path: Path, procs: list[Proc]) -> None:
    server = RedisServer(tmp_path, extra=["--requirepass", "TopSecret123"], admin=("default", "TopSecret123"))
    server.start()
    try:
        url = f"redis://127.0.0.1:{server.port}/0?password=TopSecret123"
        procs.append(spawn("worker", worker_args(url), tmp_path))
        gateway, base = spawn_gateway(url, tmp_path, "--controller-address", "http://ctl:TopSecret123@127.0.0.1:9")
        procs.append(gateway)
        wait_for(lambda: served_models(base) == ["fake"], 60, "the worker, authenticated with the query password")
        gateway.wait_log(r"controller http://ctl:\*\*\*@127.0.0.1:9 unreachable")  # a URL logged, redacted
        for proc in procs:
            assert "TopSecret123" not in proc.log(), proc.name
            assert "password=***" in proc.log(), proc.name
    finally:
        server.kill()


# 18. Hang-ups leak no subscription, in Redis or in the gateway.


def test_immediate_hang_ups_leak_no_subscription(start_worker, start_gateway, r: redis.Redis) -> None:  # type: ignore[no-untyped-def]
    start_worker(delay=0.05, slots=50)
    gateway, base = start_gateway("--max-queue", "100000")
    for k in range(300):
        hang_up(raw_request(port_of(base), payload(f"gone {k}", 200)))
    gateway.wait_log("cancelled: its client went away")  # the hang-ups reached streams, not just the socket
    wait_for(lambda: r.execute_command("PUBSUB", "SHARDCHANNELS", "ivl:job:*") == [], 30, "no channel subscribed")
    wait_for(lambda: gauge(base, "gateway_pubsub_channels") == 0, 30, "the gateway to hold no subscription")
    wait_for(lambda: gauge(base, "gateway_job_readers") == 0, 30, "the gateway to hold no reader")
    assert r.keys("ivl:job:*:readers") == []


async def test_racing_opens_and_closes_of_one_channel_end_consistent(redis_server: RedisServer, r: redis.Redis) -> None:
    client = async_redis(redis_server.url)
    subscriber = Subscriber(client)
    rng = random.Random(7)

    async def churn(k: int) -> None:
        with subscriber.open("ivl:job:{race}:chan") as subscription:
            for _ in range(rng.randrange(3)):
                await asyncio.sleep(0)
            if k % 3 == 0:
                await subscription.confirmed()

    async def cancelled_while_confirming() -> None:
        task = asyncio.create_task(churn(0))
        await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    try:
        for _ in range(5):
            await asyncio.gather(*(churn(k) for k in range(200)), *(cancelled_while_confirming() for _ in range(50)))
            await _settled(subscriber, r, expect=0)
            assert subscriber.channels == 0
        keeper = subscriber.open("ivl:job:{race}:chan")
        closing = [subscriber.open("ivl:job:{race}:chan") for _ in range(50)]
        for subscription in closing:
            subscription.close()
        assert await keeper.confirmed()
        await _settled(subscriber, r, expect=1)
        r.spublish("ivl:job:{race}:chan", "hello")
        assert await asyncio.wait_for(keeper.queue.get(), 10) == "hello"
        keeper.close()
        await _settled(subscriber, r, expect=0)
    finally:
        await subscriber.close()
        await client.aclose()


async def _settled(subscriber: Subscriber, r: redis.Redis, expect: int) -> None:
    for _ in range(400):
        numsub = r.execute_command("PUBSUB", "SHARDNUMSUB", "ivl:job:{race}:chan")[1]
        if numsub == expect and subscriber.settled:
            return
        await asyncio.sleep(0.025)
    raise AssertionError(f"NUMSUB stayed {numsub}, expected {expect}")


# 19 (images). Bytes after an image's end are not queued; an image bigger than its pixels need is refused.


def _image_bytes(fmt: str, **options: Any) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((64, 48), 40).convert("RGB").save(buf, fmt, **options)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("fmt", "options"),
    [("PNG", {}), ("JPEG", {}), ("JPEG", {"progressive": True}), ("GIF", {}), ("WEBP", {}), ("BMP", {})],
)
def test_junk_after_the_image_end_is_cut(fmt: str, options: dict[str, Any]) -> None:
    image = _image_bytes(fmt, **options)
    assert trim(image + b"\x00" * 4096 + b"\xff\xd9IEND;") == image
    assert trim(image) == image


def test_gateway_queues_only_the_bytes_the_image_needs() -> None:
    settings = GatewaySettings()
    png = _png(1, 1)
    junk = base64.b64encode(png + b"\x00" * (10 << 20)).decode()
    prompt = [ChatMessage(role="user", content="hi", image=[junk, "data:image/png;base64," + junk])]
    job = validation.build_job("fake", prompt, SamplingParams(max_new_tokens=3), settings)
    assert [base64.b64decode(b64) for b64 in job.prompt[0].image] == [png, png]
    inside = png[:-12] + _chunk(b"tEXt", b"c\0" + b"x" * (2 << 20)) + png[-12:]  # junk inside the structure
    with pytest.raises(validation.JobError) as refused:
        validation.build_job(
            "fake", [ChatMessage(role="user", image=[base64.b64encode(inside).decode()])], SamplingParams(), settings
        )
    assert refused.value.code == 40001 and "image 1: 2097" in refused.value.message


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


# 20. After a Redis outage every channel is subscribed again, confirmed, and its readers re-read the replay.


async def test_every_channel_is_resubscribed_and_confirmed_after_an_outage(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = RedisServer(tmp_path).start()
    client = async_redis(server.url)
    subscriber = Subscriber(client)
    try:
        subscriptions = [subscriber.open(f"ivl:job:{{o{k}}}:chan") for k in range(20)]
        assert all(await asyncio.gather(*(s.confirmed() for s in subscriptions)))
        server.kill()
        for _ in range(400):  # the fault hit: the loss was noticed and a reconnect failed while Redis was down
            if not subscriber.connected and "Connect call failed" in caplog.text:
                break
            await asyncio.sleep(0.05)
        assert not subscriber.connected and "Connect call failed" in caplog.text
        server.start()
        for subscription in subscriptions:
            assert await asyncio.wait_for(subscription.queue.get(), 30) == RESYNC
            assert await subscription.confirmed()
        assert subscriber.reconnects >= 1
        admin = server.client()
        assert admin.execute_command("PUBSUB", "SHARDNUMSUB", *(s.channel for s in subscriptions))[1::2] == [1] * 20
        admin.spublish(subscriptions[7].channel, "live again")
        assert await asyncio.wait_for(subscriptions[7].queue.get(), 10) == "live again"
    finally:
        await subscriber.close()
        await client.aclose()
        server.kill()


def test_stream_in_flight_gets_live_events_again_after_an_outage(tmp_path: Path, procs: list[Proc]) -> None:
    server = RedisServer(tmp_path, extra=["--appendonly", "yes", "--appendfsync", "always"]).start()
    try:
        procs.append(spawn("worker", worker_args(server.url, delay=0.02), tmp_path))
        gateway, base = spawn_gateway(server.url, tmp_path)
        procs.append(gateway)
        wait_for(lambda: served_models(base) == ["fake"], 60, "gateway and worker")
        admin = server.client()
        with ThreadPoolExecutor(1) as pool:
            request = payload("outage", 600, job_id="outage-1")
            future = pool.submit(
                lambda: chunks(httpx.post(base + "/worker_generate_stream", json=request, timeout=120).content)
            )
            wait_for(lambda: admin.xlen("ivl:job:{outage-1}:events") >= 5, 30, "the stream to start")
            server.kill()
            gateway.wait_log("pub/sub connection lost")
            server.start()
            wait_for(
                lambda: admin.execute_command("PUBSUB", "SHARDNUMSUB", "ivl:job:{outage-1}:chan")[1] == 1,
                30,
                "re-subscribed",
            )
            result = future.result(timeout=120)
        assert result[-1]["error_code"] == 0 and consistent(result)
        assert result[-1]["text"] == expected("outage", 600)
    finally:
        server.kill()


@pytest.mark.parametrize("endpoint", ["/worker_generate_stream", "/v1/chat/completions"])
def test_queue_limit_holds_under_a_burst_and_refusals_are_http_429(  # type: ignore[no-untyped-def]
    endpoint: str, r: redis.Redis, start_worker, start_gateway
) -> None:
    """Admission is one Redis script (depth check + XADD), done before the response starts: a burst of 40 gets
    exactly --max-queue 200s, the rest 429 with 42903, and the job stream never holds more."""
    start_worker(delay=0.2, slots=1)
    _, base = start_gateway("--max-queue", "5")
    wait_for(lambda: served_models(base) == ["fake"], 30, "the worker to be served")
    if endpoint == "/v1/chat/completions":
        body: dict[str, Any] = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    else:
        body = {"model": "fake", "prompt": [{"role": "user", "content": "hi"}], "max_new_tokens": 50}
    depths: list[int] = []

    async def one(client: httpx.AsyncClient, hold: asyncio.Event) -> tuple[int, bytes]:
        async with client.stream("POST", base + endpoint, json=body) as response:
            if response.status_code == 200:
                depths.append(r.xlen("ivl:jobs:fake"))
                await hold.wait()
            return response.status_code, await response.aread() if response.status_code != 200 else b""

    async def burst() -> list[tuple[int, bytes]]:
        hold = asyncio.Event()
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=40)) as client:
            tasks = [asyncio.create_task(one(client, hold)) for _ in range(40)]
            await asyncio.to_thread(wait_for, lambda: sum(t.done() for t in tasks) + len(depths) == 40, 60, "all")
            hold.set()
            return await asyncio.gather(*tasks)

    results = asyncio.run(burst())
    codes = [code for code, _ in results]
    assert (codes.count(200), codes.count(429)) == (5, 35), codes
    assert all(b"42903" in text for code, text in results if code == 429)
    assert max(depths) <= 5


async def test_admission_does_not_wait_for_redis_while_the_model_was_seen_within_the_grace(
    redis_server: RedisServer, r: redis.Redis
) -> None:
    """A status older than STATUS_REUSE_S is read again in the background: within --admit-grace-s of seeing the
    model the answer is "admit" whatever Redis says, so a request does not wait three round trips for it."""
    client = AsyncClient(async_redis(redis_server.url))
    service = GatewayService(GatewaySettings(), client, Metrics())
    try:
        await health.record(client.redis, WorkerHealth(worker_id="w", model="m", slots=1, running=0), 10)
        await service.admit("m")
        seen = service._status_at
        await asyncio.sleep(STATUS_REUSE_S + 0.05)
        r.execute_command("CLIENT", "PAUSE", 1000, "ALL")  # every command waits a second from now
        started = time.monotonic()
        await service.admit("m")
        assert time.monotonic() - started < 0.5
        await asyncio.to_thread(wait_for, lambda: service._status_at > seen, 10, "the status to be read again")
    finally:
        r.execute_command("CLIENT", "UNPAUSE")
        await client.close()
