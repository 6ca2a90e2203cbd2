"""The gateway through real HTTP, against a real redis-server and real worker processes."""

from __future__ import annotations

import itertools
import json
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import uvicorn
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import events, free_port, png_b64, text_of, wait_for


def app_payload(model: str, question: str, images: list[str], max_new_tokens: int = 32) -> dict[str, Any]:
    """Exactly what InternVL's streamlit_demo/app.py sends."""
    return {
        "model": model,
        "prompt": [
            {"role": "system", "content": "You are a helpful assistant.\n\nPersona."},
            {"role": "user", "content": "Describe the picture.", "image": [png_b64(640, 480, 1)]},
            {"role": "assistant", "content": "It is a picture."},
            {"role": "user", "content": question, "image": images},
            {"role": "assistant", "content": None},
        ],
        "temperature": 0.7,
        "top_p": 0.95,
        "max_new_tokens": max_new_tokens,
        "max_input_tiles": 12,
        "repetition_penalty": 1.1,
    }


def chunks(body: bytes) -> list[dict[str, Any]]:
    return [json.loads(part) for part in body.split(b"\0") if part.strip()]


def stream(base: str, payload: dict[str, Any], timeout: float = 120) -> tuple[int, list[dict[str, Any]]]:
    response = httpx.post(base + "/worker_generate_stream", json=payload, timeout=timeout)
    return response.status_code, chunks(response.content)


@pytest.fixture
def tiny_stack(start_worker, start_gateway, tiny_model: Path):  # type: ignore[no-untyped-def]
    start_worker(model="tiny-internvl", model_path=tiny_model)
    _, base = start_gateway()
    return base


def test_app_style_request_streams_cumulative_text(tiny_stack: str, r: redis.Redis) -> None:
    status, parts = stream(
        tiny_stack, app_payload("tiny-internvl", "And these?", [png_b64(800, 600, 2), png_b64(300, 900, 3)])
    )
    assert status == 200
    assert all(p["error_code"] == 0 for p in parts)
    texts = [p["text"] for p in parts]
    assert all(b.startswith(a) for a, b in itertools.pairwise(texts))
    last = parts[-1]
    assert last["finish_reason"] in ("stop", "length")
    assert last["usage"]["completion_tokens"] >= 1
    assert last["usage"]["prompt_tokens"] > 256 * 3  # three images made it into the prompt
    job_id = last["job_id"]
    assert r.hget(f"ivl:job:{{{job_id}}}:state", "status") == "done"
    status_body = httpx.post(tiny_stack + "/worker_get_status").json()
    assert status_body["model_names"] == ["tiny-internvl"]
    assert isinstance(status_body["speed"], int) and isinstance(status_body["queue_length"], int)


def test_worker_generate_and_controller_api(tiny_stack: str) -> None:
    body = httpx.post(tiny_stack + "/worker_generate", json=app_payload("tiny-internvl", "q", []), timeout=60).json()
    assert body["error_code"] == 0 and body["usage"]["completion_tokens"] >= 1
    assert httpx.post(tiny_stack + "/list_models").json() == {"models": ["tiny-internvl"]}
    assert httpx.post(tiny_stack + "/refresh_all_workers").status_code == 200
    address = httpx.post(tiny_stack + "/get_worker_address", json={"model": "tiny-internvl"}).json()["address"]
    assert address == tiny_stack
    assert httpx.post(tiny_stack + "/get_worker_address", json={"model": "nope"}).json() == {"address": ""}
    assert httpx.post(tiny_stack + "/model_details", json={"model": "tiny-internvl"}).json()["context_length"] == 8192


def test_typed_errors_and_service_keeps_serving(tiny_stack: str, r: redis.Redis) -> None:
    status, parts = stream(tiny_stack, app_payload("no-such-model", "hi", []))
    assert (status, parts[-1]["error_code"]) == (404, 40301)
    assert parts[-1]["text"] == "no live worker serves model 'no-such-model' (served: tiny-internvl)"
    assert not r.exists("ivl:jobs:no-such-model")  # refused before queueing (how fast: bench/refusals.py)
    status, parts = stream(tiny_stack, app_payload("tiny-internvl", "hi", ["this is not base64 !!!"]))
    assert (status, parts[-1]["error_code"]) == (400, 40001)
    assert "image 2: invalid base64" in parts[-1]["text"]
    status, parts = stream(tiny_stack, app_payload("tiny-internvl", "hi", [png_b64(64, 64)] * 20))
    assert (status, parts[-1]["error_code"]) == (400, 40302)
    status, parts = stream(tiny_stack, app_payload("tiny-internvl", "hi", [], max_new_tokens=100_000))
    assert parts[-1]["error_code"] == 40001  # over the protocol's own hard limit: schema validation
    status, parts = stream(tiny_stack, app_payload("tiny-internvl", "again", [png_b64()]))
    assert status == 200 and parts[-1]["error_code"] == 0


