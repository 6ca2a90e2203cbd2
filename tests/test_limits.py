"""Every row of docs/reliability.md's limits table, at its boundary: the limit itself is accepted, one more is
refused with a typed error that says which limit (in the job model, by the worker, and through the gateway).

Pixels and decoded bytes per image: tests/test_images.py; context: tests/test_engine.py; replay record and
stream caps: tests/test_jobs.py; deliveries: tests/test_worker.py.
"""

from __future__ import annotations

import json
import re
import socket
import time
from typing import Any

import httpx
import pytest
import redis
from pydantic import ValidationError

from broker_worker.protocol.errors import describe_problems
from broker_worker.protocol.messages import Job, WorkerHealth
from tests.helpers import job, png_b64, submit, wait_for, wait_terminal
from tests.test_images import png_bomb

MIB = 1024 * 1024
IMAGE = png_b64(8, 8)


def user(content: str = "hi", images: int = 0) -> dict[str, Any]:
    return {"role": "user", "content": content, "image": [IMAGE] * images}


def conversation(messages: int, images: int = 0) -> list[dict[str, Any]]:
    """``messages`` alternating user/assistant messages, the last one a user's; ``images`` spread over the users."""
    prompt = [user() if k % 2 == 0 else {"role": "assistant", "content": "ok"} for k in range(messages - 1)]
    prompt.append(user())
    users = [m for m in prompt if m["role"] == "user"]
    for k in range(images):
        users[k % len(users)]["image"].append(IMAGE)
    return prompt


#: (what, job fields one past the limit, what the refusal says), and the same at the limit is accepted.
OVER_LIMITS = [
    ("messages", {"prompt": conversation(257)}, "prompt: List should have at most 256 items after validation"),
    ("characters", {"prompt": [user("x" * 200_001)]}, "prompt.0.content: String should have at most 200000"),
    ("images per job", {"prompt": conversation(3, images=33)}, "33 images in one job; at most 32 are allowed"),
    ("max_new_tokens", {"max_new_tokens": 16_385}, "max_new_tokens: Input should be less than or equal to 16384"),
]
AT_LIMITS = [
    {"prompt": conversation(256)},
    {"prompt": [user("x" * 200_000)]},
    {"prompt": conversation(3, images=32)},
    {"max_new_tokens": 16_384},
]


@pytest.mark.parametrize(("what", "over", "message"), OVER_LIMITS, ids=[w for w, _, _ in OVER_LIMITS])
def test_job_hard_limits(what: str, over: dict[str, Any], message: str) -> None:
    at = AT_LIMITS[[w for w, _, _ in OVER_LIMITS].index(what)]
    assert Job.model_validate(job("at-limit") | at).id == "at-limit"
    with pytest.raises(ValidationError) as refused:
        Job.model_validate(job("over-limit") | over)
    assert message in describe_problems(refused.value.errors())  # as the worker and the gateway word it


def test_worker_dead_letters_what_is_over_a_hard_limit(r: redis.Redis, start_worker) -> None:  # type: ignore[no-untyped-def]
    worker = start_worker(delay=0.0)
    for what, over, _ in OVER_LIMITS:
        submit(r, job(f"over-{what.replace(' ', '-')}") | over)
    r.xadd("ivl:jobs:fake", {"job": "x" * (64 * MIB + 1)})  # the job stream entry limit
    letters = wait_for(lambda: len(r.xrange("ivl:dead")) == 5 and r.xrange("ivl:dead"), 60, "five dead letters")
    assert "job is 67108865 characters; the limit is 67108864" in [fields["reason"] for _, fields in letters]
    for what, _, message in OVER_LIMITS:  # each one's waiting client is told why (40001)
        failed = wait_terminal(r, f"over-{what.replace(' ', '-')}")[-1]
        assert (failed["type"], failed["error_code"]) == ("failed", 40001)
        assert message in failed["message"]
    limits = job("at-limits", tokens=3) | {"prompt": [*conversation(255, images=32), user("x" * 200000)]}
    submit(r, limits)  # 256 messages, 32 images, 200,000 characters: run
    assert wait_terminal(r, "at-limits")[-1]["type"] == "done"
    submit(r, job("most-tokens", tokens=16_384))
    done = wait_terminal(r, "most-tokens")[-1]
    assert (done["type"], done["usage"]["completion_tokens"]) == ("done", 16_384)
    assert worker.alive


