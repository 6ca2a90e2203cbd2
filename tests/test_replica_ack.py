"""``--min-replicas-ack N``: a submission waits (``WAIT``, on the connection that queued the job) until N replicas
have the job; a job they did not acknowledge in time is reported (log line, metric) and still runs. A primary and
a replica (``--replicaof``) started here; the replica is frozen (SIGSTOP) for the shortfall."""

from __future__ import annotations

import json
import logging
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from broker_worker.protocol import constants as c
from broker_worker.protocol.client import AsyncClient, Client
from broker_worker.protocol.connections import async_redis
from broker_worker.protocol.messages import Job
from broker_worker.protocol.replica_ack import ReplicaAck
from tests.helpers import Proc, RedisServer, png_b64, served_models, spawn, spawn_gateway, wait_for, worker_args
from tests.test_reliability import expected

ACK_LOGGER = "broker_worker.protocol.replica_ack"


@dataclass
class Pair:
    primary: RedisServer
    replica: RedisServer

    def freeze_replica(self) -> None:
        assert self.replica.proc is not None
        self.replica.proc.send_signal(signal.SIGSTOP)

    def thaw_replica(self) -> None:
        assert self.replica.proc is not None
        self.replica.proc.send_signal(signal.SIGCONT)

    def wait_calls(self) -> int:
        return int(self.primary.client().info("commandstats").get("cmdstat_wait", {}).get("calls", 0))


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    primary = RedisServer(tmp_path).start()
    replica = RedisServer(tmp_path, extra=["--replicaof", "127.0.0.1", str(primary.port)])
    started = Pair(primary, replica)
    try:
        replica.start()
        # online as the primary sees it (a replica that just synced is online only after its first ACK)
        wait_for(lambda: primary.client().info("replication").get("slave0", {}).get("state") == "online", 30, "replica")
        yield started
    finally:
        if replica.proc is not None:
            started.thaw_replica()
        replica.kill()
        primary.kill()


def job(job_id: str, tokens: int = 5) -> Job:
    prompt = [{"role": "user", "content": f"ack {job_id}"}]
    return Job.model_validate({"id": job_id, "model": "fake", "max_new_tokens": tokens, "prompt": prompt})


async def test_a_queued_job_is_on_the_replica_when_submit_returns(pair: Pair) -> None:
    client = AsyncClient(async_redis(pair.primary.url), replica_ack=ReplicaAck(1, 10.0))
    try:
        await client.submit(job("acked"))
    finally:
        await client.close()
    assert client.replica_ack.short == 0
    assert pair.wait_calls() == 1  # one WAIT after both writes of the submission (marker, entry)
    on_replica = pair.replica.client()
    assert on_replica.xlen(c.job_stream("fake")) == 1
    assert on_replica.hget(c.job_state_key("acked"), "status") == "queued"


async def test_a_job_the_frozen_replica_does_not_acknowledge_is_reported_and_stays_queued(
    pair: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    client = AsyncClient(async_redis(pair.primary.url), replica_ack=ReplicaAck(1, 0.3))
    pair.freeze_replica()
    try:
        with caplog.at_level(logging.WARNING, logger=ACK_LOGGER):
            await client.submit(job("unacked"))
    finally:
        await client.close()
    assert client.replica_ack.short == 1
    assert [r.getMessage() for r in caplog.records if r.name == ACK_LOGGER] == [
        "job unacked queued but acknowledged by 0 of 1 replicas within 0.3 s: a failover now could lose it"
    ]
    assert pair.primary.client().xlen(c.job_stream("fake")) == 1  # queued all the same


def test_the_blocking_client_waits_on_the_connection_that_queued(pair: Pair, caplog: pytest.LogCaptureFixture) -> None:
    client = Client(pair.primary.url, min_replicas_ack=1, replica_ack_timeout_s=0.3)
    try:
        assert client.submit(job("blocking-acked"))
        assert client.replica_ack.short == 0
        assert pair.replica.client().xlen(c.job_stream("fake")) == 1
        pair.freeze_replica()  # the connection wrote before: a WAIT on any other one would count the old write
        with caplog.at_level(logging.WARNING, logger=ACK_LOGGER):
            assert client.submit(job("blocking-unacked"))
    finally:
        client.close()
    assert client.replica_ack.short == 1
    assert [r.getMessage() for r in caplog.records if r.name == ACK_LOGGER] == [
        "job blocking-unacked queued but acknowledged by 0 of 1 replicas within 0.3 s: a failover now could lose it"
    ]
    assert pair.primary.client().xlen(c.job_stream("fake")) == 2


def test_the_gateway_counts_and_logs_an_unacknowledged_job_which_still_completes(
    pair: Pair, tmp_path: Path, procs: list[Proc]
) -> None:
    procs.append(spawn("worker", worker_args(pair.primary.url, delay=0.001), tmp_path))
    gateway, base = spawn_gateway(
        pair.primary.url, tmp_path, "--min-replicas-ack", "1", "--replica-ack-timeout-s", "0.5"
    )
    procs.append(gateway)
    wait_for(lambda: served_models(base) == ["fake"], 60, "worker and gateway")

    def request(content: str, images: list[str]) -> tuple[str, list[dict[str, object]]]:
        prompt = [{"role": "user", "content": content, "image": images}]
        payload = {"model": "fake", "prompt": prompt, "max_new_tokens": 8}
        response = httpx.post(base + "/worker_generate_stream", json=payload, timeout=60)
        assert response.status_code == 200, response.text
        return response.headers["X-Job-Id"], [json.loads(p) for p in response.content.split(b"\0") if p.strip()]

    _, chunks = request("acknowledged", [png_b64(seed=1)])
    assert chunks[-1]["error_code"] == 0 and chunks[-1]["text"] == expected("acknowledged", 8)
    assert unreplicated(base) == {}
    pair.freeze_replica()
    job_id, chunks = request("not acknowledged", [png_b64(seed=2)])
    assert chunks[-1]["error_code"] == 0 and chunks[-1]["text"] == expected("not acknowledged", 8)
    assert unreplicated(base) == {"job": 1.0, "images": 1.0}
    lines = [line for line in gateway.log().splitlines() if "acknowledged by" in line]
    assert [line.split(f"{ACK_LOGGER}: ", 1)[-1] for line in lines] == [
        f"images of job {job_id} stored but acknowledged by 0 of 1 replicas within 0.5 s: a failover now could lose it",
        f"job {job_id} queued but acknowledged by 0 of 1 replicas within 0.5 s: a failover now could lose it",
    ]


def unreplicated(base: str) -> dict[str, float]:
    """``gateway_unreplicated_writes_total`` of model fake, by ``what``."""
    found = {}
    for line in httpx.get(base + "/metrics", timeout=5).text.splitlines():
        if line.startswith('gateway_unreplicated_writes_total{model="fake",what="'):
            what = line.split('what="', 1)[1].split('"', 1)[0]
            found[what] = float(line.rsplit(" ", 1)[1])
    return found