def test_body_limit(start_gateway, start_worker) -> None:  # type: ignore[no-untyped-def]
    start_worker()
    _, base = start_gateway("--max-body-bytes", "100000")
    response = httpx.post(
        base + "/worker_generate_stream", content=b"x" * 200_000, headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert chunks(response.content)[0]["error_code"] == 40001


def test_client_disconnect_cancels_the_job(start_worker, start_gateway, r: redis.Redis) -> None:  # type: ignore[no-untyped-def]
    worker = start_worker(delay=0.05)
    _, base = start_gateway()
    payload = {"model": "fake", "prompt": [{"role": "user", "content": "long"}], "max_new_tokens": 1000}
    with httpx.stream("POST", base + "/worker_generate_stream", json=payload, timeout=30) as response:
        job_id = response.headers["x-job-id"]
        for _ in response.iter_bytes():
            if len(r.xrange(f"ivl:job:{{{job_id}}}:events")) >= 3:
                break
        # Frozen from here until the cancel is in, the worker cannot produce text the bound below would miss.
        worker.signal(signal.SIGSTOP)
    try:  # the connection is closed: the client went away
        wait_for(lambda: r.exists(f"ivl:job:{{{job_id}}}:cancel"), 15, "the gateway to cancel the job")
        at_cancel = text_of(events(r, job_id))
    finally:
        worker.signal(signal.SIGCONT)
    wait_for(lambda: r.hget(f"ivl:job:{{{job_id}}}:state", "status") == "cancelled", 15, "the job to be cancelled")
    worker.wait_log(f"job {job_id} cancelled in ")
    evs = events(r, job_id)
    assert evs[-1]["type"] == "cancelled"
    assert text_of(evs).startswith(at_cancel)
    assert len(text_of(evs).removeprefix(at_cancel).split()) <= 1  # the worker stopped within one token


class FakeController:
    """The documented controller endpoints: it knows the workers that registered since it (re)started."""

    def __init__(self) -> None:
        self.port = free_port()
        self.registrations: list[dict[str, Any]] = []
        self.heartbeats: list[dict[str, Any]] = []
        self.known: set[str] = set()
        app = FastAPI()

        @app.post("/register_worker")
        def register(body: dict[str, Any]) -> dict[str, Any]:
            self.registrations.append(body)
            self.known.add(body["worker_name"])
            return {}

        @app.post("/receive_heart_beat")
        def heartbeat(body: dict[str, Any]) -> dict[str, Any]:
            self.heartbeats.append(body)
            return {"exist": body["worker_name"] in self.known}

        self.app = app
        self.server: uvicorn.Server | None = None
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.known.clear()  # a restarted controller has forgotten every worker
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server is not None and self.server.started, 10, "the fake controller")

    def stop(self) -> None:
        assert self.server is not None and self.thread is not None
        self.server.should_exit = True
        self.thread.join(10)
        assert not self.thread.is_alive()


@pytest.fixture
def controller() -> Iterator[FakeController]:
    fake = FakeController()
    fake.start()
    yield fake
    if fake.thread is not None and fake.thread.is_alive():
        fake.stop()


def test_controller_bridge(controller: FakeController, start_worker, start_gateway) -> None:  # type: ignore[no-untyped-def]
    start_worker(delay=0.001)
    gateway, base = start_gateway(
        "--controller-address",
        controller.url,
        "--heartbeat-s",
        "0.3",
        "--worker-address",
        "http://gateway.example:8000",
    )
    wait_for(lambda: controller.registrations, 10, "registration")
    first = controller.registrations[0]
    assert first["worker_name"] == "http://gateway.example:8000"
    assert first["check_heart_beat"] is True
    assert first["worker_status"]["model_names"] == ["fake"]
    wait_for(lambda: len(controller.heartbeats) >= 2, 10, "heartbeats")
    assert controller.heartbeats[0] == {"worker_name": "http://gateway.example:8000", "queue_length": 0}
    controller.known.clear()  # the controller expired us: the next heartbeat answers exist: false
    wait_for(lambda: len(controller.registrations) >= 2, 10, "re-registration after exist: false")
    controller.stop()
    gateway.wait_log(r"controller http://\S+ unreachable")  # the bridge saw it go, and keeps retrying
    payload = {
        "model": "fake",
        "prompt": [{"role": "user", "content": "while the controller is down"}],
        "max_new_tokens": 5,
    }
    status, parts = stream(base, payload, timeout=10)
    assert status == 200 and parts[-1]["error_code"] == 0
    assert parts[-1]["text"] == "t0:28 t1:28 t2:28 t3:28 t4:28 "
    registered = len(controller.registrations)
    controller.start()
    wait_for(lambda: len(controller.registrations) > registered, 30, "registration after the controller returns")


