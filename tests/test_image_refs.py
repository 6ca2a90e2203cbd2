"""Images by reference (issue G): the gateway stores each image once under ``ivl:img:{<sha256>}`` and the job
carries ``sha256:<hex>``; the worker resolves it, and a missing reference fails the job with 40001 naming it."""

from __future__ import annotations

import hashlib
import json
import signal
import threading

import httpx
import redis

from tests.helpers import events, png_b64, submit, wait_for, wait_terminal
from tests.helpers import job as make_job


def test_the_gateway_queues_references_and_stores_each_image_once(
    start_worker,  # type: ignore[no-untyped-def]
    start_gateway,  # type: ignore[no-untyped-def]
    r: redis.Redis,
) -> None:
    worker = start_worker()
    _, base = start_gateway()
    image = png_b64(64, 48, 3)
    digest = hashlib.sha256(image.encode()).hexdigest()
    turns = [{"role": "user", "content": "look", "image": [image]}, {"role": "assistant", "content": "ok"}]
    payload = {"model": "fake", "prompt": [*turns, {"role": "user", "content": "again", "image": [image]}]}
    payload["max_new_tokens"] = 8
    worker.signal(signal.SIGSTOP)  # the entry stays queued, to be read as the worker would read it
    result: dict[str, bytes] = {}
    thread = threading.Thread(
        target=lambda: result.update(
            body=httpx.post(base + "/worker_generate_stream", json=payload, timeout=60).content
        )
    )
    thread.start()
    try:
        entries = wait_for(lambda: r.xrange("ivl:jobs:fake"), 30, "the job to be queued")
    finally:
        worker.signal(signal.SIGCONT)
    queued = json.loads(entries[0][1]["job"])
    assert [m.get("image", []) for m in queued["prompt"]] == [[f"sha256:{digest}"], [], [f"sha256:{digest}"]]
    assert r.get(f"ivl:img:{{{digest}}}") == image
    assert 0 < r.ttl(f"ivl:img:{{{digest}}}") <= 3600
    assert r.keys("ivl:img:*") == [f"ivl:img:{{{digest}}}"]  # resent in the history: stored once
    thread.join(60)
    last = json.loads(result["body"].split(b"\0")[-2])
    assert last["error_code"] == 0, last


def test_a_missing_reference_fails_the_job_with_40001_naming_it(start_worker, r: redis.Redis) -> None:  # type: ignore[no-untyped-def]
    start_worker()
    missing = "sha256:" + "ab" * 32
    submit(r, make_job("lost-image", prompt=[{"role": "user", "content": "see", "image": [missing]}]))
    last = wait_terminal(r, "lost-image")[-1]
    assert last["type"] == "failed" and last["error_code"] == 40001
    assert last["message"] == f"image {missing} is not in Redis (expired or never stored)"
    assert [e["type"] for e in events(r, "lost-image")] == ["failed"]


async def test_an_image_redis_has_is_not_written_again_only_its_ttl_refreshed(r: redis.Redis) -> None:
    """InternVL's app re-sends every earlier image on every turn: the bytes of an image already stored are not
    written again (no SET, only an EXPIRE); its TTL is refreshed."""
    from broker_worker.protocol.connections import async_redis
    from broker_worker.protocol.image_refs import store_images
    from broker_worker.protocol.messages import Job

    image = png_b64(640, 480, 5)
    key = f"ivl:img:{{{hashlib.sha256(image.encode()).hexdigest()}}}"
    job = Job.model_validate(
        {"id": "turn", "model": "fake", "prompt": [{"role": "user", "content": "a", "image": [image]}]}
    )
    client = async_redis(f"redis://127.0.0.1:{r.connection_pool.connection_kwargs['port']}/0")
    try:
        await store_images(client, job)
        r.expire(key, 100)
        r.config_resetstat()
        await store_images(client, job)
    finally:
        await client.aclose()
    calls = {k: v["calls"] for k, v in r.info("commandstats").items() if k in ("cmdstat_set", "cmdstat_expire")}
    assert calls == {"cmdstat_expire": 1}
    assert 100 < r.ttl(key) <= 3600
    assert r.get(key) == image
