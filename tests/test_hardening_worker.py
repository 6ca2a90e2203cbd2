"""Issue N, worker side: each test reproduces one class of defect found by adversarial testing against a real
redis-server and real worker processes, and pins the fixed outcome."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
from pathlib import Path

import pytest
import redis

from broker_worker.protocol import submission
from broker_worker.protocol.connections import async_redis
from broker_worker.protocol.errors import ErrorCode, JobError
from broker_worker.protocol.jobs import JobStore
from broker_worker.protocol.messages import Delta, Done, Job, Usage
from tests.helpers import Proc, RedisServer, events, job, submit, text_of, wait_for, wait_terminal
from tests.test_worker import expected_text, owner_pid

GOOD = job("good", question="still serving", tokens=5)


def dead_reasons(r: redis.Redis) -> list[str]:
    return [f["reason"] for _, f in r.xrange("ivl:dead")]


def serves_next_job(r: redis.Redis, worker: Proc) -> None:
    submit(r, GOOD)
    assert text_of(wait_terminal(r, "good", 30)) == expected_text("still serving", 5)
    assert worker.alive, worker.log()[-2000:]


def test_non_utf8_entry_is_dead_lettered_and_worker_keeps_serving(r: redis.Redis, start_worker) -> None:  # type: ignore[no-untyped-def]
    worker = start_worker(lease_s=1.0)
    r.xadd("ivl:jobs:fake", {"job": b'{"id":"p1","model":"fake","prompt":[{"role":"user","content":"\xff\xfe"}]}'})
    r.xadd("ivl:jobs:fake", {b"\xff": b"\xfe"})  # the field name too
    wait_for(lambda: len(dead_reasons(r)) == 2, 20, "both entries dead-lettered")
    assert [reason.split(" (")[0] for reason in dead_reasons(r)] == ["job is not UTF-8", "no 'job' field"]
    failed = wait_terminal(r, "p1", 10)[-1]
    assert (failed["type"], failed["error_code"]) == ("failed", ErrorCode.VALIDATION_TYPE_ERROR)
    serves_next_job(r, worker)
    assert r.xpending("ivl:jobs:fake", "workers")["pending"] == 0


def test_deeply_nested_json_is_dead_lettered_not_redelivered(r: redis.Redis, start_worker) -> None:  # type: ignore[no-untyped-def]
    worker = start_worker(lease_s=1.0)
    deep = '{"id":"deep","model":"fake","prompt":' + "[" * 200_000 + "]" * 200_000 + "}"
    r.xadd("ivl:jobs:fake", {"job": deep})
    wait_for(lambda: dead_reasons(r), 20, "the entry dead-lettered")
    assert dead_reasons(r)[0].startswith("invalid job")
    serves_next_job(r, worker)
    assert r.xlen("ivl:jobs:fake") == 0 and len(dead_reasons(r)) == 1  # acked once, never redelivered


def test_entry_at_the_end_of_the_id_space_does_not_brick_the_queue(r: redis.Redis, start_worker) -> None:  # type: ignore[no-untyped-def]
    last_id = f"{2**64 - 1}-{2**64 - 1}"
    r.xadd("ivl:jobs:fake", {"job": json.dumps(job("z", tokens=1))}, id=last_id)
    with pytest.raises(redis.ResponseError, match="exhausted"):  # the queue is bricked before a worker sees it
        r.xadd("ivl:jobs:fake", {"job": json.dumps(job("blocked"))})
    worker = start_worker()
    wait_for(lambda: dead_reasons(r), 20, "the entry dead-lettered")
    assert dead_reasons(r) == ["entry ID at the end of the ID space"]
    wait_for(lambda: not r.xrange("ivl:jobs:fake", last_id, last_id), 10, "the entry removed")
    serves_next_job(r, worker)  # XADD '*' and the group's delivery work again


def test_republished_event_after_a_timeout_is_applied_once(redis_server: RedisServer, r: redis.Redis) -> None:
    """A publish re-sent by the client after a socket timeout (the first one ran during a stall) must not append the
    same delta twice: the script checks the seq the caller expects."""

    async def scenario() -> list[int]:
        client = async_redis(redis_server.url)
        store = JobStore(client)
        decision = await store.start("stall", "1-0", "tok", "w", 0)
        seqs = [await store.publish("stall", "tok", Delta(text="abc"), decision.seq + 1) for _ in range(2)]
        seqs.append(await store.publish("stall", "tok", Delta(text="def"), decision.seq + 2))
        done = Done(finish_reason="stop", usage=Usage())
        seqs += [await store.publish("stall", "tok", done, decision.seq + 3) for _ in range(2)]
        await client.aclose()
        return seqs

    assert asyncio.run(scenario()) == [1, 1, 2, 3, 3]
    assert [(e["seq"], e.get("text")) for e in events(r, "stall")] == [(1, "abc"), (2, "def"), (3, None)]


def test_redis_stall_longer_than_the_socket_timeout_repeats_no_text(tmp_path: Path, procs: list[Proc]) -> None:
    from tests.helpers import live_worker_ids, spawn, worker_args

    server = RedisServer(tmp_path, extra=["--enable-debug-command", "yes"]).start()
    try:
        r = redis.Redis.from_url(server.url, decode_responses=True, socket_timeout=60)  # outlasts the stall
        worker = spawn("worker", worker_args(server.url, delay=0.02), tmp_path)
        procs.append(worker)
        wait_for(lambda: live_worker_ids(r, "fake"), 60, "worker up")
        submit(r, job("stall", question="stall", tokens=700))
        wait_for(lambda: len(events(r, "stall")) > 3, 30, "job under way")
        connections = r.info("stats")["total_connections_received"]
        with socket.create_connection(("127.0.0.1", server.port)) as stall:
            stall.sendall(b"DEBUG SLEEP 11\r\n")  # longer than the worker's 10 s socket timeout
            evs = wait_terminal(r, "stall", 120)
        # the stall hit: the worker's connection timed out mid-command and redis-py re-sent it on a new one
        assert r.info("stats")["total_connections_received"] >= connections + 2  # (+1 is the stalling one)
        assert [e["seq"] for e in evs] == list(range(1, len(evs) + 1))
        assert text_of(evs) == expected_text("stall", 700)
    finally:
        server.kill()


def test_frozen_worker_that_reclaims_its_own_job_does_not_lose_it(r: redis.Redis, start_worker) -> None:  # type: ignore[no-untyped-def]
    worker = start_worker(delay=0.02, lease_s=1.5)
    submit(r, job("self", question="freeze", tokens=300))
    wait_for(lambda: len(text_of(events(r, "self"))) > 30, 20, "the job to be under way")
    entry = r.hget("ivl:job:{self}:state", "entry")
    worker.signal(signal.SIGSTOP)
    wait_for(
        lambda: r.xpending_range("ivl:jobs:fake", "workers", entry, entry, 1)[0]["time_since_delivered"] > 2500,
        20,
        "the lease to lapse while frozen",
    )
    worker.signal(signal.SIGCONT)
    delivered = lambda: r.xpending_range("ivl:jobs:fake", "workers", entry, entry, 1)  # noqa: E731
    wait_for(lambda: not delivered() or delivered()[0]["times_delivered"] >= 2, 20, "its own take-over pass")
    evs = wait_terminal(r, "self", 60)
    assert evs[-1]["type"] == "done"
    assert text_of(evs) == expected_text("freeze", 300)
    assert [e["type"] for e in evs].count("started") == 1  # one freeze cost no second run at all
    assert r.hget("ivl:job:{self}:state", "attempts") == "1"


def _blocked_on_the_job_stream(r: redis.Redis) -> bool:
    return any(c["cmd"] == "xreadgroup" and "b" in c["flags"] for c in r.client_list())


def test_a_job_delivered_while_its_worker_is_frozen_runs_once(r: redis.Redis, start_worker) -> None:  # type: ignore[no-untyped-def]
    """Redis hands a new entry to the frozen worker's pending XREADGROUP; thawed, the worker reads it idle past the
    lease, and its next take-over pass is due (its clock jumped): that pass must not claim it a second time."""
    worker = start_worker(delay=0.01, lease_s=1.0)
    for _ in range(20):  # the worker's wait lasts 1 s: freeze it inside one, then queue the job
        wait_for(lambda: _blocked_on_the_job_stream(r), 10, "the worker waiting for new entries")
        worker.signal(signal.SIGSTOP)
        if _blocked_on_the_job_stream(r):
            submit(r, job("thaw", question="thawed", tokens=5))
            break
        worker.signal(signal.SIGCONT)  # its wait ended as it froze; try the next one
    else:
        pytest.fail("never froze the worker inside a wait")
    try:
        pending = lambda: r.xpending_range("ivl:jobs:fake", "workers", "-", "+", 1)  # noqa: E731
        wait_for(lambda: pending() and pending()[0]["time_since_delivered"] > 1500, 20, "the lease to lapse")
    finally:
        worker.signal(signal.SIGCONT)
    evs = wait_terminal(r, "thaw", 30)
    assert text_of(evs) == expected_text("thawed", 5)
    assert [e["type"] for e in evs].count("started") == 1
    assert worker.log().count("job thaw received") == 1, worker.log()[-2000:]
    assert r.hget("ivl:job:{thaw}:state", "attempts") == "1"
    wait_for(lambda: r.xlen("ivl:jobs:fake") == 0, 10, "the entry finished")


def test_a_hung_engine_hands_its_job_back_and_the_worker_exits_3(r: redis.Redis, start_worker) -> None:  # type: ignore[no-untyped-def]
    """``hang:``: two tokens, then the engine's thread never returns and ignores cancel (a stuck CUDA kernel)."""
    hung = start_worker(delay=0.02, lease_s=8.0, extra=["--stall-timeout-s", "1"])
    submit(r, job("stuck", question="hang: forever", tokens=8))
    two = "".join(token + " " for token in expected_text("hang: forever", 8).split()[:2])
    wait_for(lambda: text_of(events(r, "stuck")) == two, 20, "its two tokens")
    healthy = start_worker(delay=0.02, lease_s=8.0)  # only now: the first run is the hung worker's
    wait_for(lambda: not hung.alive, 60, "the hung worker to exit")
    assert hung.popen.returncode == 3, hung.log()[-2000:]
    assert "engine stalled (" in hung.log()  # no text from it, nor from the worker as a whole
    assert "job stuck handed back: its engine stalled; another worker resumes it" in hung.log()
    evs = wait_terminal(r, "stuck", 30)
    assert text_of(evs) == expected_text("hang: forever", 8)  # resumed after the two tokens: nothing repeated
    assert [e["resumed"] for e in evs if e["type"] == "started"] == [False, True]
    assert owner_pid(evs) == healthy.popen.pid
    assert r.hget("ivl:job:{stuck}:state", "attempts") == "1"  # handed back, not failed


