"""``cluster``: what one Redis node carries, to size a Redis Cluster (issue G), measured against real redis-servers.

- ``publish``: the publish path (``lua/publish.lua``: HGET x2, EXISTS, HINCRBY, XADD to the replay record,
  SPUBLISH to the job's shard channel) driven at full speed through the real ``JobStore.publish`` and the real
  cluster client (``redis+cluster://``) against a one-node cluster (``--cluster-enabled yes``, every slot on it),
  with one subscriber connection ``SSUBSCRIBE``\\d to every job's channel and reading (as a gateway's is). The
  clients run in their own processes, so they do not share the measured process's CPU accounting. The node's
  main-thread CPU per event (``INFO cpu`` deltas) gives the events/s one node carries (Redis runs commands on one
  thread), and from it the nodes needed for N streams at 20 events/s, at 70% utilisation.
- ``images``: Redis bytes written by the submissions of a 5-turn chat with 3 images (one new image in each of the
  first three turns), each turn re-sending every earlier image as InternVL's streamlit_demo does: inline base64
  in the job (before) vs images by reference (the gateway's ``store_images``, then the job). Bytes written: the
  replication stream (``master_repl_offset``: what replicas and the AOF receive) and the bytes clients sent
  (``total_net_input_bytes``); the job stream entry's size (its ``job`` field) per turn.

Alone: ``python -m bench.cluster [--seconds 8] [--jobs 96]`` (updates bench/results.json, other keys kept).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import math
import multiprocessing
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis

from broker_worker.protocol import constants as c
from broker_worker.protocol.connections import async_redis
from broker_worker.protocol.image_refs import store_images
from broker_worker.protocol.jobs import JobStore
from broker_worker.protocol.messages import Delta, Job

if TYPE_CHECKING:
    from tests.helpers import RedisServer

RESULTS = Path(__file__).resolve().parent / "results.json"
EVENTS_PER_STREAM_S = 20  # one event per token at 20 tokens/s
UTILISATION = 0.7
CLIENT_PROCESSES = 2


# --- publish path ------------------------------------------------------------------------------------------


def one_node_cluster(workdir: Path) -> RedisServer:
    """A redis-server in cluster mode that serves every slot itself."""
    from tests.helpers import RedisServer, free_port, wait_for

    d = workdir / "cluster-node"
    d.mkdir(exist_ok=True)
    extra = ["--cluster-enabled", "yes", "--cluster-config-file", str(d / "nodes.conf")]
    server = RedisServer(d, extra=[*extra, "--cluster-port", str(free_port())]).start()
    admin = server.client()
    admin.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
    wait_for(lambda: "cluster_state:ok" in admin.execute_command("CLUSTER", "INFO"), 30, "cluster_state:ok")
    return server


def main_thread_cpu_s(r: redis.Redis) -> float:
    cpu = r.info("cpu")
    return float(cpu["used_cpu_user_main_thread"]) + float(cpu["used_cpu_sys_main_thread"])


async def start_jobs(store: JobStore, ids: list[str]) -> str:
    """Take each job for a run as a worker does (``start``): the fencing token its publishes must carry."""
    token = uuid.uuid4().hex
    now = int(time.time() * 1000)
    await asyncio.gather(*(store.start(i, "1-0", token, "bench", now) for i in ids))
    return token


async def publish_for(url: str, ids: list[str], token: str, seconds: float) -> int:
    """Publish deltas into each job, one at a time per job (as a worker's job does), until ``seconds`` pass."""
    client = async_redis(url)
    store = JobStore(client)
    deadline = time.monotonic() + seconds
    counts = dict.fromkeys(ids, 0)

    async def job_loop(job_id: str) -> None:
        while time.monotonic() < deadline:
            seq = counts[job_id] + 1
            assert await store.publish(job_id, token, Delta(text="token "), seq) == seq
            counts[job_id] = seq

    try:
        await asyncio.gather(*(job_loop(i) for i in ids))
    finally:
        await client.aclose()
    return sum(counts.values())


def publisher_process(url: str, ids: list[str], token: str, seconds: float, out: multiprocessing.Queue[int]) -> None:
    out.put(asyncio.run(publish_for(url, ids, token, seconds)))


class Subscriber:
    """One connection subscribed to every job's shard channel, reading in a thread (a gateway's pub/sub)."""

    def __init__(self, port: int, ids: list[str]) -> None:
        self.conn = redis.Redis(port=port, socket_timeout=30)
        self.pubsub = self.conn.pubsub()
        for i in ids:  # one channel per SSUBSCRIBE: on a cluster node, one command's channels share a slot
            self.pubsub.ssubscribe(c.job_channel(i))
        self.received = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            message = self.pubsub.get_sharded_message(timeout=0.2)
            if message is not None and message["type"] == "smessage":
                self.received += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.pubsub.close()
        self.conn.close()


def publish_capacity(workdir: Path, jobs: int = 96, seconds: float = 8.0) -> dict[str, Any]:
    server = one_node_cluster(workdir)
    url = f"redis+cluster://127.0.0.1:{server.port}/"
    try:
        ids = [f"bench-pub-{k}" for k in range(jobs)]

        async def prepare() -> str:
            client = async_redis(url)
            try:
                return await start_jobs(JobStore(client), ids)
            finally:
                await client.aclose()

        token = asyncio.run(prepare())
        subscriber = Subscriber(server.port, ids)
        admin = server.client()
        admin.config_resetstat()
        cpu0 = main_thread_cpu_s(admin)
        events = run_publishers(url, ids, token, seconds)
        cpu = main_thread_cpu_s(admin) - cpu0
        time.sleep(0.5)  # the subscriber drains what is in flight
        subscriber.close()
        stats = admin.info("commandstats")
        admin.close()
    finally:
        server.kill()
    return {"cluster": {"publish": sizing(events, cpu, seconds, subscriber.received, stats, jobs)}}


def run_publishers(url: str, ids: list[str], token: str, seconds: float) -> int:
    ctx = multiprocessing.get_context("spawn")
    out: multiprocessing.Queue[int] = ctx.Queue()
    share = [ids[k::CLIENT_PROCESSES] for k in range(CLIENT_PROCESSES)]
    procs = [ctx.Process(target=publisher_process, args=(url, s, token, seconds, out)) for s in share]
    for p in procs:
        p.start()
    events = sum(out.get(timeout=seconds + 60) for _ in procs)
    for p in procs:
        p.join(30)
    return events


def sizing(
    events: int, cpu_s: float, wall_s: float, delivered: int, stats: dict[str, Any], jobs: int
) -> dict[str, Any]:
    """Events/s one node carries (1 / main-thread CPU per event), and the nodes N streams need."""
    per_event_us = cpu_s / events * 1e6
    capacity = 1e6 / per_event_us
    planned_streams = capacity * UTILISATION / EVENTS_PER_STREAM_S
    script = next((v for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_eval")), {})
    return {
        "jobs": jobs,
        "events": events,
        "events_per_s_driven": round(events / wall_s),
        "delivered_to_subscriber": delivered,
        "redis_main_thread_cpu_us_per_event": round(per_event_us, 2),
        "script_us_per_call": round(float(script.get("usec_per_call", 0.0)), 2),
        "events_per_s_per_node": round(capacity),
        "streams_per_node_at_20_events_s": round(capacity / EVENTS_PER_STREAM_S),
        "streams_per_node_planned_70pct": round(planned_streams),
        "nodes_for_10k_streams": math.ceil(10_000 / planned_streams),
        "nodes_for_100k_streams": math.ceil(100_000 / planned_streams),
    }


# --- images: inline vs by reference ----------------------------------------------------------------------


def photo_b64(seed: int, width: int = 1280, height: int = 960) -> str:
    """A JPEG the size of a phone photo's upload (noise over a gradient: it compresses like a photo, badly)."""
    from PIL import Image

    noise = Image.effect_noise((width, height), 24 + seed).convert("RGB")
    gradient = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    buf = io.BytesIO()
    Image.blend(noise, gradient, 0.5).save(buf, format="JPEG", quality=85)
    return base64.b64encode(buf.getvalue()).decode()


def chat_turns(images: list[str], turns: int = 5) -> list[Job]:
    """Each turn's job as InternVL's streamlit_demo sends it: the whole history, every earlier image again."""
    jobs, prompt = [], []
    for t in range(turns):
        new = [images[t]] if t < len(images) else []
        prompt.append({"role": "user", "content": f"question {t + 1}", "image": new})
        jobs.append(Job.model_validate({"id": f"chat-turn-{t + 1}", "model": "bench", "prompt": list(prompt)}))
        prompt.append({"role": "assistant", "content": f"answer {t + 1} " * 40})
    return jobs


async def submit_chat(url: str, jobs: list[Job], by_reference: bool) -> None:
    client = async_redis(url)
    store = JobStore(client)
    try:
        for job in jobs:
            await store.submit(await store_images(client, job) if by_reference else job)
    finally:
        await client.aclose()


def written(server: RedisServer, jobs: list[Job], by_reference: bool) -> dict[str, Any]:
    admin = server.client()
    admin.flushall()
    repl0, net0 = admin.info("replication")["master_repl_offset"], admin.info("stats")["total_net_input_bytes"]
    asyncio.run(submit_chat(server.url, jobs, by_reference))
    repl = admin.info("replication")["master_repl_offset"] - repl0
    net = admin.info("stats")["total_net_input_bytes"] - net0
    entries = [len(fields["job"]) for _, fields in admin.xrange(c.job_stream("bench"))]
    out = {
        "replication_bytes": repl,
        "client_bytes_in": net,
        "job_entry_bytes": entries,
        "job_stream_memory_bytes": admin.memory_usage(c.job_stream("bench")),
    }
    admin.close()
    return out


def image_bytes(workdir: Path) -> dict[str, Any]:
    from tests.helpers import RedisServer, wait_for

    images = [photo_b64(k) for k in range(3)]
    jobs = chat_turns(images)
    # a replica makes the primary keep a replication stream, whose offset counts the bytes written
    server = RedisServer(workdir).start()
    replica = RedisServer(workdir, extra=["--replicaof", "127.0.0.1", str(server.port)]).start()
    try:
        primary = server.client()
        wait_for(lambda: primary.info("replication").get("slave0", {}).get("state") == "online", 30, "replica")
        primary.close()
        inline = written(server, jobs, by_reference=False)
        by_ref = written(server, jobs, by_reference=True)
    finally:
        replica.kill()
        server.kill()
    return {
        "cluster": {
            "images": {
                "image_base64_bytes": [len(i) for i in images],
                "inline": inline,
                "by_reference": by_ref,
                "replication_bytes_ratio": round(inline["replication_bytes"] / by_ref["replication_bytes"], 2),
            }
        }
    }


def measure(workdir: Path, jobs: int = 96, seconds: float = 8.0) -> dict[str, Any]:
    publish = publish_capacity(workdir, jobs, seconds)["cluster"]
    return {"cluster": publish | image_bytes(workdir)["cluster"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=8.0, help="publishing time")
    parser.add_argument(
        "--jobs", type=int, default=96, help="jobs published into at once (the cluster client holds 64 per node)"
    )
    args = parser.parse_args()
    subprocess.run(["redis-server", "--version"], check=True, capture_output=True)
    with tempfile.TemporaryDirectory() as tmp:
        results = measure(Path(tmp), args.jobs, args.seconds)
    print(json.dumps(results, indent=2))
    if RESULTS.exists():
        results = json.loads(RESULTS.read_text()) | results
    RESULTS.write_text(json.dumps(results, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
