"""Breaking things on purpose: worker kill -9 and SIGTERM under load, Redis restart, gateway restart."""

from __future__ import annotations

import itertools
import json
import signal
import time
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


def test_kill_9_one_of_two_workers_under_20_streams(  # type: ignore[no-untyped-def]
    r: redis.Redis, start_worker, start_gateway, tiny_model: Path
) -> None:
    victim = start_worker(model="tiny-internvl", model_path=tiny_model, lease_s=2.0)
    start_worker(model="tiny-internvl", model_path=tiny_model, lease_s=2.0)
    _, base = start_gateway()
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(many, base, [app_payload("tiny-internvl", f"story {k}", 48) for k in range(20)])
        victim.wait_log(r"job \w+ started", count=2)
        victim.popen.kill()
        results = future.result(timeout=300)
    assert [c[-1]["error_code"] for c in results] == [0] * 20, [c[-1] for c in results if c[-1]["error_code"]]
    assert all(consistent(c) for c in results)
    resumed = 0
    for chunks in results:
        job_id = chunks[-1]["job_id"]
        evs = [json.loads(f["e"]) for _, f in r.xrange(f"ivl:job:{{{job_id}}}:events")]
        assert "".join(e.get("text", "") for e in evs if e["type"] == "delta") == chunks[-1]["text"]
        resumed += any(e["type"] == "started" and e["resumed"] for e in evs)
    assert resumed >= 1  # the killed worker's jobs were taken over, not restarted


def test_sigterm_worker_under_load_loses_nothing(start_worker, start_gateway) -> None:  # type: ignore[no-untyped-def]
    a = start_worker(delay=0.02, slots=4)
    start_worker(delay=0.02, slots=4)
    _, base = start_gateway()
    payloads = [app_payload("fake", f"term {k}", 100, image=False) for k in range(10)]
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(many, base, payloads)
        a.wait_log(r"job \w+ started")
        time.sleep(0.3)  # let it stream a little before the signal (not a sync point: either way must work)
        a.signal(signal.SIGTERM)
        results = future.result(timeout=120)
    assert a.popen.wait(30) == 0
    assert [c[-1]["error_code"] for c in results] == [0] * 10
    assert [c[-1]["text"] for c in results] == [expected(f"term {k}", 100) for k in range(10)]


def test_redis_restart_ends_every_request_and_service_recovers(tmp_path: Path, procs: list[Proc]) -> None:
    server = RedisServer(tmp_path).start()
    try:
        procs.append(spawn("worker", worker_args(server.url, delay=0.05, lease_s=2.0), tmp_path))
        gateway, base = spawn_gateway(server.url, tmp_path, "--start-timeout-s", "20", "--idle-timeout-s", "20")
        procs.append(gateway)
        wait_for(lambda: served_models(base) == ["fake"], 60, "gateway and worker")
        payloads = [app_payload("fake", f"restart {k}", 200, image=False) for k in range(6)]
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(many, base, payloads)
            wait_for(lambda: len(server.client().keys("ivl:job:*:events")) >= 6, 30, "all six jobs streaming")
            server.kill()
            time.sleep(1.0)  # Redis stays down for a second
            server.start()
            started = time.monotonic()
            results = future.result(timeout=90)
        assert time.monotonic() - started < 60
        for chunks in results:
            last = chunks[-1]
            assert last["error_code"] == 0 or ("gone from Redis" in last["text"] or "Redis" in last["text"]), last
        assert any(c[-1]["error_code"] != 0 for c in results)  # those jobs died with Redis: said so, not hung
        wait_for(lambda: served_models(base) == ["fake"], 30, "the worker to re-register after the restart")
        after = run_request(base, app_payload("fake", "after restart", 5, image=False))
        assert after[-1]["error_code"] == 0 and after[-1]["text"] == expected("after restart", 5)
        assert all(p.alive for p in procs)
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
    assert gateway.popen.wait(30) is not None
    assert not r.exists(f"ivl:job:{{{job_id}}}:cancel")  # a gateway going away is not a client going away
    assert 0 < len(received) < len(expected("resume", 500))
    _, base = start_gateway(port=port)
    rest = httpx.get(f"{base}/jobs/{job_id}/stream", params={"after": last_seq}, timeout=60).content
    chunks = [json.loads(p) for p in rest.split(b"\0") if p.strip()]
    assert chunks[-1]["error_code"] == 0 and chunks[-1]["finish_reason"] == "length"
    assert received + chunks[-1]["text"] == expected("resume", 500)


def test_pubsub_connection_killed_mid_stream_loses_nothing(  # type: ignore[no-untyped-def]
    r: redis.Redis, start_worker, start_gateway
) -> None:
    start_worker(delay=0.02)
    _, base = start_gateway()
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(run_request, base, app_payload("fake", "blip", 150, image=False))
        wait_for(
            lambda: any(len(f["e"]) > 0 for k in r.scan_iter("ivl:job:*:events") for _, f in r.xrange(k)),
            20,
            "the stream to start",
        )
        time.sleep(0.3)  # a few deltas in, then cut the gateway's pub/sub connection (a network blip)
        assert r.client_kill_filter(_type="pubsub") >= 1
        chunks = future.result(timeout=60)
    assert chunks[-1]["error_code"] == 0
    assert consistent(chunks)
    assert chunks[-1]["text"] == expected("blip", 150)  # the gap was filled from the replay record


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
