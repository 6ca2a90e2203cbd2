"""Redis refusing work, and a typed answer for each. Full (maxmemory with `noeviction`, its default policy): writes
are refused with OOM; a new request gets a typed refusal to retry later (42903, HTTP 429), not an outage report; a
job that ended meanwhile still lets go of its entry; streams in flight pause and go on once memory is freed; nothing
crashes. A read-only replica (a gateway pointed at one, or a failover under way) is named as such. Idle clients
closed (`timeout`): the next call goes on a new connection at once.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis

from broker_worker.job_queue import JobQueue
from broker_worker.protocol.connections import async_redis
from tests.helpers import RedisServer, job, live_worker_ids, submit, text_of, wait_for, wait_terminal
from tests.test_gateway import stream
from tests.test_worker import expected_text

FULL = "Redis is full (its maxmemory is reached): retry later; its operator must free memory"


@contextlib.contextmanager
def full(r: redis.Redis) -> Iterator[None]:
    """Redis over its maxmemory until the block ends (confirmed: a plain SET is refused). One byte: a limit just
    under the memory in use would not hold, as Redis shrinks its clients' buffers in the background."""
    r.config_set("maxmemory-policy", "noeviction")
    r.config_set("maxmemory", "1")
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        r.set("probe", "1")
    try:
        yield
    finally:
        r.config_set("maxmemory", "0")


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path).start()  # its own: this one's memory limit must not outlive the test
    yield server
    server.kill()


async def test_an_entry_finished_while_redis_is_full_is_acknowledged_and_deleted(own_redis: RedisServer) -> None:
    r = own_redis.client()
    client = async_redis(own_redis.url)
    queue = JobQueue(client, "m", "w1", lease_s=60)
    try:
        await queue.ensure_group()
        r.xadd(queue.stream, {"job": "{}"})
        [entry] = await queue.take_new(1)
        with full(r):
            await queue.finish(entry.entry_id)  # inside MULTI, Redis refuses even XACK while full
            assert r.xlen(queue.stream) == 0
            assert r.xpending(queue.stream, "workers")["pending"] == 0
    finally:
        await client.aclose()


def test_a_full_redis_refuses_new_requests_with_42903_and_streams_go_on_after(  # type: ignore[no-untyped-def]
    own_redis: RedisServer, start_worker, start_gateway
) -> None:
    r = own_redis.client()
    worker = start_worker(url=own_redis.url, wait=False, delay=0.05)
    gateway, base = start_gateway(url=own_redis.url)
    wait_for(lambda: live_worker_ids(r, "fake"), 60, "the worker to report healthy")
    long = {"model": "fake", "prompt": [{"role": "user", "content": "in flight"}], "max_new_tokens": 60}
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(stream, base, long)
        wait_for(lambda: r.keys("ivl:job:*:events"), 30, "the long job under way")
        body = {"model": "fake", "prompt": [{"role": "user", "content": "while full"}], "max_new_tokens": 5}
        with full(r):
            status, parts = stream(base, body)
            assert (status, parts[-1]["error_code"]) == (429, 42903)
            assert parts[-1]["text"].startswith(FULL), parts[-1]["text"]
            openai = {"model": "fake", "messages": [{"role": "user", "content": "while full"}]}
            reply = httpx.post(base + "/v1/chat/completions", json=openai, timeout=30)
            assert (reply.status_code, reply.json()["error"]["code"]) == (429, 42903)
            assert reply.json()["error"]["message"].startswith(FULL)
            cancel = httpx.post(base + "/jobs/any-job/cancel", timeout=30)  # every route: the app's last boundary
            assert (cancel.status_code, json.loads(cancel.content.rstrip(b"\0"))["error_code"]) == (429, 42903)
            assert r.xlen("ivl:jobs:fake") == 1  # the long job's: nothing of the refused ones was queued
            worker.wait_log("publish failed", 30)  # the long job's stream is paused
        status, parts = in_flight.result(timeout=60)
    assert (status, parts[-1]["error_code"], parts[-1]["text"]) == (200, 0, expected_text("in flight", 60))
    status, parts = stream(base, body)
    assert (status, parts[-1]["error_code"], parts[-1]["text"]) == (200, 0, expected_text("while full", 5))
    wait_for(lambda: r.xlen("ivl:jobs:fake") == 0, 10, "the entries finished")
    assert worker.alive and gateway.alive
    assert "crashed" not in worker.log() + gateway.log()