def test_openai_chat_completions(tiny_stack: str) -> None:
    image = "data:image/png;base64," + png_b64(500, 400)
    body = {
        "model": "tiny-internvl",
        "max_tokens": 12,
        "temperature": 0,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": image}},
                ],
            },
        ],
    }
    plain = httpx.post(tiny_stack + "/v1/chat/completions", json=body, timeout=60).json()
    assert plain["object"] == "chat.completion"
    assert plain["choices"][0]["message"]["role"] == "assistant"
    assert plain["usage"]["completion_tokens"] >= 1
    assert plain["usage"]["total_tokens"] == plain["usage"]["prompt_tokens"] + plain["usage"]["completion_tokens"]
    sse = httpx.post(
        tiny_stack + "/v1/chat/completions",
        timeout=60,
        json=body | {"stream": True, "stream_options": {"include_usage": True}},
    ).text
    events = [line.removeprefix("data: ") for line in sse.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    parsed = [json.loads(e) for e in events[:-1]]
    assert parsed[0]["choices"][0]["delta"]["role"] == "assistant"
    streamed = "".join(p["choices"][0]["delta"].get("content", "") for p in parsed if p["choices"])
    assert streamed == plain["choices"][0]["message"]["content"]  # greedy: same text both ways
    assert parsed[-1]["usage"]["completion_tokens"] == plain["usage"]["completion_tokens"]
    models = httpx.get(tiny_stack + "/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny-internvl"]
    bad = httpx.post(
        tiny_stack + "/v1/chat/completions",
        json=body
        | {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://example.com/cat.png"}}]}
            ]
        },
    )
    assert bad.status_code == 400 and "data: URL" in bad.json()["error"]["message"]


def test_metrics_parse(tiny_stack: str) -> None:
    stream(tiny_stack, app_payload("tiny-internvl", "q", []))
    text = httpx.get(tiny_stack + "/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert {
        "gateway_requests",
        "gateway_jobs",
        "broker_queue_depth",
        "broker_live_workers",
        "gateway_time_to_first_token_seconds",
        "broker_dead_letters",
    } <= set(families)
    live = [s for s in families["broker_live_workers"].samples if s.labels.get("model") == "tiny-internvl"]
    assert live[0].value == 1
    done = [
        s
        for s in families["gateway_jobs"].samples
        if s.labels == {"model": "tiny-internvl", "outcome": "done"} and s.name.endswith("_total")
    ]
    assert done[0].value >= 1
    health = httpx.get(tiny_stack + "/health").json()
    assert health["workers"] == {"tiny-internvl": 1}


def api_routes(*, job_routes: bool) -> list[tuple[str, str]]:
    """(method, path) of every route in the gateway's OpenAPI schema but /health and /metrics; the /jobs/… ones
    or the others. Read from the app, so a route added later is checked too."""
    from gateway.app import create_app
    from gateway.settings import GatewaySettings

    paths = create_app(GatewaySettings(api_token="s3cret")).openapi()["paths"]
    routes = [(method.upper(), path) for path, operations in paths.items() for method in operations]
    return [(m, p) for m, p in routes if p not in ("/health", "/metrics") and p.startswith("/jobs/") == job_routes]


def refused_without_token(base: str, routes: list[tuple[str, str]]) -> dict[str, int]:
    """Status of each route without a token (should be 401), and with it (should be anything else)."""
    statuses = {}
    for method, path in routes:
        url = base + path.replace("{job_id}", "no-token-job")
        without = httpx.request(method, url, timeout=30).status_code
        with_token = httpx.request(method, url, headers={"Authorization": "Bearer s3cret"}, timeout=30).status_code
        statuses[f"{method} {path}"] = (without, with_token != 401)
    return {route: without for route, (without, accepted) in statuses.items() if without != 401 or not accepted}


def test_bearer_token_guards_the_protocol_endpoints(start_worker, start_gateway) -> None:  # type: ignore[no-untyped-def]
    start_worker()
    _, base = start_gateway("--api-token", "s3cret")
    routes = api_routes(job_routes=False)
    assert len(routes) >= 10  # the worker protocol, the controller API and the OpenAI API
    assert refused_without_token(base, routes) == {}
    wrong = httpx.post(base + "/worker_get_status", headers={"Authorization": "Bearer s3cre"})
    assert (wrong.status_code, wrong.headers["www-authenticate"]) == (401, "Bearer")


