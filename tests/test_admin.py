"""``broker-admin`` against a real redis-server and real fake-engine worker processes: each command's output and
exit status (drain is in test_admin_drain.py)."""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from broker_worker.model.fake_engine import fake_tokens
from broker_worker.protocol.messages import Job
from tests.admin_helpers import DEAD, admin, dead_letter_by_kill, letter_for, letters, status_of
from tests.helpers import ROOT, RedisServer, events, free_port, job, live_worker_ids, submit, wait_for, wait_terminal


def answer(question: str, tokens: int) -> str:
    spec = {"model": "m", "max_new_tokens": tokens, "prompt": [{"role": "user", "content": question}]}
    return "".join(fake_tokens(Job.model_validate(spec)))


def test_console_script_is_registered() -> None:
    scripts = (ROOT / "pyproject.toml").read_text().split("[project.scripts]\n", 1)[1].split("\n\n", 1)[0]
    assert 'broker-admin = "broker_worker.admin:main"' in scripts.splitlines()


def test_status_shows_queue_and_workers(start_worker, redis_server: RedisServer, r: redis.Redis) -> None:  # type: ignore[no-untyped-def]
    start_worker(model="slow", delay=0.2, slots=1)
    start_worker(model="idle")
    for i in range(3):
        submit(r, job(f"s{i}", model="slow", tokens=200))
    wait_for(lambda: status_of(r, "s0") == "running", 30, "the first job to start")
    ids = live_worker_ids(r, "slow")

    def reported() -> dict[str, Any] | None:
        out = admin(redis_server.url, "status", "--json").json
        slow = next(w for w in out["workers"] if w["model"] == "slow")
        return out if slow["slots_used"] == 1 else None  # the heartbeat after the start

    out = wait_for(reported, 30, "the worker's heartbeat to count its running job")
    models = {m["model"]: m for m in out["models"]}
    assert set(models) == {"slow", "idle"}
    assert (models["slow"]["queued"], models["slow"]["running"], models["slow"]["workers"]) == (2, 1, 1)
    assert models["slow"]["oldest_waiting_s"] >= 0 and models["idle"]["oldest_waiting_s"] is None
    assert (models["slow"]["slots_used"], models["slow"]["slots"]) == (1, 1)
    worker = next(w for w in out["workers"] if w["model"] == "slow")
    assert worker["worker_id"] == ids[0] and worker["device"] == "fake" and worker["draining"] is False
    text = admin(redis_server.url, "status")
    assert text.rc == 0 and ids[0] in text.out and "OLDEST WAIT" in text.out


def test_job_shows_a_finished_job_and_unknown_ids_exit_1(
    start_worker, redis_server: RedisServer, r: redis.Redis
) -> None:  # type: ignore[no-untyped-def]
    start_worker(delay=0.001)
    submit(r, job("done-1", question="what now", tokens=7))
    wait_terminal(r, "done-1")
    result = admin(redis_server.url, "job", "done-1", "--json")
    view = result.json
    assert result.rc == 0
    assert (view["status"], view["attempts"], view["text"]) == ("done", 1, answer("what now", 7))
    assert view["outcome"]["type"] == "done" and view["outcome"]["usage"]["completion_tokens"] == 7
    assert view["events"] == len(events(r, "done-1"))
    assert view["queued_ms"] <= view["started_ms"] <= view["finished_ms"]
    assert "status    done" in admin(redis_server.url, "job", "done-1").out
    unknown = admin(redis_server.url, "--json", "job", "no-such-job")
    assert unknown.rc == 1 and unknown.json["error"] == "unknown job 'no-such-job' (or it expired)"
    assert admin(redis_server.url, "job", "no-such-job").rc == 1