def test_dead_workers_job_is_taken_over_on_a_busy_fleet(r: redis.Redis, start_worker) -> None:  # type: ignore[no-untyped-def]
    """XAUTOCLAIM with COUNT = free slots examines 10 x COUNT pending entries per call: the take-over pass must
    walk the whole pending list (cursor kept), not rescan its head, where a live worker's entries sit."""
    busy = start_worker(delay=0.05, lease_s=1.5, slots=11)
    for k in range(11):
        submit(r, job(f"long{k}", question=f"long {k}", tokens=2000))
    wait_for(lambda: all(events(r, f"long{k}") for k in range(11)), 30, "11 jobs filling the busy worker")
    doomed = start_worker(delay=0.05, lease_s=1.5, slots=1)
    submit(r, job("x", question="orphan", tokens=60))  # its entry is behind the busy worker's 11 in the PEL
    wait_for(lambda: events(r, "x"), 30, "x on the second worker")
    assert owner_pid(events(r, "x")) == doomed.popen.pid
    doomed.signal(signal.SIGKILL)
    r.set("ivl:job:{long0}:cancel", 1, ex=60)  # one slot frees: 10 live entries are still ahead of x
    evs = wait_terminal(r, "x", 60)
    assert [e["resumed"] for e in evs if e["type"] == "started"] == [False, True]
    assert owner_pid(evs) == busy.popen.pid
    assert text_of(evs) == expected_text("orphan", 60)


