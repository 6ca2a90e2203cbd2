"""Redis Cluster (issue G): a real 6-node cluster (3 masters, 3 replicas) started here, reached through
``redis+cluster://``; a plain URL to one of its nodes refused; job channels sharded on the node owning the job's
slot; a master killed under load. The failover test kills a node, so it runs last in this module."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from redis.cluster import RedisCluster

from broker_worker.protocol import constants as c
from broker_worker.protocol.client import AsyncClient
from broker_worker.protocol.cluster_pubsub import ClusterSubscriber
from broker_worker.protocol.connections import async_redis
from broker_worker.protocol.errors import ErrorCode, JobError
from broker_worker.protocol.jobs import JobStore
from broker_worker.protocol.messages import Delta, Job
from broker_worker.protocol.replica_ack import ReplicaAck
from broker_worker.protocol.states import Ownership
from tests.helpers import BIN, Proc, RedisServer, free_port, served_models, spawn, spawn_gateway, wait_for, worker_args
from tests.test_reliability import consistent, expected

pytestmark = pytest.mark.skipif(shutil.which("redis-cli") is None, reason="redis-cli builds the cluster")


@dataclass
class Cluster:
    directory: Path
    ports: list[int] = field(default_factory=list)
    procs: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports[:3]) + "/"

    def node(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, decode_responses=True, socket_timeout=5)

    def start(self) -> Cluster:
        for _ in range(6):
            port, bus = free_port(), free_port()
            d = self.directory / str(port)
            d.mkdir()
            cmd = ["redis-server", "--port", str(port), "--cluster-port", str(bus), "--bind", "127.0.0.1"]
            cmd += ["--cluster-enabled", "yes", "--cluster-config-file", str(d / "nodes.conf")]
            cmd += ["--cluster-node-timeout", "2000", "--save", "", "--appendonly", "no", "--dir", str(d)]
            self.procs[port] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.ports.append(port)
        for port in self.ports:
            wait_for(lambda p=port: self._pings(p), 10, f"cluster node {port}")
        create = ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports)]
        subprocess.run([*create, "--cluster-replicas", "1", "--cluster-yes"], check=True, capture_output=True)
        wait_for(self.settled, 60, "3 masters with an in-sync replica each, cluster_state:ok")
        return self

    def _pings(self, port: int) -> bool:
        try:
            return bool(self.node(port).ping())
        except redis.RedisError:
            return False

    def live(self) -> list[int]:
        return [p for p, proc in self.procs.items() if proc.poll() is None]

    def roles(self) -> dict[int, str]:
        return {p: str(self.node(p).execute_command("ROLE")[0]) for p in self.live()}

    def settled(self) -> bool:
        for port in self.live():
            if "cluster_state:ok" not in self.node(port).execute_command("CLUSTER", "INFO"):
                return False
        roles = self.roles()
        return sorted(roles.values()) == ["master"] * 3 + ["slave"] * 3 and all(
            self.node(p).info("replication")["master_link_status"] == "up" for p, r in roles.items() if r == "slave"
        )

    def owner(self, key: str) -> int:
        """Port of the master serving the key's slot, as a live master's CLUSTER SLOTS says."""
        master = next(p for p, role in self.roles().items() if role == "master")
        slot = self.node(master).cluster("KEYSLOT", key)
        for lo, hi, primary, *_ in self.node(master).execute_command("CLUSTER", "SLOTS"):
            if lo <= slot <= hi:
                return int(primary[1])
        raise AssertionError(f"no node serves slot {slot}")

    def replica_of(self, master: int) -> int:
        return next(p for p in self.live() if self.node(p).execute_command("ROLE")[1:3] == ["127.0.0.1", master])

    def wait_calls(self, port: int) -> int:
        return int(self.node(port).info("commandstats").get("cmdstat_wait", {}).get("calls", 0))

    def client(self) -> RedisCluster:
        return RedisCluster(host="127.0.0.1", port=self.live()[0], decode_responses=True, socket_timeout=5)

    def kill(self, port: int) -> None:
        self.procs[port].kill()
        self.procs[port].wait()

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    started = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        yield started.start()
    finally:
        started.stop()


def start_serving(cluster: Cluster, tmp_path: Path, procs: list[Proc], *gateway_args: str) -> str:
    """Two fake-engine workers and a gateway on the cluster URL; the gateway's base URL once it lists the model."""
    for k in range(2):
        procs.append(spawn(f"worker{k}", worker_args(cluster.url, delay=0.02, slots=20), tmp_path))
    gateway, base = spawn_gateway(cluster.url, tmp_path, *gateway_args)
    procs.append(gateway)

    def ready() -> bool:
        assert all(p.alive for p in procs), [p.log()[-2000:] for p in procs]
        return served_models(base) == ["fake"]

    wait_for(ready, 60, "workers and gateway on the cluster")
    return base