def test_requeue_runs_a_dead_lettered_job_again_under_its_id(
    start_worker, redis_server: RedisServer, r: redis.Redis
) -> None:  # type: ignore[no-untyped-def]
    dead_id, _ = dead_letter_by_kill(r, start_worker, job("again-1", question="run me twice", tokens=15))
    listed = admin(redis_server.url, "dead", "list", "--json").json
    assert [(d["id"], d["job_id"], d["model"], d["cannot_run"]) for d in listed] == [(dead_id, "again-1", "fake", "")]
    assert listed[0]["reason"] == "job failed on 1 deliveries (limit 1); dead-lettered"
    shown = admin(redis_server.url, "dead", "show", dead_id, "--json").json
    assert json.loads(shown["fields"]["job"])["id"] == "again-1"
    assert status_of(r, "again-1") == "failed"

    result = admin(redis_server.url, "dead", "requeue", dead_id)
    assert result.rc == 0 and result.out.startswith("job again-1 requeued on ivl:jobs:fake as "), result.err
    evs = wait_terminal(r, "again-1")
    assert [e["seq"] for e in evs] == list(range(1, len(evs) + 1))  # a fresh replay: the old one was deleted
    assert evs[0] == {"seq": 1, "type": "started", "worker": evs[0]["worker"], "resumed": False}
    assert evs[-1]["type"] == "done" and "".join(e.get("text", "") for e in evs) == answer("run me twice", 15)
    assert r.hget("ivl:job:{again-1}:state", "attempts") == "1"  # a fresh attempt count
    assert letters(r) == []  # the letter is gone: a second requeue cannot queue the job twice
    again = admin(redis_server.url, "dead", "requeue", dead_id)
    assert again.rc == 1 and f"no dead letter '{dead_id}'" in again.err


def test_a_garbage_letter_cannot_be_requeued(start_worker, redis_server: RedisServer, r: redis.Redis) -> None:  # type: ignore[no-untyped-def]
    start_worker()
    r.xadd("ivl:jobs:fake", {"job": "garbage {not json"})
    r.xadd("ivl:jobs:fake", {"something": "else"})
    wait_for(lambda: r.xlen(DEAD) == 2, 30, "two dead letters")
    (first, _), (second, _) = letters(r)
    result = admin(redis_server.url, "dead", "requeue", first, second, "--json")
    assert result.rc == 3
    messages = [o["message"] for o in result.json["results"]]
    assert messages[0].startswith(f"dead letter {first}: cannot run: invalid job: : Invalid JSON")
    assert messages[1] == f"dead letter {second}: cannot run: no 'job' field (fields: ['something'])"
    assert r.xlen(DEAD) == 2  # left as they were
    listed = admin(redis_server.url, "dead", "list").out
    assert "RUNNABLE" in listed and "garbage" not in listed  # the reason is shown, not the entry
    assert admin(redis_server.url, "dead", "requeue", "--all", "--json").json["results"] == []


def test_a_letter_cut_short_says_so(start_worker, redis_server: RedisServer, r: redis.Redis) -> None:  # type: ignore[no-untyped-def]
    """Dead letters keep 4096 characters per field: a job with an image is cut, and cannot run from the letter."""
    long_job = job("long-1", question="x" * 5000)
    dead_id, _ = dead_letter_by_kill(r, start_worker, long_job)
    result = admin(redis_server.url, "dead", "requeue", dead_id)
    assert result.rc == 3
    assert result.err.strip() == (
        f"dead letter {dead_id}: cannot run: the dead letter kept only the first 4096 characters of the job"
    )