def test_handed_back_job_goes_before_the_backlog(r: redis.Redis, start_worker) -> None:  # type: ignore[no-untyped-def]
    leaving = start_worker(delay=0.02, slots=1)
    submit(r, job("handed", question="hand back", tokens=150))
    wait_for(lambda: events(r, "handed"), 20, "the job on the first worker")
    staying = start_worker(delay=0.02, slots=1)
    submit(r, job("blocker", question="blocker", tokens=60))
    wait_for(lambda: events(r, "blocker"), 20, "the second worker busy")
    for k in range(4):
        submit(r, job(f"backlog{k}", tokens=60))
    leaving.signal(signal.SIGTERM)
    assert leaving.popen.wait(30) == 0
    assert "handed back on shutdown" in leaving.log()
    evs = wait_terminal(r, "handed", 60)
    assert text_of(evs) == expected_text("hand back", 150)
    resumed_at = next(i for i, f in r.xrange("ivl:job:{handed}:events") if '"resumed":true' in f["e"])
    first_backlog = r.xrange("ivl:job:{backlog0}:events", count=1)
    assert owner_pid(evs) == staying.popen.pid
    assert not first_backlog or resumed_at < first_backlog[0][0]  # the hand-back ran before any backlog job


def test_entry_deleted_while_pending_is_dead_lettered(r: redis.Redis, start_worker) -> None:  # type: ignore[no-untyped-def]
    a = start_worker(delay=0.05, lease_s=1.5, slots=1)
    submit(r, job("gone", tokens=500))
    wait_for(lambda: events(r, "gone"), 20, "the job under way")
    entry = r.hget("ivl:job:{gone}:state", "entry")
    r.xdel("ivl:jobs:fake", entry)  # an operator's XDEL / XTRIM
    a.signal(signal.SIGKILL)
    start_worker(delay=0.01, lease_s=1.5)
    wait_for(lambda: dead_reasons(r), 20, "the deleted entry reported")
    assert dead_reasons(r) == ["entry deleted from the job stream while pending"]
    assert json.loads(r.xrange("ivl:dead")[0][1]["letter"])["entry_id"] == entry
    assert r.xpending("ivl:jobs:fake", "workers")["pending"] == 0


