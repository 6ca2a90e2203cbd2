"""Breaking things on purpose: worker kill -9 and SIGTERM under load, Redis restart, gateway restart."""

from __future__ import annotations

import itertools
import json
import re
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from broker_worker.model.fake_engine import fake_tokens
from broker_worker.protocol.messages import Job
from tests.helpers import (
    Proc,
    RedisServer,
    free_port,
    png_b64,
    served_models,
    spawn,
    spawn_gateway,
    wait_for,
    worker_args,
)

pytestmark = pytest.mark.slow


def app_payload(
    model: str, question: str, tokens: int, image: bool = True, job_id: str | None = None
) -> dict[str, Any]:
    user: dict[str, Any] = {"role": "user", "content": question}
    if image:
        user["image"] = [png_b64(320, 240, len(question))]
    body: dict[str, Any] = {
        "model": model,
        "prompt": [{"role": "system", "content": "Be brief."}, user, {"role": "assistant", "content": None}],
        "temperature": 0.7,
        "top_p": 0.95,
        "max_new_tokens": tokens,
        "max_input_tiles": 6,
        "repetition_penalty": 1.1,
    }
    if job_id:
        body["job_id"] = job_id
    return body


def run_request(base: str, payload: dict[str, Any], timeout: float = 120) -> list[dict[str, Any]]:
    try:
        body = httpx.post(base + "/worker_generate_stream", json=payload, timeout=timeout).content
    except httpx.HTTPError as exc:
        return [{"text": f"transport error {exc!r}", "error_code": -1}]
    return [json.loads(p) for p in body.split(b"\0") if p.strip()]


def consistent(chunks: list[dict[str, Any]]) -> bool:
    texts = [c["text"] for c in chunks]
    return all(b.startswith(a) for a, b in itertools.pairwise(texts))


def expected(question: str, tokens: int) -> str:
    return "".join(
        fake_tokens(
            Job.model_validate(
                {"model": "m", "max_new_tokens": tokens, "prompt": [{"role": "user", "content": question}]}
            )
        )
    )