def test_a_worker_started_while_redis_is_full_waits_then_serves(own_redis: RedisServer, start_worker) -> None:  # type: ignore[no-untyped-def]
    r = own_redis.client()
    r.xgroup_create("ivl:jobs:fake", "workers", id="0", mkstream=True)
    submit(r, job("early", question="queued before it filled up", tokens=5))
    with full(r):
        worker = start_worker(url=own_redis.url, wait=False)
        worker.wait_log("cannot create the job streams' consumer groups yet", 30)  # the batch lane's stream
        worker.wait_log("retrying in 1.0s", 30)  # a second try: still up
        assert worker.alive
    evs = wait_terminal(r, "early", 30)
    assert text_of(evs) == expected_text("queued before it filled up", 5)
    assert r.hget("ivl:job:{early}:state", "attempts") == "1"
    assert worker.alive and "crashed" not in worker.log()


def test_connections_redis_closes_while_idle_cost_no_publish_retry(  # type: ignore[no-untyped-def]
    tmp_path: Path, start_worker, start_gateway
) -> None:
    server = RedisServer(tmp_path, extra=["--timeout", "1"]).start()  # closes a client idle for 1 s
    try:
        r = server.client()
        worker = start_worker(url=server.url, wait=False)
        gateway, base = start_gateway(url=server.url)
        wait_for(lambda: live_worker_ids(r, "fake"), 60, "the worker to report healthy")
        body = {"model": "fake", "prompt": [{"role": "user", "content": "after a quiet spell"}], "max_new_tokens": 5}
        for k in range(1, 3):
            status, parts = stream(base, body)
            assert (status, parts[-1]["error_code"]) == (200, 0)
            assert parts[-1]["text"] == expected_text("after a quiet spell", 5)
            # The gateway's pub/sub connection went quiet after the publisher's: once Redis closed it, no idle
            # script connection (the publisher's) is left either; the renewals' stays busy.
            gateway.wait_log("idle pub/sub connection closed", 20, count=k)
            idle = lambda: [c["idle"] for c in r.client_list() if c["cmd"] == "evalsha" and int(c["idle"]) > 1]  # noqa: E731
            wait_for(lambda: not idle(), 10, "Redis to close the idle script connections")  # noqa: B023
        assert "publish failed" not in worker.log(), worker.log()[-2000:]
        assert worker.alive and gateway.alive
    finally:
        server.kill()


def test_a_gateway_pointed_at_a_replica_says_so(  # type: ignore[no-untyped-def]
    tmp_path: Path, own_redis: RedisServer, start_worker, start_gateway
) -> None:
    replica = RedisServer(tmp_path / "replica", extra=["--replicaof", "127.0.0.1", str(own_redis.port)])
    replica.directory.mkdir()
    replica.start()
    try:
        start_worker(url=own_redis.url, wait=False)  # on the primary; the replica's copy admits the request
        wait_for(lambda: live_worker_ids(replica.client(), "fake"), 60, "the worker's health on the replica")
        gateway, base = start_gateway(url=replica.url)
        body = {"model": "fake", "prompt": [{"role": "user", "content": "on a replica"}], "max_new_tokens": 3}
        status, parts = stream(base, body)
        assert (status, parts[-1]["error_code"]) == (500, 50001)
        assert parts[-1]["text"].startswith(
            "Redis refused a write: the server is a read-only replica (a failover in progress?) (You can't write"
        ), parts[-1]["text"]
        assert gateway.alive
    finally:
        replica.kill()