def test_queue_limit_is_atomic_under_a_burst(redis_server: RedisServer, r: redis.Redis) -> None:
    async def burst() -> list[str | JobError]:
        client = async_redis(redis_server.url)
        store = JobStore(client)

        async def one(k: int) -> str | JobError:
            try:
                return await store.submit(Job.model_validate(job(f"b{k}")), max_queue=5)
            except JobError as exc:
                return exc

        results = await asyncio.gather(*(one(k) for k in range(100)))
        await client.aclose()
        return list(results)

    results = asyncio.run(burst())
    refused = [x for x in results if isinstance(x, JobError)]
    assert len(results) - len(refused) == 5 and r.xlen("ivl:jobs:fake") == 5
    assert {e.code for e in refused} == {ErrorCode.ENGINE_OVERLOADED}
    assert len(r.keys("ivl:job:*:state")) == 5  # a refused job leaves no 'queued' marker behind


def test_resubmitting_a_finished_id_neither_extends_it_nor_bricks_it(r: redis.Redis, start_worker) -> None:  # type: ignore[no-untyped-def]
    start_worker(extra=["--job-ttl-s", "100"])
    submit(r, job("again", tokens=4))
    wait_terminal(r, "again", 20)
    ttl = r.ttl("ivl:job:{again}:state")
    assert 0 < ttl <= 100

    async def resubmit() -> None:
        client = async_redis(_url(r))
        await submission.submit(client, Job.model_validate(job("again", tokens=4)))
        await client.aclose()

    asyncio.run(resubmit())
    wait_for(lambda: r.xlen("ivl:jobs:fake") == 0, 20, "the duplicate entry acked")
    assert r.ttl("ivl:job:{again}:state") <= ttl  # a re-submission does not keep the id alive
    assert [e["type"] for e in events(r, "again")].count("started") == 1
    r.delete("ivl:job:{again}:events")  # the replay expired: nobody can read the outcome any more
    asyncio.run(resubmit())
    evs = wait_terminal(r, "again", 20)
    assert (evs[0]["seq"], evs[0]["type"], evs[0]["resumed"]) == (1, "started", False)  # a new job: it ran again
    assert evs[-1]["type"] == "done" and text_of(evs) == expected_text("hello", 4)


def _url(r: redis.Redis) -> str:
    kwargs = r.connection_pool.connection_kwargs
    return f"redis://{kwargs['host']}:{kwargs['port']}/0"
