"""Priority lanes: interactive jobs go ahead of a batch backlog; the batch lane keeps every guarantee."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

import httpx
import redis
from prometheus_client.parser import text_string_to_metric_families

from broker_worker.job_queue import Entry, wait_new
from broker_worker.lanes import Lanes
from broker_worker.model.fake_engine import fake_tokens
from broker_worker.protocol.connections import async_redis
from broker_worker.protocol.errors import JobError
from broker_worker.protocol.jobs import JobStore
from broker_worker.protocol.messages import Job
from tests.helpers import Proc, RedisServer, events, job, served_models, spawn, text_of, wait_for, wait_terminal

BATCH_STREAM = "ivl:jobs:fake:batch"


def fields(entries: list[Entry]) -> list[str]:
    return [e.fields["job"] for e in entries]


async def test_a_worker_takes_interactive_entries_first_and_batch_ones_when_none_wait(
    r: redis.Redis, redis_server: RedisServer
) -> None:
    client = async_redis(redis_server.url)
    lanes = Lanes(client, "m", "w1", lease_s=60)
    try:
        await lanes.ensure_groups()
        for k in range(3):
            r.xadd("ivl:jobs:m:batch", {"job": f"b{k}"})
        r.xadd("ivl:jobs:m", {"job": "i0"})  # queued after the batch jobs, taken before them
        assert fields(await lanes.take(2, [], False, 10)) == ["i0"]
        assert fields(await lanes.take(2, [], False, 10)) == ["b0", "b1"]
        [b2] = await lanes.take(2, [], False, 10)
        await b2.queue.hand_back(b2.entry_id)  # a batch job handed back: taken over ahead of new batch jobs...
        r.xadd("ivl:jobs:m", {"job": "i1"})
        assert fields(await lanes.take(2, [], True, 10)) == ["i1"]  # ...but after a new interactive one
        again = await lanes.take(2, [], True, 10)
        assert fields(again) == ["b2"] and again[0].reclaimed and again[0].queue.stream == "ivl:jobs:m:batch"
        # Waiting on both streams at once: entries over the free slots (the batch one here) go back.
        b3 = r.xadd("ivl:jobs:m:batch", {"job": "b3"})
        r.xadd("ivl:jobs:m", {"job": "i2"})
        assert fields(await wait_new(lanes.queues, 1, 10)) == ["i2"]
        [pending] = r.xpending_range("ivl:jobs:m:batch", "workers", b3, b3, 1)
        assert pending["time_since_delivered"] >= 10**9 - 60_000  # handed back: the next take-over pass's
        taken = await lanes.take(1, [], True, 10)
        assert fields(taken) == ["b3"] and taken[0].reclaimed
    finally:
        await client.aclose()


def expected_text(question: str, tokens: int) -> str:
    return "".join(fake_tokens(Job.model_validate(job("x", question=question, tokens=tokens))))


def started(r: redis.Redis, job_id: str) -> list[dict[str, Any]]:
    return [e for e in events(r, job_id) if e["type"] == "started"]


def owner(procs: list[Proc], event: dict[str, Any]) -> Proc:
    pid = int(str(event["worker"]).split("-")[-2])
    return next(p for p in procs if p.popen.pid == pid)


def test_the_batch_lane_keeps_take_over_resume_hand_back_dead_letters_and_idempotency(  # type: ignore[no-untyped-def]
    r: redis.Redis, start_worker
) -> None:
    victim = start_worker(delay=0.02, lease_s=2.0)
    r.xadd(BATCH_STREAM, {"job": json.dumps(job("long", question="resume me", tokens=600))})
    wait_for(lambda: len(text_of(events(r, "long"))) > 20, 30, "the batch job under way")
    victim.popen.kill()
    victim.popen.wait()
    others = [start_worker(delay=0.02, lease_s=2.0), start_worker(delay=0.02, lease_s=2.0)]
    r.xadd(BATCH_STREAM, {"job": json.dumps(job("long", question="resume me", tokens=600))})  # the same id again
    r.xadd(BATCH_STREAM, {"job": "garbage"})
    wait_for(lambda: len(started(r, "long")) == 2, 30, "another worker to take the killed worker's job over")
    taker = owner(others, started(r, "long")[1])
    wait_for(lambda: "job long duplicate" in "".join(p.log() for p in others), 30, "the repeated id to be acked")
    taker.signal(signal.SIGTERM)  # grace 1 s, then the job is handed back to the other worker
    evs = wait_terminal(r, "long", 60)
    assert evs[-1]["type"] == "done" and text_of(evs) == expected_text("resume me", 600)
    assert [e["resumed"] for e in evs if e["type"] == "started"] == [False, True, True]
    assert "job long handed back on shutdown" in taker.log()
    assert r.hget("ivl:job:{long}:state", "attempts") == "2"  # the kill counts, the hand-back does not
    wait_for(lambda: r.xlen(BATCH_STREAM) == 0, 10, "the batch stream to drain")
    letters = [json.loads(f["letter"]) for _, f in r.xrange("ivl:dead")]
    assert [(d["stream"], d["fields"]) for d in letters] == [(BATCH_STREAM, {"job": "garbage"})]


async def test_the_queue_limit_counts_each_lane_atomically(r: redis.Redis, redis_server: RedisServer) -> None:
    client = async_redis(redis_server.url)
    store = JobStore(client)

    def one(k: int, priority: str) -> Job:
        return Job.model_validate(job(f"lim-{priority}-{k}", model="nobody") | {"priority": priority})

    try:
        tries = [store.submit(one(k, "batch"), max_queue=3) for k in range(8)]
        results = await asyncio.gather(*tries, return_exceptions=True)
        refused = [x for x in results if isinstance(x, JobError)]
        assert len(refused) == 5 and r.xlen("ivl:jobs:nobody:batch") == 3
        assert refused[0].message.startswith("3 batch jobs are queued or running for 'nobody' (limit 3)")
        await store.submit(one(0, "interactive"), max_queue=3)  # the batch backlog does not fill the other lane
        assert r.xlen("ivl:jobs:nobody") == 1
    finally:
        await client.aclose()


def ms(entry_id: str) -> int:
    return int(entry_id.split("-")[0])


def run_span(r: redis.Redis, job_id: str) -> tuple[int, int, int]:
    """(queued, started, ended) in Redis milliseconds: the stream entry's id, the started and terminal events'."""
    ids = {json.loads(f["e"])["type"]: i for i, f in r.xrange(f"ivl:job:{{{job_id}}}:events")}
    return ms(r.hget(f"ivl:job:{{{job_id}}}:state", "entry") or "0-0"), ms(ids["started"]), ms(ids["done"])


def test_interactive_requests_go_ahead_of_300_waiting_batch_jobs(  # type: ignore[no-untyped-def]
    r: redis.Redis, redis_server: RedisServer, start_worker, start_gateway, tmp_path: Path, procs: list[Proc]
) -> None:
    slots = 2
    start_worker(delay=0.01, slots=slots)
    _, base = start_gateway()
    wait_for(lambda: served_models(base) == ["fake"], 30, "the gateway to list the worker")
    body = {"model": "fake", "messages": [{"role": "user", "content": "batch question"}], "max_tokens": 10}
    request = {"method": "POST", "url": "/v1/chat/completions", "body": body}
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"custom_id": f"b{k}"} | request) + "\n" for k in range(300)))
    args = ["run", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"), "--max-in-flight", "300"]
    submitter = spawn("batch", [sys.executable, "-m", "broker_batch", *args, "--redis-url", redis_server.url], tmp_path)
    procs.append(submitter)
    wait_for(lambda: r.xlen(BATCH_STREAM) >= 250, 30, "the batch backlog")
    health = httpx.get(base + "/health").json()
    assert health["batch_queues"]["fake"] >= 250 and health["queues"]["fake"] == 0
    assert httpx.post(base + "/worker_get_status").json()["batch_queue_length"] >= 250
    depth = {f.name: f for f in text_string_to_metric_families(httpx.get(base + "/metrics").text)}
    assert depth["broker_batch_queue_depth"].samples[0].value >= 250
    interactive, backlog = [], []
    for k in range(10):  # one at a time: each finds every slot busy with batch jobs and 200+ of them waiting
        backlog.append(r.xlen(BATCH_STREAM))
        with httpx.stream("POST", base + "/worker_generate_stream", json=_payload(k), timeout=120) as response:
            chunks = [json.loads(p) for p in response.read().split(b"\0") if p.strip()]
            interactive.append(response.headers["X-Job-Id"])
        assert chunks[-1]["error_code"] == 0 and chunks[-1]["text"] == expected_text(f"interactive {k}", 10)
    assert submitter.popen.wait(120) == 0  # and the batch still finished
    out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(out) == 300 and all(o["response"]["status_code"] == 200 for o in out)
    batch = [run_span(r, k.split("{")[1].split("}")[0]) for k in r.scan_iter("ivl:job:{batch-*}:state")]
    assert len(batch) == 300
    for job_id in interactive:
        queued, start, _ = run_span(r, job_id)
        # From the events: while it waited, each slot ended at most one batch job (it waited at most one job
        # duration) and no batch job started, bar those a take already under way when it arrived picked up.
        ended_meanwhile = sum(queued < end < start for _, _, end in batch)
        started_meanwhile = sum(queued < begin < start for _, begin, _ in batch)
        assert ended_meanwhile <= slots and started_meanwhile <= slots, (job_id, ended_meanwhile, started_meanwhile)
    assert min(backlog) > 100, backlog  # and there was a backlog to go ahead of, for every request


def _payload(k: int) -> dict[str, Any]:
    return {"model": "fake", "prompt": [{"role": "user", "content": f"interactive {k}"}], "max_new_tokens": 10}