def stream(base: str, question: str, tokens: int, timeout: float = 90) -> tuple[int, list[dict[str, Any]]]:
    payload = {"model": "fake", "prompt": [{"role": "user", "content": question}], "max_new_tokens": tokens}
    response = httpx.post(base + "/worker_generate_stream", json=payload, timeout=timeout)
    return response.status_code, [json.loads(p) for p in response.content.split(b"\0") if p.strip()]


def test_gateway_and_two_workers_serve_through_a_cluster_url(
    cluster: Cluster, tmp_path: Path, procs: list[Proc]
) -> None:
    base = start_serving(cluster, tmp_path, procs)
    results: dict[int, tuple[int, list[dict[str, Any]]]] = {}

    def one(k: int) -> None:
        results[k] = stream(base, f"cluster question {k}", 30)

    threads = [threading.Thread(target=one, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for k in range(8):
        status, chunks = results[k]
        assert status == 200 and chunks[-1]["error_code"] == 0, chunks[-1:]
        assert consistent(chunks) and chunks[-1]["text"] == expected(f"cluster question {k}", 30)
    admin = cluster.client()
    try:  # the queue is where the documented name says, on the master serving its slot, and it was drained
        stream_owner = cluster.owner(c.job_stream("fake"))
        assert cluster.node(stream_owner).type(c.job_stream("fake")) == "stream"
        assert admin.xlen(c.job_stream("fake")) == 0
        workers = admin.zrangebyscore(c.WORKERS_INDEX, int(time.time() * 1000), "+inf")
        assert len(workers) == 2
        # every event went out with SPUBLISH on its job's node; a PUBLISH would be broadcast to every node
        stats = [cluster.node(p).info("commandstats") for p in cluster.live()]
        assert sum(s.get("cmdstat_spublish", {}).get("calls", 0) for s in stats) >= 8 * 3
        assert [s["cmdstat_publish"] for s in stats if "cmdstat_publish" in s] == []
    finally:
        admin.close()


async def test_job_channels_are_sharded_on_the_node_owning_the_job_slot(cluster: Cluster) -> None:
    client = async_redis(cluster.url)
    subscriber = ClusterSubscriber(client)  # type: ignore[arg-type]
    admin = cluster.client()
    try:
        ids = [f"shard-{k}" for k in range(12)]
        subscriptions = [subscriber.open(c.job_channel(i)) for i in ids]
        assert all([await s.confirmed(10) for s in subscriptions])
        owners = {i: cluster.owner(c.job_channel(i)) for i in ids}
        assert len(set(owners.values())) == 3  # the ids spread over every master: each was reached
        for i in ids:
            for port, role in cluster.roles().items():
                if role == "master":  # subscribed on its owner, and nowhere else
                    numsub = cluster.node(port).execute_command("PUBSUB", "SHARDNUMSUB", c.job_channel(i))[1]
                    assert numsub == (1 if port == owners[i] else 0), (i, port, owners[i])
            assert admin.spublish(c.job_channel(i), f"event of {i}") == 1
        for i, s in zip(ids, subscriptions, strict=True):
            assert await asyncio.wait_for(s.queue.get(), 10) == f"event of {i}"
        for s in subscriptions:
            s.close()
        for _ in range(400):  # every shard channel released, on every node
            numsub = [cluster.node(p).execute_command("PUBSUB", "SHARDCHANNELS") for p in cluster.live()]
            if subscriber.settled and subscriber.channels == 0 and not any(numsub):
                break
            await asyncio.sleep(0.025)
        assert subscriber.channels == 0 and not any(numsub), numsub
    finally:
        await subscriber.close()
        await client.aclose()
        admin.close()


async def test_commands_past_the_connection_bound_wait_instead_of_failing(cluster: Cluster) -> None:
    """redis-py's asyncio cluster client raises MaxConnectionsError when a node's connections are all busy; a
    gateway renewing many readers at once (one script call each on a cluster) hit it. They wait instead."""
    client = async_redis(cluster.url, max_connections=4)
    try:
        keys = [f"bound-{k}" for k in range(300)]
        await asyncio.gather(*(client.set(k, k, ex=60) for k in keys))
        assert await asyncio.gather(*(client.get(k) for k in keys)) == keys
    finally:
        await client.aclose()


async def test_a_worker_renews_runs_on_every_node_at_once(cluster: Cluster) -> None:
    """``JobStore.renew_many`` on a cluster: each job's keys have their own slot, so one call each, in parallel;
    each answer its own (owned, taken over, cancelled)."""
    client = async_redis(cluster.url)
    admin = cluster.client()
    try:
        store = JobStore(client)
        ids = [f"renew-{k}" for k in range(9)]
        for k, i in enumerate(ids):
            await store.start(i, f"{k + 1}-0", f"token-{k}", "worker-a", 0)
        assert len({cluster.owner(c.job_state_key(i)) for i in ids}) == 3  # every master holds some
        await store.start(ids[1], "2-0", "token-new", "worker-b", 0)
        admin.set(c.job_cancel_key(ids[2]), 1)
        states = await store.renew_many([(i, f"token-{k}") for k, i in enumerate(ids)])
        assert states == [Ownership.OWNED, Ownership.TAKEN_OVER, Ownership.OWNED_BUT_CANCELLED] + [Ownership.OWNED] * 6
    finally:
        await client.aclose()
        admin.close()


@pytest.mark.parametrize("program", ["broker-worker", "broker-gateway"])
def test_a_plain_url_to_a_cluster_node_is_refused_with_one_line(cluster: Cluster, program: str) -> None:
    stream_owner = cluster.owner(c.job_stream("fake"))
    other = next(p for p, role in cluster.roles().items() if role == "master" and p != stream_owner)
    for port in (stream_owner, other):  # where the first commands would succeed, and where they get MOVED
        url = f"redis://127.0.0.1:{port}/0"
        args = [str(BIN / program), *(["run", "--fake-engine"] if program == "broker-worker" else [])]
        args += ["--redis-url", url, *(["--port", str(free_port())] if program == "broker-gateway" else [])]
        done = subprocess.run(args, capture_output=True, text=True, timeout=60)
        lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
        assert done.returncode != 0
        assert lines[-1] == (
            f"{program}: {url} reaches a Redis Cluster node: use redis+cluster://host:port[,host:port...] "
            "(rediss+cluster:// for TLS) so that every node's keys are reached"
        )
        assert "Traceback" not in done.stdout + done.stderr


async def test_a_submission_waits_for_the_replicas_of_each_node_it_wrote(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """``--min-replicas-ack``: a WAIT on the node of the job's keys and on the node of the model's stream, each
    after its write on the same connection; the entry is on the stream owner's replica when submit returns."""
    stream_owner = cluster.owner(c.job_stream("fake"))
    replica = cluster.replica_of(stream_owner)
    job_id = next(f"acked-{k}" for k in range(100) if cluster.owner(c.job_state_key(f"acked-{k}")) != stream_owner)
    state_owner = cluster.owner(c.job_state_key(job_id))
    before = {p: cluster.wait_calls(p) for p in (stream_owner, state_owner)}
    client = AsyncClient(async_redis(cluster.url), replica_ack=ReplicaAck(1, 10.0))
    reader = redis.Redis(port=replica, decode_responses=True, single_connection_client=True)
    try:
        reader.execute_command("READONLY")
        await client.submit(Job.model_validate({"id": job_id, "model": "fake", "max_new_tokens": 3, "prompt": PROMPT}))
        assert json.loads(reader.xrange(c.job_stream("fake"))[-1][1]["job"])["id"] == job_id
        assert client.replica_ack.short == 0
        assert {p: cluster.wait_calls(p) - n for p, n in before.items()} == {stream_owner: 1, state_owner: 1}
        client.replica_ack.timeout_s = 0.5
        os.kill(cluster.procs[replica].pid, signal.SIGSTOP)  # its master's WAIT cannot be acknowledged now
        try:
            with caplog.at_level(logging.WARNING, logger="broker_worker.protocol.replica_ack"):
                job = {"id": "unacked", "model": "fake", "max_new_tokens": 3, "prompt": PROMPT}
                await client.submit(Job.model_validate(job))
        finally:
            os.kill(cluster.procs[replica].pid, signal.SIGCONT)
        assert client.replica_ack.short == 1
        assert caplog.messages == [
            "job unacked queued but acknowledged by 0 of 1 replicas within 0.5 s: a failover now could lose it"
        ]
    finally:
        reader.close()
        await client.close()


def test_killing_the_master_of_the_job_stream_under_20_streams(
    cluster: Cluster, tmp_path: Path, procs: list[Proc]
) -> None:
    """With ``--min-replicas-ack 1``: every request accepted before the kill completes."""
    base = start_serving(cluster, tmp_path, procs, "--min-replicas-ack", "1")
    victim = cluster.owner(c.job_stream("fake"))
    streams_survive(base, 20, lambda: cluster.kill(victim), accepted_complete=True)
    wait_for(lambda: cluster.owner(c.job_stream("fake")) != victim, 30, "a replica promoted")
    new_request_succeeds(base)


def streams_survive(base: str, n: int, kill: Callable[[], None], accepted_complete: bool = False) -> None:
    """``n`` streams through the gateway; ``kill`` once 5 are under way; every one ends within 60 s, complete
    with the expected text or with a typed error after text that never rewound. ``accepted_complete``: every
    request accepted (its response begun: the job was queued) before the kill completes."""
    results: dict[int, tuple[int, list[dict[str, Any]]] | str] = {}
    started: set[int] = set()
    accepted: set[int] = set()

    def one(k: int) -> None:
        payload = {"model": "fake", "prompt": [{"role": "user", "content": f"failover {k}"}], "max_new_tokens": 300}
        try:
            with httpx.stream("POST", base + "/worker_generate_stream", json=payload, timeout=60) as response:
                accepted.add(k)
                body = b""
                for data in response.iter_bytes():
                    body += data
                    if b"\0" in body:
                        started.add(k)
                chunks = [json.loads(p) for p in body.split(b"\0") if p.strip()]
                results[k] = (response.status_code, chunks)
        except httpx.HTTPError as exc:
            results[k] = f"{type(exc).__name__}: {exc}"

    threads = [threading.Thread(target=one, args=(k,), daemon=True) for k in range(n)]
    for t in threads:
        t.start()
    wait_for(lambda: len(started) >= 5, 60, "streams under way")
    accepted_before = set(accepted)
    kill()
    killed_at = time.monotonic()
    for t in threads:  # every stream ends within 60 s of the kill: none hangs
        t.join(max(0.1, killed_at + 60 - time.monotonic()))
    assert not [k for k, t in enumerate(threads) if t.is_alive()], "streams still open 60 s after the kill"
    for k in range(n):
        result = results[k]
        assert not isinstance(result, str), f"stream {k}: {result}"
        status, chunks = result
        assert chunks and all("error_code" in chunk for chunk in chunks), (status, chunks[-1:])
        if chunks[-1]["error_code"] == 0:
            assert status == 200 and consistent(chunks) and chunks[-1]["text"] == expected(f"failover {k}", 300)
        else:  # a typed error after text that never rewound (a 5xx carries a code too)
            assert consistent(chunks[:-1]), chunks
            assert not (accepted_complete and k in accepted_before), (
                f"stream {k} accepted before the kill: {chunks[-1]}"
            )


def new_request_succeeds(base: str) -> None:
    """A new request succeeds within 30 s, with the expected text."""

    def ok() -> bool:
        try:
            status, chunks = stream(base, "after the failover", 10, timeout=30)
        except httpx.HTTPError:
            return False
        return (
            status == 200 and chunks[-1]["error_code"] == 0 and chunks[-1]["text"] == expected("after the failover", 10)
        )

    wait_for(ok, 30, "a new request to succeed after the failover", step=0.5)


def test_killing_the_sentinel_managed_primary_under_10_streams(tmp_path: Path, procs: list[Proc]) -> None:
    primary, replica = RedisServer(tmp_path).start(), None
    sentinels: list[subprocess.Popen[bytes]] = []
    try:
        replica = RedisServer(tmp_path, extra=["--replicaof", "127.0.0.1", str(primary.port)]).start()
        wait_for(lambda: replica.client().info("replication")["master_link_status"] == "up", 30, "replica in sync")
        ports = [free_port() for _ in range(3)]
        for port in ports:
            conf = tmp_path / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
                f"sentinel monitor ivl 127.0.0.1 {primary.port} 2\nsentinel down-after-milliseconds ivl 1000\n"
                "sentinel failover-timeout ivl 5000\n"
            )
            sentinels.append(subprocess.Popen(["redis-server", str(conf), "--sentinel"], stdout=subprocess.DEVNULL))

        def sentinel_sees_all(port: int) -> bool:
            try:
                info = redis.Redis(port=port, decode_responses=True).sentinel_master("ivl")
            except redis.RedisError:
                return False
            return bool(info["num-slaves"] == 1 and info["num-other-sentinels"] == 2)

        wait_for(lambda: all(sentinel_sees_all(p) for p in ports), 60, "3 sentinels that see primary and replica")
        url = "redis+sentinel://" + ",".join(f"127.0.0.1:{p}" for p in ports) + "/ivl/0"
        procs.append(spawn("worker", worker_args(url, delay=0.02, slots=20), tmp_path))
        gateway, base = spawn_gateway(url, tmp_path, "--min-replicas-ack", "1")
        procs.append(gateway)
        wait_for(lambda: served_models(base) == ["fake"], 60, "worker and gateway through the sentinels")
        streams_survive(base, 10, primary.kill, accepted_complete=True)
        wait_for(lambda: replica.client().execute_command("ROLE")[0] == "master", 30, "the replica promoted")
        new_request_succeeds(base)
    finally:
        for proc in sentinels:
            proc.kill()
            proc.wait()
        primary.kill()
        if replica is not None:
            replica.kill()


#: What a failover that lost the last unreplicated writes leaves: the replay record and the state's seq a few
#: events back, while the job's worker goes on (it numbers its next events from the older seq).
LOSE_LAST_EVENTS = """
local entries = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', ARGV[1])
for _, entry in ipairs(entries) do redis.call('XDEL', KEYS[2], entry[1]) end
redis.call('HINCRBY', KEYS[1], 'seq', -#entries)
return #entries
"""


PROMPT = [{"role": "user", "content": "go on"}]


async def test_a_replay_record_that_goes_back_ends_the_stream_with_a_typed_error(
    redis_server: RedisServer,
    r: redis.Redis,
    start_worker,  # type: ignore[no-untyped-def]
) -> None:
    start_worker(delay=0.05)
    client = AsyncClient(async_redis(redis_server.url))
    job = Job.model_validate({"id": "rewound", "model": "fake", "max_new_tokens": 400, "prompt": PROMPT})
    texts: list[str] = []
    try:
        with pytest.raises(JobError) as caught:
            async for event in client.generate(job):
                if isinstance(event, Delta):
                    texts.append(event.text)
                if len(texts) == 10:
                    keys = [c.job_state_key("rewound"), c.job_events_key("rewound")]
                    assert r.eval(LOSE_LAST_EVENTS, 2, *keys, 5) == 5  # the fault really hit
    finally:
        await client.close()
    assert caught.value.code == ErrorCode.INTERNAL_ERROR
    assert "job rewound lost in a Redis failover: its replay record went back" in caught.value.message
    assert len(texts) >= 10 and "".join(texts) == expected("go on", 400)[: len("".join(texts))]