def post_stream(base: str, fields: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    body = {"model": "fake", "prompt": [user()], "max_new_tokens": 4} | fields
    response = httpx.post(base + "/worker_generate_stream", json=body, timeout=60)
    return response.status_code, json.loads(response.content.rstrip(b"\0").split(b"\0")[-1])


def raw_request(base: str, announced: int) -> bytes:
    """A POST announcing a body of ``announced`` bytes and sending none of it: the gateway answers on the header."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(
            f"POST /worker_generate_stream HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {announced}\r\n\r\n".encode()
        )
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < body_length(answer):
            piece = conn.recv(65536)  # headers and body may come in separate packets
            if not piece:
                break
            answer += piece
        return answer


def body_length(answer: bytes) -> int:
    found = re.search(rb"content-length: (\d+)", answer.partition(b"\r\n\r\n")[0], re.IGNORECASE)
    return int(found.group(1)) if found else 0


def test_gateway_default_limits(start_worker, start_gateway) -> None:  # type: ignore[no-untyped-def]
    start_worker(delay=0.0)
    _, base = start_gateway()
    answer = raw_request(base, 64 * MIB + 1)
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b"request body of 67108865 bytes is over the limit of 67108864 bytes" in answer
    assert post_stream(base, {"prompt": [user(images=17)]}) == (
        400,
        {"text": "17 images in one request; this gateway accepts at most 16", "error_code": 40302},
    )
    assert post_stream(base, {"prompt": [user(images=16)]})[1]["error_code"] == 0
    assert post_stream(base, {"max_new_tokens": 4097}) == (
        400,
        {"text": "max_new_tokens 4097 is over this gateway's limit 4096", "error_code": 40302},
    )
    status, last = post_stream(base, {"max_new_tokens": 4096})
    assert (status, last["error_code"], last["usage"]["completion_tokens"]) == (200, 0, 4096)
    status, last = post_stream(base, {"prompt": [{"role": "user", "content": "hi", "image": [png_bomb(7072, 7071)]}]})
    assert (status, last["error_code"]) == (400, 40001)
    assert last["text"] == "image 1: 7072x7071 pixels is over the limit (50000000 pixels, 20000 per side)"
    status, last = post_stream(base, {"prompt": conversation(257)})
    assert (status, last["error_code"]) == (400, 40001) and "at most 256 items" in last["text"]
    assert post_stream(base, {"prompt": conversation(256)})[1]["error_code"] == 0


def test_gateway_configured_limits_and_the_hard_ones_behind_them(start_worker, start_gateway) -> None:  # type: ignore[no-untyped-def]
    start_worker(delay=0.0)
    _, base = start_gateway("--max-images", "64", "--max-image-pixels", "10000", "--max-new-tokens", "20000")
    status, last = post_stream(base, {"prompt": conversation(3, images=33)})
    assert (status, last["error_code"]) == (400, 40001)
    assert "33 images in one job; at most 32 are allowed" in last["text"]
    assert post_stream(base, {"prompt": conversation(3, images=32)})[1]["error_code"] == 0
    status, last = post_stream(base, {"prompt": [{"role": "user", "content": "hi", "image": [png_b64(101, 100)]}]})
    assert last == {
        "text": "image 1: 101x100 pixels is over the limit (10000 pixels, 20000 per side)",
        "error_code": 40001,
    }
    assert (
        post_stream(base, {"prompt": [{"role": "user", "content": "hi", "image": [png_b64(100, 100)]}]})[1][
            "error_code"
        ]
        == 0
    )
    status, last = post_stream(base, {"max_new_tokens": 16_385})
    assert (status, last["error_code"]) == (400, 40001)
    assert "max_new_tokens: Input should be less than or equal to 16384" in last["text"]


def test_queue_depth_limit_defaults_to_256(start_gateway, r: redis.Redis) -> None:  # type: ignore[no-untyped-def]
    # A worker as Redis sees it (health key + index), so nothing takes the 256 queued entries meanwhile.
    health = WorkerHealth(worker_id="still-worker", model="fake", slots=1, running=1)
    r.set("ivl:worker:still-worker", health.model_dump_json(), ex=600)
    r.zadd("ivl:workers", {"still-worker": int(time.time() * 1000) + 600_000})
    _, base = start_gateway("--start-timeout-s", "1")
    with r.pipeline(transaction=False) as pipe:
        for k in range(255):
            pipe.xadd("ivl:jobs:fake", {"job": json.dumps(job(f"queued-{k}"))})
        pipe.execute()
    status, last = post_stream(base, {"job_id": "the-256th"})  # 255 queued: admitted, queued, never started
    assert (status, last["error_code"]) == (200, 50006)
    assert r.xlen("ivl:jobs:fake") == 256
    assert post_stream(base, {}) == (
        429,
        {
            "text": "256 jobs are queued or running for 'fake' (limit 256); retry later or start more workers",
            "error_code": 42903,
        },
    )
