"""``broker-admin drain``: through Redis, a worker stops taking jobs, finishes or hands back its running ones (as
on SIGTERM) and exits by itself; the jobs it had are completed by the other worker, nothing lost."""

from __future__ import annotations

import json

import redis

from tests.admin_helpers import admin
from tests.helpers import RedisServer, job, live_worker_ids, submit, wait_for, wait_terminal
from tests.test_admin import answer


def health(r: redis.Redis, worker_id: str) -> dict[str, object]:
    raw = r.get(f"ivl:worker:{worker_id}")
    return json.loads(raw) if raw else {}  # type: ignore[arg-type]


def test_drain_under_load_loses_nothing(start_worker, redis_server: RedisServer, r: redis.Redis) -> None:  # type: ignore[no-untyped-def]
    drained = start_worker(delay=0.05)
    victim = live_worker_ids(r, "fake")[0]
    jobs = [job(f"d-{i}", question=f"question {i}", tokens=100) for i in range(10)]
    for j in jobs:
        submit(r, j)
    wait_for(lambda: health(r, victim).get("running") == 5, 30, "the worker to fill its 5 slots")
    start_worker(delay=0.05)  # takes the 5 queued jobs, then the handed-back ones
    result = admin(redis_server.url, "drain", victim, "--wait", "60", "--json")
    assert result.rc == 0 and result.json["exited"] == [victim], result.out + result.err
    assert drained.popen.wait(10) == 0  # it exited by itself, cleanly
    log = drained.log()
    assert f"worker {victim} drain requested through Redis" in log and "handed back on shutdown" in log
    resumed = 0
    for j in jobs:
        evs = wait_terminal(r, j["id"])
        assert evs[-1]["type"] == "done", evs[-1]
        assert "".join(e.get("text", "") for e in evs) == answer(j["prompt"][0]["content"], 100)
        resumed += sum(1 for e in evs if e["type"] == "started" and e["resumed"])
    assert resumed >= 1  # the drained worker's running jobs were handed back and resumed, not restarted
    assert victim not in live_worker_ids(r, "fake")


def test_drain_of_an_idle_worker(start_worker, redis_server: RedisServer, r: redis.Redis) -> None:  # type: ignore[no-untyped-def]
    """The heartbeat asks the worker to stop while a Redis command of its own is in flight: the worker must still
    exit (the cancel of that command can be swallowed by redis-py's asyncio client on Python 3.11)."""
    worker = start_worker()
    worker_id = live_worker_ids(r, "fake")[0]
    assert admin(redis_server.url, "drain", worker_id).rc == 0
    assert r.exists(f"ivl:worker:{worker_id}:drain") == 1
    wait_for(lambda: not worker.alive, 20, "the drained worker to exit")
    assert worker.popen.returncode == 0
    unknown = admin(redis_server.url, "drain", worker_id)
    assert unknown.rc == 1 and unknown.err.strip() == f"no live worker '{worker_id}' (see broker-admin status)"