def test_bearer_token_guards_the_job_endpoints(start_worker, start_gateway, r: redis.Redis) -> None:  # type: ignore[no-untyped-def]
    start_worker()
    _, base = start_gateway("--api-token", "s3cret")
    assert refused_without_token(base, api_routes(job_routes=True)) == {}
    assert httpx.post(base + "/jobs/planted/cancel", timeout=30).status_code == 401
    assert not r.exists("ivl:job:{planted}:cancel")  # a refused request writes nothing
    assert r.exists("ivl:job:{no-token-job}:cancel")  # (the request with the token did)


def test_health_and_metrics_need_no_token(start_worker, start_gateway) -> None:  # type: ignore[no-untyped-def]
    # docs/reliability.md: "--api-token requires Authorization: Bearer … on every endpoint but /health and
    # /metrics". Whether /metrics stays open is being decided (issue 10, N); this pins the documented behaviour.
    start_worker()
    _, base = start_gateway("--api-token", "s3cret")
    assert httpx.get(base + "/health").json()["workers"] == {"fake": 1}
    metrics = httpx.get(base + "/metrics")
    assert metrics.status_code == 200 and "broker_live_workers" in metrics.text


def test_resume_stream_by_job_id(start_worker, start_gateway, r: redis.Redis) -> None:  # type: ignore[no-untyped-def]
    start_worker(delay=0.01)
    _, base = start_gateway()
    payload = {
        "model": "fake",
        "prompt": [{"role": "user", "content": "resume me"}],
        "max_new_tokens": 30,
        "job_id": "resume-1",
    }
    _status, parts = stream(base, payload)
    full = parts[-1]["text"]
    middle = next(p for p in parts if p["text"] and len(p["text"]) < len(full))
    rest = chunks(httpx.get(base + f"/jobs/resume-1/stream?after={middle['seq']}", timeout=30).content)
    assert middle["text"] + rest[-1]["text"] == full
    assert httpx.get(base + "/jobs/unknown-id/stream").status_code == 404