def many(base: str, payloads: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    with ThreadPoolExecutor(len(payloads)) as pool:
        return list(pool.map(lambda p: run_request(base, p), payloads))


def job_events(r: redis.Redis, job_id: str) -> list[dict[str, Any]]:
    return [json.loads(f["e"]) for _, f in r.xrange(f"ivl:job:{{{job_id}}}:events")]


def split_at_resume(evs: list[dict[str, Any]]) -> tuple[str, str] | None:
    """The text before and after a resumed ``started`` event; None when the job was not resumed."""
    at = next((k for k, e in enumerate(evs) if e["type"] == "started" and e["resumed"]), None)
    if at is None:
        return None
    texts = ["".join(e.get("text", "") for e in part if e["type"] == "delta") for part in (evs[:at], evs[at:])]
    return texts[0], texts[1]


def texts_of_worker(r: redis.Redis, pid: int) -> list[str]:
    """The text so far of every job a worker process started."""
    out = []
    for key in r.scan_iter("ivl:job:*:events"):
        evs = [json.loads(f["e"]) for _, f in r.xrange(key)]
        if any(e["type"] == "started" and e["worker"].split("-")[-2] == str(pid) for e in evs):
            out.append("".join(e.get("text", "") for e in evs if e["type"] == "delta"))
    return out


def test_kill_9_one_of_two_workers_under_20_streams(  # type: ignore[no-untyped-def]
    r: redis.Redis, start_worker, start_gateway, tiny_model: Path
) -> None:
    victim = start_worker(model="tiny-internvl", model_path=tiny_model, lease_s=2.0)
    start_worker(model="tiny-internvl", model_path=tiny_model, lease_s=2.0)
    _, base = start_gateway()
    # Greedy: a worker that restarted a job instead of resuming it would repeat the text already sent.
    payloads = [app_payload("tiny-internvl", f"story {k}", 48) | {"temperature": 0} for k in range(20)]
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(many, base, payloads)
        wait_for(lambda: any(len(t) >= 20 for t in texts_of_worker(r, victim.popen.pid)), 120, "the victim streaming")
        victim.popen.kill()
        results = future.result(timeout=300)
    assert [c[-1]["error_code"] for c in results] == [0] * 20, [c[-1] for c in results if c[-1]["error_code"]]
    assert all(consistent(c) for c in results)
    checked = 0
    for chunks in results:
        evs = job_events(r, chunks[-1]["job_id"])
        assert "".join(e.get("text", "") for e in evs if e["type"] == "delta") == chunks[-1]["text"]
        assert [e["seq"] for e in evs] == list(range(1, len(evs) + 1))
        if (parts := split_at_resume(evs)) is not None and len(parts[0]) >= 20:
            before, after = parts
            assert not after.startswith(before[:20]), (before, after)  # continued, not started over
            checked += 1
    assert checked >= 1  # the killed worker's jobs were taken over and resumed


def test_sigterm_worker_under_load_loses_nothing(start_worker, start_gateway) -> None:  # type: ignore[no-untyped-def]
    a = start_worker(delay=0.02, slots=4)
    b = start_worker(delay=0.02, slots=4)
    _, base = start_gateway()
    payloads = [app_payload("fake", f"term {k}", 200, image=False) for k in range(10)]
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(many, base, payloads)
        a.wait_log(r"job \w+ started", count=2)  # 4 s jobs and a 1 s grace: what runs now must be handed back
        a.signal(signal.SIGTERM)
        results = future.result(timeout=120)
    assert a.popen.wait(30) == 0
    assert [c[-1]["error_code"] for c in results] == [0] * 10
    assert [c[-1]["text"] for c in results] == [expected(f"term {k}", 200) for k in range(10)]
    handed = re.findall(r"job (\w+) handed back on shutdown", a.log())
    assert len(handed) >= 2
    for job_id in handed:  # each was resumed by the other worker, after the text already sent
        b.wait_log(rf"job {job_id} resumed \(queued \d+\.\d\ds, [1-9]\d* chars already sent, reclaimed\)")  # taken over


def streaming_and_queued(r: redis.Redis) -> tuple[int, int]:
    """Jobs with text out, and entries on the fake model's stream (running + waiting)."""
    streaming = sum(
        any(json.loads(f["e"])["type"] == "delta" for _, f in r.xrange(k)) for k in r.keys("ivl:job:*:events")
    )
    return streaming, r.xlen("ivl:jobs:fake")


def test_redis_restart_ends_every_request_and_service_recovers(tmp_path: Path, procs: list[Proc]) -> None:
    server = RedisServer(tmp_path).start()
    try:
        worker = spawn("worker", worker_args(server.url, delay=0.05, lease_s=2.0, slots=4), tmp_path)
        procs.append(worker)
        gateway, base = spawn_gateway(server.url, tmp_path, "--start-timeout-s", "20", "--idle-timeout-s", "20")
        procs.append(gateway)
        wait_for(lambda: served_models(base) == ["fake"], 60, "gateway and worker")
        payloads = [app_payload("fake", f"restart {k}", 400, image=False) for k in range(6)]  # 20 s each
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(many, base, payloads)
            wait_for(lambda: streaming_and_queued(server.client()) == (4, 6), 30, "4 jobs streaming, 2 queued")
            server.kill()
            server.start()
            results = future.result(timeout=90)
        gone = r"job \w+ is gone from Redis \(restarted without persistence\?\); submit it again"
        for chunks in results:  # the running and the queued ones alike
            assert chunks[-1]["error_code"] == 50001, chunks[-1]
            assert re.fullmatch(gone, chunks[-1]["text"]), chunks[-1]
        # Each run logs it when its engine has stopped, which may come after its client got the error.
        fenced = r"job \w+ taken over by another worker"
        wait_for(lambda: len(re.findall(fenced, worker.log())) >= 4, 30, "the 4 runs to stop as fenced")
        assert len(re.findall(fenced, worker.log())) == 4  # its token was gone
        wait_for(lambda: served_models(base) == ["fake"], 30, "the worker to re-register after the restart")
        after = run_request(base, app_payload("fake", "after restart", 5, image=False))
        assert after[-1]["error_code"] == 0 and after[-1]["text"] == expected("after restart", 5)
        # (the gateway set a cancel key for each request that ended without a terminal event: harmless, it expires)
        keys = {k.split("}")[0] for k in server.client().keys("ivl:job:*") if not k.endswith(":cancel")}
        assert keys == {"ivl:job:{" + after[-1]["job_id"]}  # nobody wrote into the lost jobs afterwards
        assert all(p.alive for p in procs)
    finally:
        server.kill()


def test_worker_and_gateway_started_before_redis_serve_once_it_is_up(tmp_path: Path, procs: list[Proc]) -> None:
    """A compose file or a reboot starts them in any order: neither exits while Redis is not there yet."""
    server = RedisServer(tmp_path)  # its port is chosen; nothing listens on it yet
    try:
        worker = spawn("worker", worker_args(server.url, delay=0.01, lease_s=2.0), tmp_path)
        gateway, base = spawn_gateway(server.url, tmp_path)
        procs += [worker, gateway]
        worker.wait_log("cannot create the job streams' consumer groups yet", 30, count=2)
        assert httpx.get(base + "/health", timeout=10).json()["redis"] is False
        assert worker.alive and gateway.alive
        server.start()
        wait_for(lambda: served_models(base) == ["fake"], 60, "the worker to register once Redis is up")
        chunks = run_request(base, app_payload("fake", "after a late start", 5, image=False))
        assert (chunks[-1]["error_code"], chunks[-1]["text"]) == (0, expected("after a late start", 5))
    finally:
        server.kill()


def test_redis_restart_with_aof_keeps_queued_jobs_and_finishes_them(tmp_path: Path, procs: list[Proc]) -> None:
    server = RedisServer(tmp_path, extra=["--appendonly", "yes", "--appendfsync", "always"]).start()
    try:
        worker = spawn("worker", worker_args(server.url, delay=0.05, lease_s=5.0, slots=1), tmp_path)
        procs.append(worker)
        gateway, base = spawn_gateway(server.url, tmp_path, "--start-timeout-s", "60", "--idle-timeout-s", "60")
        procs.append(gateway)
        wait_for(lambda: served_models(base) == ["fake"], 60, "gateway and worker")
        payloads = [app_payload("fake", "aof long", 200, image=False)]  # 10 s; then two short ones
        payloads += [app_payload("fake", f"aof {k}", 20, image=False) for k in range(2)]
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(many, base, payloads)
            wait_for(lambda: streaming_and_queued(server.client()) == (1, 3), 30, "1 job streaming, 2 queued")
            server.kill()
            # Redis stays down until both sides have noticed: the fault must hit, not slip between retries.
            worker.wait_log(r"job \w+: publish failed")
            gateway.wait_log("pub/sub connection lost")
            gateway.wait_log(r"job \w+: replay read failed")
            server.start()
            # The queue survived the restart: the two queued jobs end with their exact text below (a lost entry
            # would end in 50006 or "gone from Redis"). XLEN here would race the worker, which may already have
            # finished the long job (its tokens kept coming while Redis was down) and deleted its entry.
            results = future.result(timeout=120)
        assert [c[-1]["error_code"] for c in results] == [0, 0, 0], [c[-1] for c in results]
        assert [c[-1]["text"] for c in results] == [expected("aof long", 200)] + [
            expected(f"aof {k}", 20) for k in range(2)
        ]
        assert all(consistent(c) for c in results)
        assert all(p.alive for p in procs)
    finally:
        server.kill()


def test_streams_in_flight_subscribe_again_after_a_redis_outage(tmp_path: Path, procs: list[Proc]) -> None:
    server = RedisServer(tmp_path, extra=["--appendonly", "yes", "--appendfsync", "always"]).start()
    try:
        procs.append(spawn("worker", worker_args(server.url, delay=0.05, lease_s=5.0), tmp_path))
        gateway, base = spawn_gateway(server.url, tmp_path, "--idle-timeout-s", "60")
        procs.append(gateway)
        wait_for(lambda: served_models(base) == ["fake"], 60, "gateway and worker")
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(run_request, base, app_payload("fake", "outage", 300, image=False))  # 15 s
            wait_for(lambda: streaming_and_queued(server.client()) == (1, 1), 30, "the job streaming")
            server.kill()
            gateway.wait_log("pub/sub connection lost")  # down longer than the client's own retries
            gateway.wait_log(r"job \w+: replay read failed")
            server.start()
            wait_for(lambda: pubsub_clients(server.client()), 10, "the gateway to subscribe again while the job runs")
            chunks = future.result(timeout=60)
        assert chunks[-1]["text"] == expected("outage", 300)
    finally:
        server.kill()


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_gateway_restart_client_resumes_by_job_id(
    start_worker, start_gateway, r: redis.Redis, how: signal.Signals
) -> None:  # type: ignore[no-untyped-def]
    start_worker(delay=0.02)
    port = free_port()
    gateway, base = start_gateway(port=port)
    job_id = f"gw-restart-{how.value}"
    received, last_seq = "", 0
    with httpx.stream(
        "POST",
        base + "/worker_generate_stream",
        timeout=30,
        json=app_payload("fake", "resume", 500, image=False, job_id=job_id),
    ) as response:
        buffer = b""
        try:
            for piece in response.iter_bytes():
                buffer += piece
                *frames, buffer = buffer.split(b"\0")
                for frame in frames:
                    chunk = json.loads(frame)
                    received, last_seq = chunk["text"], chunk.get("seq", last_seq)
                if len(received) > 60 and gateway.alive:
                    gateway.signal(how)
        except httpx.HTTPError:
            pass  # the gateway went away mid-stream
    assert gateway.popen.wait(30) == -how  # uvicorn re-raises SIGTERM once it has shut down
    assert ("Application shutdown complete" in gateway.log()) == (how == signal.SIGTERM)
    assert not r.exists(f"ivl:job:{{{job_id}}}:cancel")  # a gateway going away is not a client going away
    assert 0 < len(received) < len(expected("resume", 500))
    _, base = start_gateway(port=port)
    rest = httpx.get(f"{base}/jobs/{job_id}/stream", params={"after": last_seq}, timeout=60).content
    chunks = [json.loads(p) for p in rest.split(b"\0") if p.strip()]
    assert chunks[-1]["error_code"] == 0 and chunks[-1]["finish_reason"] == "length"
    assert received + chunks[-1]["text"] == expected("resume", 500)


def test_pubsub_connection_killed_mid_stream_loses_nothing(  # type: ignore[no-untyped-def]
    r: redis.Redis, redis_server: RedisServer, start_worker, start_gateway
) -> None:
    # The gateway runs as its own ACL user, so its channel permission can be taken away: Redis then closes its
    # pub/sub connection and refuses to subscribe it again until it is given back (a blip longer than retries).
    r.execute_command("ACL", "SETUSER", "blip-gw", "on", ">blip-secret", "~*", "&*", "+@all")
    try:
        start_worker(delay=0.02)
        gateway, base = start_gateway(url=redis_server.url_for("blip-gw", "blip-secret"))
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(run_request, base, app_payload("fake", "blip", 400, image=False))  # 8 s
            wait_for(lambda: len(deltas_so_far(r)) >= 5, 20, "a few deltas out")
            r.execute_command("ACL", "SETUSER", "blip-gw", "resetchannels")  # Redis closes its pub/sub connection
            gateway.wait_log("pub/sub connection lost")  # the fault hit the gateway
            missed = len(deltas_so_far(r))
            wait_for(lambda: len(deltas_so_far(r)) >= missed + 5, 20, "deltas published while it cannot listen")
            r.execute_command("ACL", "SETUSER", "blip-gw", "&*")
            wait_for(lambda: pubsub_clients(r), 5, "the gateway to subscribe again while the job runs")
            chunks = future.result(timeout=60)
    finally:
        r.execute_command("ACL", "DELUSER", "blip-gw")
    assert chunks[-1]["error_code"] == 0
    assert consistent(chunks)
    assert chunks[-1]["text"] == expected("blip", 400)  # the gap was filled from the replay record


def pubsub_clients(r: redis.Redis) -> list[str]:
    """Ids of the connections subscribed to a shard channel (the gateway's pub/sub connection)."""
    return [c["id"] for c in r.client_list(_type="pubsub") if int(c["ssub"]) > 0]


def deltas_so_far(r: redis.Redis) -> list[str]:
    return [f["e"] for k in r.scan_iter("ivl:job:*:events") for _, f in r.xrange(k) if '"type":"delta"' in f["e"]]


def test_full_queue_is_refused_with_42903(start_worker, start_gateway) -> None:  # type: ignore[no-untyped-def]
    start_worker(delay=0.05, slots=1)
    _, base = start_gateway("--max-queue", "2")
    with ThreadPoolExecutor(2) as pool:
        running = [pool.submit(run_request, base, app_payload("fake", f"long {k}", 60, image=False)) for k in range(2)]
        wait_for(lambda: httpx.post(base + "/worker_get_status").json()["queue_length"] >= 2, 20, "a full queue")
        refused = httpx.post(base + "/worker_generate_stream", json=app_payload("fake", "one more", 5, image=False))
        assert refused.status_code == 429
        chunk = json.loads(refused.content.rstrip(b"\0"))
        assert chunk["error_code"] == 42903 and "limit 2" in chunk["text"]
        assert [f.result(timeout=60)[-1]["error_code"] for f in running] == [0, 0]