def test_requeue_all_and_purge(start_worker, redis_server: RedisServer, r: redis.Redis) -> None:  # type: ignore[no-untyped-def]
    old_id = f"{int(time.time() * 1000) - 3 * 3600 * 1000}-0"  # a letter written three hours ago
    r.xadd(DEAD, {"letter": "{}", "reason": "from three hours ago"}, id=old_id)
    dead_id, _ = dead_letter_by_kill(r, start_worker, job("all-1", tokens=5))
    r.xadd("ivl:jobs:fake", {"job": "[]"})
    wait_for(lambda: r.xlen(DEAD) == 3, 30, "the garbage letter")
    garbage_id = next(i for i, _ in letters(r) if i not in (dead_id, old_id))
    result = admin(redis_server.url, "--json", "dead", "requeue", "--all")
    assert result.rc == 0 and [o["job_id"] for o in result.json["results"]] == ["all-1"]
    assert wait_terminal(r, "all-1")[-1]["type"] == "done"
    assert admin(redis_server.url, "dead", "purge", "--older-than", "2h", "--json").json == {"purged": 1}
    assert [i for i, _ in letters(r)] == [garbage_id]
    assert admin(redis_server.url, "dead", "purge", "--older-than", "soon").rc == 2
    assert admin(redis_server.url, "dead", "purge").out.strip() == "purged 1 dead letter(s)"
    assert r.xlen(DEAD) == 0 and letter_for(r, "all-1") is None


def test_cancel(start_worker, redis_server: RedisServer, r: redis.Redis) -> None:  # type: ignore[no-untyped-def]
    start_worker(delay=0.05)
    submit(r, job("c-1", tokens=400))
    wait_for(lambda: status_of(r, "c-1") == "running", 30, "the job to start")
    result = admin(redis_server.url, "cancel", "c-1")
    assert result.rc == 0 and result.out.strip() == "job c-1 (running): cancel requested"
    assert wait_terminal(r, "c-1")[-1]["type"] == "cancelled"
    ended = admin(redis_server.url, "cancel", "c-1")
    assert ended.rc == 3 and "already ended cancelled" in ended.err
    unknown = admin(redis_server.url, "cancel", "c-2", "--json")
    assert unknown.rc == 1 and unknown.json["results"][0]["code"] == 1 and r.exists("ivl:job:{c-2}:cancel") == 0
    assert admin(redis_server.url, "cancel", "c-2", "--force").rc == 0
    submit(r, job("c-2"))  # a plain XADD: no state until a worker takes it, then it is cancelled before start
    assert [e["type"] for e in wait_terminal(r, "c-2")] == ["cancelled"]


def test_failures_by_error_code(start_worker, redis_server: RedisServer, r: redis.Redis) -> None:  # type: ignore[no-untyped-def]
    start_worker(delay=0.001)
    submit(r, job("f-1", question="fail: on purpose"))
    submit(r, job("f-2", max_new_tokens=-5))  # invalid: dead-lettered and failed with 40001
    submit(r, job("f-3", deadline_ms=1))
    submit(r, job("ok-1"))
    for job_id in ("f-1", "f-2", "f-3", "ok-1"):
        wait_terminal(r, job_id)
    out = admin(redis_server.url, "failures", "--json").json
    assert out["by_error_code"] == {"40001": 1, "50001": 1, "50006": 1}
    assert sorted(f["job_id"] for f in out["recent"]) == ["f-1", "f-2", "f-3"]
    assert "fake engine asked to fail" in admin(redis_server.url, "failures").out


def test_unreachable_redis_exits_4() -> None:
    result = admin(f"redis://:hunter2@127.0.0.1:{free_port()}/0", "status", "--json")
    assert result.rc == 4 and result.json["exit_code"] == 4
    assert "is unreachable" in result.json["error"] and "hunter2" not in result.out + result.err


def test_every_url_form(start_worker, redis_server: RedisServer, r: redis.Redis) -> None:  # type: ignore[no-untyped-def]
    """AUTH/ACL in the URL (the TLS and Sentinel forms go through the same connections module: test_security,
    test_connections)."""
    r.acl_setuser("ops", enabled=True, passwords=["+s3cret"], keys=["*"], channels=["*"], commands=["+@all"])
    try:
        url = redis_server.url_for("ops", "s3cret")
        start_worker(model="acl", url=url)
        out = admin(url, "status", "--json")
        assert out.rc == 0 and [w["model"] for w in out.json["workers"]] == ["acl"]
        denied = admin(redis_server.url_for("ops", "wrong"), "status")
        assert denied.rc == 4 and "s3cret" not in denied.err and "wrong" not in denied.err
    finally:
        r.acl_deluser("ops")