def test_schemathesis_finds_no_server_error(start_worker, start_gateway, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import subprocess

    from tests.helpers import BIN

    start_worker(delay=0.0)
    _, base = start_gateway("--start-timeout-s", "3", "--idle-timeout-s", "3")
    result = subprocess.run(
        [
            str(BIN / "schemathesis"),
            "run",
            f"{base}/openapi.json",
            "--checks",
            "not_a_server_error",
            "--max-examples",
            "25",
            "--phases",
            "examples,coverage,fuzzing",
            # one worker thread: two threads parsing at once trip CPython 3.11's "AST constructor recursion depth
            # mismatch" SystemError inside schemathesis (seen here: a runtime error, not a server error)
            "--workers",
            "1",
            "--request-timeout",
            "20",
            "--suppress-health-check",
            "all",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-4000:]


def test_count_token_is_counted_by_the_model(tiny_stack: str) -> None:
    prompt = [
        {"role": "system", "content": "Count."},
        {"role": "user", "content": "How many tokens?", "image": [png_b64(800, 600)]},
    ]
    body = httpx.post(tiny_stack + "/count_token", json={"model": "tiny-internvl", "prompt": prompt}, timeout=60)
    # Counted by hand: the tiny tokenizer has one token per character (and per special token), and 800x600 with
    # 12 tiles is a 4x3 grid plus a thumbnail, 256 tokens per tile. The template is ChatML:
    #   <|im_start|> "system\n" "Count." <|im_end|> "\n"           1 + 7 + 6 + 1 + 1 = 16
    #   <|im_start|> "user\n" <img> <IMG_CONTEXT>x13x256 </img>    1 + 5 + 1 + 3328 + 1 = 3336
    #   "\nHow many tokens?" <|im_end|> "\n"                      17 + 1 + 1 = 19
    #   <|im_start|> "assistant\n"                                1 + 10 = 11
    assert body.json() == {"count": 16 + 3336 + 19 + 11, "error_code": 0}
    plain = httpx.post(tiny_stack + "/count_token", json={"model": "tiny-internvl", "prompt": "hello"}).json()
    as_list = [{"role": "user", "content": "hello"}]
    listed = httpx.post(tiny_stack + "/count_token", json={"model": "tiny-internvl", "prompt": as_list}).json()
    assert plain == listed and plain["count"] > 5  # a plain string (FastChat) is one user message
    unknown = httpx.post(tiny_stack + "/count_token", json={"model": "nope", "prompt": "hello"})
    assert unknown.status_code == 404 and json.loads(unknown.content.rstrip(b"\0"))["error_code"] == 40301


def test_gateway_never_imports_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys, gateway.app, gateway.cli, broker_worker.protocol.client; from gateway.app import create_app; "
        "from gateway.settings import GatewaySettings; create_app(GatewaySettings()); "
        "heavy = sorted(m for m in ('torch', 'transformers', 'torchvision') if m in sys.modules); print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_request_deadline_when_no_worker_takes_the_job(start_worker, start_gateway, r: redis.Redis) -> None:  # type: ignore[no-untyped-def]
    worker = start_worker(delay=0.001)
    _, base = start_gateway("--start-timeout-s", "1")
    worker.signal(signal.SIGSTOP)  # registered and fresh for a few seconds, but takes nothing
    try:
        payload = {
            "model": "fake",
            "prompt": [{"role": "user", "content": "anyone?"}],
            "max_new_tokens": 3,
            "job_id": "unclaimed",
        }
        status, parts = stream(base, payload, timeout=30)
        assert status == 200 and parts[-1]["error_code"] == 50006
        assert parts[-1]["text"] == "no worker started job unclaimed within 6s (are workers running for this model?)"
        assert r.get("ivl:job:{unclaimed}:cancel") == "1"  # recorded before the client was told
    finally:
        worker.signal(signal.SIGCONT)
    # The gateway cancelled the job it gave up on; picked up late, it is dropped, never run.
    worker.wait_log("job unclaimed cancelled before start", 30)
    assert [json.loads(f["e"])["type"] for _, f in r.xrange("ivl:job:{unclaimed}:events")] == ["cancelled"]


def test_finish_reasons_and_engine_errors_reach_http_clients(start_worker, start_gateway) -> None:  # type: ignore[no-untyped-def]
    start_worker()
    _, base = start_gateway()

    def last_chunk(question: str, tokens: int = 8) -> dict[str, Any]:
        body = {"model": "fake", "prompt": [{"role": "user", "content": question}], "max_new_tokens": tokens}
        return stream(base, body)[1][-1]

    stopped, capped, crashed = last_chunk("eos: early"), last_chunk("full"), last_chunk("crash: now")
    assert (stopped["finish_reason"], stopped["text"], stopped["usage"]["completion_tokens"]) == (
        "stop",
        "t0:10 t1:10 t2:10 t3:10 ",
        4,
    )
    assert (capped["finish_reason"], capped["usage"]["completion_tokens"]) == ("length", 8)
    assert (crashed["error_code"], crashed["text"]) == (50001, "RuntimeError: fake engine crashed: crash: now")
    openai = {"model": "fake", "max_tokens": 6, "messages": [{"role": "user", "content": "eos: openai"}]}
    reply = httpx.post(base + "/v1/chat/completions", json=openai, timeout=30).json()
    assert (reply["choices"][0]["finish_reason"], reply["usage"]["completion_tokens"]) == ("stop", 3)
    sse = httpx.post(base + "/v1/chat/completions", json=openai | {"stream": True}, timeout=30).text
    finals = [json.loads(line[6:]) for line in sse.splitlines() if line.startswith("data: {")]
    assert [c["choices"][0]["finish_reason"] for c in finals if c["choices"]][-1] == "stop"


def test_invalid_job_ids_are_refused(start_worker, start_gateway, r: redis.Redis) -> None:  # type: ignore[no-untyped-def]
    start_worker()
    _, base = start_gateway()
    for bad in ("a{b}", "x" * 81, "white space"):  # a brace would break the {id} hash tag of the job's keys
        body = {"model": "fake", "prompt": [{"role": "user", "content": "hi"}], "job_id": bad}
        status, parts = stream(base, body)
        assert (status, parts[-1]["error_code"]) == (400, 40001)
        assert parts[-1]["text"].startswith("invalid request: job_id: String should match pattern")
    for path in ("/jobs/a{b}/stream", "/jobs/a{b}/cancel"):
        response = httpx.request("GET" if path.endswith("stream") else "POST", base + path)
        assert response.status_code == 400 and chunks(response.content)[-1]["error_code"] == 40001
    assert r.xlen("ivl:jobs:fake") == 0 and not list(r.scan_iter("ivl:job:*"))  # nothing queued, nothing set
    assert stream(base, {"model": "fake", "prompt": [{"role": "user", "content": "hi"}], "job_id": "x" * 80})[0] == 200
