"""The worker's mechanics against a real redis-server, with the deterministic fake engine in worker processes."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from broker_worker.model.fake_engine import fake_tokens
from broker_worker.protocol.client import AsyncClient
from broker_worker.protocol.connections import async_redis
from broker_worker.protocol.messages import Job
from tests.helpers import BIN, ROOT, RedisServer, events, job, submit, text_of, wait_for, wait_terminal


def expected_text(question: str, tokens: int) -> str:
    return "".join(fake_tokens(Job.model_validate(job("x", question=question, tokens=tokens))))


def owner_pid(evs: list[dict[str, object]]) -> int:
    started = [e for e in evs if e["type"] == "started"]
    return int(str(started[-1]["worker"]).split("-")[-2])


async def collect(url: str, job_id: str) -> list[dict[str, object]]:
    client = AsyncClient(async_redis(url))
    try:
        return [json.loads(e.model_dump_json()) async for e in client.stream(job_id, idle_timeout_s=60)]
    finally:
        await client.close()


def test_two_workers_share_the_stream(r: redis.Redis, start_worker) -> None:  # type: ignore[no-untyped-def]
    start_worker(delay=0.01)
    start_worker(delay=0.01)
    for k in range(12):
        submit(r, job(f"j{k}", question=f"q{k}", tokens=20))
    results = [wait_terminal(r, f"j{k}") for k in range(12)]
    assert all(evs[-1]["type"] == "done" for evs in results)
    assert [text_of(evs) for evs in results] == [expected_text(f"q{k}", 20) for k in range(12)]
    workers = {e["worker"] for evs in results for e in evs if e["type"] == "started"}
    assert len(workers) == 2
    assert r.xlen("ivl:jobs:fake") == 0  # processed entries are deleted


def test_same_id_runs_once_and_late_subscriber_gets_everything(  # type: ignore[no-untyped-def]
    r: redis.Redis, redis_server: RedisServer, start_worker
) -> None:
    worker = start_worker(delay=0.005)
    submit(r, job("dup", tokens=15))
    submit(r, job("dup", tokens=15))
    first = wait_terminal(r, "dup")
    submit(r, job("dup", tokens=15))
    wait_for(lambda: r.xlen("ivl:jobs:fake") == 0, 10, "duplicates to be acked")
    worker.wait_log("job dup duplicate", count=2)
    assert events(r, "dup") == first
    assert [e["type"] for e in first].count("started") == 1
    late = asyncio.run(collect(redis_server.url, "dup"))
    assert late == first
    assert text_of(late) == expected_text("hello", 15)


def test_cancel_from_plain_redis_stops_within_one_token(r: redis.Redis, start_worker) -> None:  # type: ignore[no-untyped-def]
    worker = start_worker(delay=0.02, extra=["--stream-interval-ms", "0"])
    submit(r, job("c1", tokens=500))
    wait_for(lambda: len(text_of(events(r, "c1")).split()) >= 5, 20, "some tokens")
    # Read the text so far and cancel in one transaction: no publish can fall between the two.
    with r.pipeline(transaction=True) as pipe:
        pipe.xrange("ivl:job:{c1}:events")
        pipe.set("ivl:job:{c1}:cancel", 1, ex=60)
        entries, _ = pipe.execute()
    at_cancel = text_of([json.loads(fields["e"]) for _, fields in entries])
    evs = wait_terminal(r, "c1", 10)
    assert evs[-1]["type"] == "cancelled"
    assert text_of(evs).startswith(at_cancel)
    assert len(text_of(evs).removeprefix(at_cancel).split()) <= 1  # at most the token in flight
    worker.wait_log(r"job c1 cancelled in \d+\.\d\ds")
    assert r.hget("ivl:job:{c1}:state", "status") == "cancelled"


def test_job_past_its_deadline_is_not_run(r: redis.Redis, start_worker) -> None:  # type: ignore[no-untyped-def]
    start_worker()
    submit(r, job("late", deadline_ms=int(time.time() * 1000) - 1000))
    evs = wait_terminal(r, "late")
    assert [e["type"] for e in evs] == ["failed"]
    assert evs[0]["error_code"] == 50006
    assert "deadline" in evs[0]["message"]


def test_cancelled_before_start_never_runs(r: redis.Redis, start_worker) -> None:  # type: ignore[no-untyped-def]
    r.set("ivl:job:{early}:cancel", 1, ex=60)
    start_worker()
    submit(r, job("early"))
    assert [e["type"] for e in wait_terminal(r, "early")] == ["cancelled"]


def test_kill_9_mid_job_resumes_prefix_consistent(  # type: ignore[no-untyped-def]
    r: redis.Redis, redis_server: RedisServer, start_worker
) -> None:
    workers = [start_worker(delay=0.02, lease_s=1.5) for _ in range(2)]
    submit(r, job("k9", question="kill me", tokens=150))
    with ThreadPoolExecutor(1) as pool:  # a live subscriber across the kill, on its own event loop
        seen = pool.submit(asyncio.run, collect(redis_server.url, "k9"))
        wait_for(lambda: len(text_of(events(r, "k9"))) > 40, 20, "the job to be under way")
        victim = owner_pid(events(r, "k9"))
        os.kill(victim, signal.SIGKILL)
        received = seen.result(timeout=60)
    assert received[-1]["type"] == "done"
    assert text_of(received) == expected_text("kill me", 150)  # no restart, no duplicate
    assert [e["seq"] for e in received] == list(range(1, len(received) + 1))
    assert [e["resumed"] for e in received if e["type"] == "started"] == [False, True]
    sent = len(text_of(received[: [e["type"] for e in received].index("started", 1)]))
    survivor = next(w for w in workers if w.popen.pid != victim)
    survivor.wait_log(r"entry \S+ reclaimed from a silent worker")
    survivor.wait_log(rf"job k9 resumed \(queued \d+\.\d\ds, {sent} chars already sent, reclaimed\)")
    survivor.wait_log(r"job k9 done \(150 tokens\) in \d+\.\d\ds")


def test_frozen_worker_is_fenced_after_takeover(r: redis.Redis, start_worker) -> None:  # type: ignore[no-untyped-def]
    a = start_worker(delay=0.02, lease_s=1.5)
    b = start_worker(delay=0.02, lease_s=1.5)
    submit(r, job("frozen", question="freeze", tokens=120))
    wait_for(lambda: len(text_of(events(r, "frozen"))) > 30, 20, "the job to be under way")
    frozen = a if owner_pid(events(r, "frozen")) == a.popen.pid else b
    frozen.signal(signal.SIGSTOP)
    evs = wait_terminal(r, "frozen", 60)
    frozen.signal(signal.SIGCONT)
    frozen.wait_log("job frozen taken over by another worker", 20)
    assert events(r, "frozen") == evs  # nothing published after it woke up
    assert text_of(evs) == expected_text("freeze", 120)
    assert r.hget("ivl:job:{frozen}:state", "attempts") == "2"


def raw(**fields: object) -> dict[str, str]:
    return {"job": json.dumps(fields)}


@pytest.mark.parametrize(
    ("fields", "reason", "told"),
    [
        ({"job": "this is {not json"}, "invalid job", None),
        ({"foo": "bar"}, "no 'job' field", None),
        (
            raw(id="wrong-types", model="fake", prompt="not a list"),
            "prompt: Input should be a valid array",
            "wrong-types",
        ),
        (raw(model="fake", prompt=[{"role": "wizard", "content": "x"}]), "prompt.0.role", None),
        (raw(model="fake", prompt=[{"role": "user", "content": "x"}]), "id: missing", None),
        # ids that break the pattern (a brace would break the {id} hash tag): refused, and nobody to tell
        (raw(id="bad{id}", model="fake", prompt=[{"role": "user"}]), "id: String should match pattern", None),
        (raw(id="x" * 81, model="fake", prompt=[{"role": "user"}]), "id: String should match pattern", None),
        (raw(id="", model="fake", prompt=[{"role": "user"}]), "id: String should match pattern", None),
    ],
)
def test_garbage_is_dead_lettered_and_worker_keeps_serving(  # type: ignore[no-untyped-def]
    r: redis.Redis, start_worker, fields: dict[str, str], reason: str, told: str | None
) -> None:
    worker = start_worker()
    entry = r.xadd("ivl:jobs:fake", fields)
    letters = wait_for(lambda: r.xrange("ivl:dead"), 10, "a dead letter")
    assert reason in letters[0][1]["reason"]
    letter = json.loads(letters[0][1]["letter"])
    assert (letter["stream"], letter["entry_id"], letter["job_id"]) == ("ivl:jobs:fake", entry, told)
    worker.wait_log(rf"entry {entry} dead-lettered: ")
    submit(r, job("after-garbage"))
    assert wait_terminal(r, "after-garbage")[-1]["type"] == "done"
    assert worker.alive
    if told is not None:  # an entry with a valid id: whoever waits on that id is told why nothing comes
        failed = wait_terminal(r, told)[-1]
        assert (failed["type"], failed["error_code"]) == ("failed", 40001)
        assert reason in failed["message"]
    else:
        assert [k for k in r.scan_iter("ivl:job:*") if "after-garbage" not in k] == []


def test_too_many_deliveries_go_to_dead_letter(r: redis.Redis, start_worker) -> None:  # type: ignore[no-untyped-def]
    r.hset("ivl:job:{tired}:state", mapping={"status": "running", "entry": "0-1", "attempts": 3, "owner": "gone"})
    r.xgroup_create("ivl:jobs:fake", "workers", id="0", mkstream=True)
    r.xadd("ivl:jobs:fake", {"job": json.dumps(job("tired"))}, id="0-1")
    r.xreadgroup("workers", "dead-worker", {"ivl:jobs:fake": ">"})  # held by a consumer that never acks
    worker = start_worker(lease_s=0.5)
    evs = wait_terminal(r, "tired", 20)
    assert [e["type"] for e in evs] == ["failed"]  # never run a fourth time
    assert (evs[-1]["error_code"], evs[-1]["message"]) == (50001, "job failed on 3 deliveries (limit 3); dead-lettered")
    letter = json.loads(r.xrange("ivl:dead")[0][1]["letter"])
    assert (letter["job_id"], letter["entry_id"]) == ("tired", "0-1")
    worker.wait_log("entry 0-1 reclaimed from a silent worker")
    worker.wait_log("job tired dead-lettered")
    assert r.hget("ivl:job:{tired}:state", "attempts") == "4"
    assert r.xlen("ivl:jobs:fake") == 0


def test_sigterm_hands_back_and_another_worker_resumes(r: redis.Redis, start_worker) -> None:  # type: ignore[no-untyped-def]
    a = start_worker(delay=0.02)
    b = start_worker(delay=0.02)
    submit(r, job("term", question="sigterm", tokens=200))
    wait_for(lambda: len(text_of(events(r, "term"))) > 30, 20, "the job to be under way")
    owner = a if owner_pid(events(r, "term")) == a.popen.pid else b
    owner.signal(signal.SIGTERM)
    assert owner.popen.wait(30) == 0
    evs = wait_terminal(r, "term", 60)
    assert evs[-1]["type"] == "done"
    assert text_of(evs) == expected_text("sigterm", 200)
    assert [e["resumed"] for e in evs if e["type"] == "started"] == [False, True]
    assert "handed back on shutdown" in owner.log()


def test_sigterm_lets_a_short_job_finish(r: redis.Redis, start_worker) -> None:  # type: ignore[no-untyped-def]
    worker = start_worker(delay=0.01, extra=["--shutdown-grace-s", "20"])
    submit(r, job("short", tokens=80))
    wait_for(lambda: events(r, "short"), 10, "the job to start")
    worker.signal(signal.SIGTERM)
    assert worker.popen.wait(30) == 0
    evs = events(r, "short")
    assert evs[-1]["type"] == "done"
    assert [e["type"] for e in evs].count("started") == 1


def test_nothing_grows_without_bound(r: redis.Redis, start_worker) -> None:  # type: ignore[no-untyped-def]
    start_worker(delay=0.001)
    for k in range(5):
        submit(r, job(f"ok{k}"))
    submit(r, job("bad", question="fail: on purpose"))
    r.xadd("ivl:jobs:fake", {"job": "garbage"})
    r.set("ivl:job:{gone}:cancel", 1, ex=60)
    submit(r, job("gone"))
    for k in range(5):
        wait_terminal(r, f"ok{k}")
    wait_terminal(r, "bad")
    wait_terminal(r, "gone")
    wait_for(lambda: r.xlen("ivl:jobs:fake") == 0, 10, "the job stream to drain")
    for key in r.scan_iter("*"):
        kind, ttl = r.type(key), r.ttl(key)
        if key in ("ivl:jobs:fake", "ivl:jobs:fake:batch", "ivl:dead"):  # one stream per lane
            assert kind == "stream"
            continue
        ceiling = expiry_of(key)
        assert ceiling - 15 <= ttl <= ceiling, f"{key} ({kind}) expires in {ttl}s, not {ceiling}s"
    assert r.xinfo_groups("ivl:jobs:fake")[0]["pending"] == 0


def expiry_of(key: str) -> int:
    """The documented TTL of a key (docs/protocol.md); a health key (10 s) is refreshed every heartbeat."""
    if key.startswith("ivl:worker:"):
        return 10
    if key == "ivl:workers":
        return 31
    if key.endswith(":cancel"):
        return 60  # what this test set
    return 3600


def test_engine_exception_fails_the_job_and_the_worker_keeps_serving(  # type: ignore[no-untyped-def]
    r: redis.Redis, start_worker
) -> None:
    worker = start_worker()
    submit(r, job("boom", question="crash: on purpose"))
    evs = wait_terminal(r, "boom")
    assert [e["type"] for e in evs] == ["started", "failed"]
    assert (evs[-1]["error_code"], evs[-1]["message"]) == (
        50001,
        "RuntimeError: fake engine crashed: crash: on purpose",
    )
    worker.wait_log(r"job boom received \(entry \d+-\d+\)")
    worker.wait_log(r"job boom started \(queued \d+\.\d\ds, 0 chars already sent\)")
    worker.wait_log("job boom crashed in the engine")
    worker.wait_log(r"job boom failed in \d+\.\d\ds")
    assert "Traceback" in worker.log()  # the real error is logged with its stack
    assert r.hget("ivl:job:{boom}:state", "attempts") == "1"  # not retried: not a transient error
    submit(r, job("after-crash", tokens=5))
    assert text_of(wait_terminal(r, "after-crash")) == expected_text("hello", 5)
    assert worker.alive


def test_finish_reason_stop_and_count_only(r: redis.Redis, start_worker) -> None:  # type: ignore[no-untyped-def]
    start_worker()
    submit(r, job("eos", question="eos: a short answer", tokens=20))
    submit(r, job("count", question="count me", count_only=True))
    eos = wait_terminal(r, "eos")
    assert eos[-1]["type"] == "done" and eos[-1]["finish_reason"] == "stop"
    assert eos[-1]["usage"] == {"prompt_tokens": 19, "completion_tokens": 10}
    assert text_of(eos) == "".join(f"t{i}:19 " for i in range(10))  # the model stopped halfway
    count = wait_terminal(r, "count")
    assert [e["type"] for e in count] == ["done"]  # nothing generated, not even a started event
    assert (count[0]["finish_reason"], count[0]["usage"]) == ("stop", {"prompt_tokens": 8, "completion_tokens": 0})


def test_worker_pulls_only_as_many_jobs_as_it_has_free_slots(  # type: ignore[no-untyped-def]
    r: redis.Redis, start_worker
) -> None:
    start_worker(delay=0.05, slots=2)
    with r.pipeline(transaction=True) as pipe:  # all five are there at the worker's first read
        for k in range(5):
            pipe.xadd("ivl:jobs:fake", {"job": json.dumps(job(f"slot{k}", tokens=40))})
        pipe.execute()

    def pending() -> int:
        count = int(r.xinfo_groups("ivl:jobs:fake")[0]["pending"])
        assert count <= 2, f"{count} entries delivered to a worker with 2 slots"
        return count

    wait_for(lambda: pending() == 2, 20, "two jobs taken")
    assert r.xinfo_groups("ivl:jobs:fake")[0]["lag"] == 3  # the other three were not read

    def all_done() -> bool:
        pending()  # and at every poll while the five run
        return all(r.hget(f"ivl:job:{{slot{k}}}:state", "status") == "done" for k in range(5))

    wait_for(all_done, 60, "every job")
    assert [text_of(events(r, f"slot{k}")) for k in range(5)] == [expected_text("hello", 40)] * 5


def test_deltas_are_coalesced_within_the_stream_interval(r: redis.Redis, start_worker) -> None:  # type: ignore[no-untyped-def]
    start_worker(delay=0.005, extra=["--stream-interval-ms", "200"])
    submit(r, job("co", tokens=200))  # one second of tokens, one every 5 ms
    wait_terminal(r, "co")
    entries = [(entry_id, json.loads(f["e"])) for entry_id, f in r.xrange("ivl:job:{co}:events")]
    deltas = [(int(entry_id.split("-")[0]), e) for entry_id, e in entries if e["type"] == "delta"]
    assert text_of([e for _, e in deltas]) == expected_text("hello", 200)
    assert 2 < len(deltas) <= 40  # 200 tokens in a handful of events (about 6; 40 leaves room for a slow machine)
    gaps = [b - a for (a, _), (b, _) in itertools.pairwise(deltas)][:-1]  # the last one flushes at the end
    assert min(gaps) >= 150, gaps  # 200 ms apart by Redis' clock, less the latency of one publish


def test_redis_cli_example_against_two_workers(r: redis.Redis, redis_server: RedisServer, start_worker) -> None:  # type: ignore[no-untyped-def]
    start_worker(delay=0.001)
    start_worker(delay=0.001)
    script = str(ROOT / "examples" / "redis_cli_submit.sh")
    env = {**os.environ, "MAX_NEW_TOKENS": "12"}
    runs = [
        subprocess.run(
            [script, redis_server.url, "fake", f"prompt {k}", f"cli{k}"],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        for k in range(4)
    ]
    assert [p.returncode for p in runs] == [0] * 4, [p.stderr for p in runs]
    assert [p.stdout.strip() for p in runs] == [expected_text(f"prompt {k}", 12).strip() for k in range(4)]
    failed = subprocess.run(
        [script, redis_server.url, "fake", "fail: please"], capture_output=True, text=True, timeout=60
    )
    assert failed.returncode == 1
    assert '"error_code":50001,"message":"fake engine asked to fail: fail: please"' in failed.stderr


def test_redis_cli_example_exit_codes_when_cancelled_or_timed_out(  # type: ignore[no-untyped-def]
    r: redis.Redis, redis_server: RedisServer, start_worker
) -> None:
    start_worker(delay=0.001)
    script = str(ROOT / "examples" / "redis_cli_submit.sh")
    r.set("ivl:job:{cli-cancelled}:cancel", 1, ex=60)
    cancelled = subprocess.run(
        [script, redis_server.url, "fake", "never mind", "cli-cancelled"], capture_output=True, text=True, timeout=60
    )
    assert (cancelled.returncode, cancelled.stderr.splitlines()[-1]) == (2, "cancelled")
    env = {**os.environ, "TIMEOUT_S": "1"}
    nobody = subprocess.run(
        [script, redis_server.url, "nobody", "hello?", "cli-timeout"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert nobody.returncode == 3
    assert nobody.stderr.splitlines()[-1] == "timed out after 1s waiting for job cli-timeout"


def test_check_command(redis_server: RedisServer, r: redis.Redis, start_worker) -> None:  # type: ignore[no-untyped-def]
    cmd = [str(BIN / "broker-worker"), "check", "--redis-url", redis_server.url, "--model", "fake"]
    assert subprocess.run(cmd, capture_output=True, timeout=30).returncode == 1
    start_worker()
    assert subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0


def test_blocking_client(redis_server: RedisServer, r: redis.Redis, start_worker) -> None:  # type: ignore[no-untyped-def]
    from broker_worker.protocol.client import Client

    start_worker(delay=0.001)
    client = Client(redis_server.url)
    try:
        sync_job = Job.model_validate(job("sync-1", question="sync", tokens=7))
        events_seen = list(client.generate(sync_job, timeout_s=30))
        assert [e.type for e in events_seen][-1] == "done"
        assert "".join(e.text for e in events_seen if e.type == "delta") == expected_text("sync", 7)
        assert [w.model for w in client.workers()] == ["fake"]
        assert client.submit(sync_job) is False  # a known id is not queued again
        wait_for(lambda: client.queue_length("fake") == 0, 10, "the entry deleted")  # done is published first
        assert client.submit(Job.model_validate(job("sync-2", model="nobody"))) is True
        assert r.hgetall("ivl:job:{sync-2}:state") == {"status": "queued"}  # a queued id is not an unknown one
    finally:
        client.close()


def test_long_gone_consumers_are_forgotten(r: redis.Redis, start_worker) -> None:  # type: ignore[no-untyped-def]
    r.xgroup_create("ivl:jobs:fake", "workers", id="0", mkstream=True)
    r.xgroup_createconsumer("ivl:jobs:fake", "workers", "ghost-worker")
    r.xgroup_createconsumer("ivl:jobs:fake", "workers", "busy-ghost")
    r.xadd("ivl:jobs:fake", {"job": json.dumps(job("held"))})
    r.xreadgroup("workers", "busy-ghost", {"ivl:jobs:fake": ">"})  # holds an entry: must stay until reclaimed
    start_worker(extra=["--forget-consumers-after-s", "0.2", "--lease-s", "600"])

    def names() -> set[str]:
        return {c["name"] for c in r.xinfo_consumers("ivl:jobs:fake", "workers")}

    wait_for(lambda: "ghost-worker" not in names(), 30, "the idle consumer to be forgotten")
    assert "busy-ghost" in names()


def test_transient_errors_are_retried_then_failed(r: redis.Redis, start_worker) -> None:  # type: ignore[no-untyped-def]
    worker = start_worker()
    submit(r, job("oom", question="oom: please"))
    evs = wait_terminal(r, "oom")
    assert [e["type"] for e in evs] == ["started", "started", "started", "failed"]
    assert (evs[-1]["error_code"], evs[-1]["message"]) == (50002, "fake engine ran out of memory")
    assert r.hget("ivl:job:{oom}:state", "attempts") == "3"
    assert len(re.findall("job oom hit a transient error", worker.log())) == 2
