"""FastChat's model-worker protocol on the gateway, and FastChat 0.2.36's own servers in front of it.

The end-to-end tests install ``fschat==0.2.36`` with the official ``openai`` SDK in a venv of their own under
tests/artifacts/ (built once, reused while the pins below stay the same): FastChat's streaming path needs
pydantic 1, so that venv pins pydantic 1.10 and a FastAPI that supports it, apart from the project's venv.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker_worker.protocol.errors import JobError
from gateway.fastchat_conv import conv_template, parse_prompt
from tests.helpers import ROOT, Proc, RedisServer, free_port, png_b64, spawn, spawn_gateway, wait_for, worker_args

FASTCHAT_REQUIREMENTS = ["fschat==0.2.36", "pydantic>=1.10,<2", "fastapi>=0.95,<0.100", "openai>=1.40,<4"]
FASTCHAT_VENV = ROOT / "tests" / "artifacts" / "fastchat-venv"
EXPIRY_S = 4  # FastChat's controller expiry (90 s by default), shortened through its own environment variable
MODEL = "tiny-internvl"

# Rendered by FastChat 0.2.36's Conversation.get_prompt with the gateway's template (checked against the real
# FastChat by the end-to-end test below)
SAY_HI = "<|im_start|>system\n<|im_end|>\n<|im_start|>user: Say hi<|im_end|>\n<|im_start|>assistant:"


def fastchat_request(prompt: str = SAY_HI, **extra: Any) -> dict[str, Any]:
    """What FastChat's openai_api_server sends a model worker for a chat (get_gen_params, 0.2.36)."""
    return {
        "model": "fake",
        "prompt": prompt,
        "temperature": 0.0,
        "logprobs": None,
        "top_p": 1.0,
        "top_k": -1,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "max_new_tokens": 8,
        "echo": False,
        "stop_token_ids": None,
        "stop": [],
    } | extra


def chunks(body: bytes) -> list[dict[str, Any]]:
    return [json.loads(part) for part in body.split(b"\0") if part.strip()]


def test_rendered_chats_parse_back_into_their_turns() -> None:
    b64 = png_b64(64, 64)
    image = "data:image/png;base64," + b64
    prompt = (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user: $$<image>$$$$<image>$$Compare<|im_end|>\n"
        "<|im_start|>assistant:"  # FastChat's rendering of an empty assistant turn: no text, no separator
        "<|im_start|>user: and now?<|im_end|>\n"
        "<|im_start|>assistant: Fine.<|im_end|>\n"
        "<|im_start|>user:"
        "<|im_start|>assistant:"
    )
    messages = parse_prompt(prompt, [image, image])
    assert [(m.role, m.content, len(m.image)) for m in messages] == [
        ("system", "Be brief.", 0),
        ("user", "Compare", 2),
        ("assistant", "", 0),
        ("user", "and now?", 0),
        ("assistant", "Fine.", 0),
        ("user", "", 0),
        ("assistant", None, 0),
    ]
    assert messages[1].image == [b64, b64]  # data URLs become the base64 the workers decode
    assert [m.role for m in parse_prompt(SAY_HI, [])] == ["user", "assistant"]  # empty system: model default


@pytest.mark.parametrize(
    ("prompt", "images", "cause"),
    [
        ("Once upon a time", [], "rendered with this gateway's conversation template"),
        ("<|im_start|>system\n<|im_end|>\n<|im_start|>user: hi<|im_end|>\n", [], "blank turn"),
        (SAY_HI.replace("user: ", "human: "), [], "not a user or assistant turn"),
        (SAY_HI.replace("Say", "$$<image>$$Say"), [], "more $$<image>$$ placeholders than images (0)"),
        (SAY_HI, ["data:image/png;base64,aGk="], "1 images for fewer"),
        (SAY_HI.replace("Say", "$$<image>$$Say"), ["http://example.com/a.png"], "data: URL"),
    ],
)
def test_strings_that_are_not_a_rendered_chat_are_typed_errors(prompt: str, images: list[str], cause: str) -> None:
    with pytest.raises(JobError) as caught:
        parse_prompt(prompt, images)
    assert caught.value.code == 40001 and cause in caught.value.message


PARTS = ["<|im_start|>", "<|im_end|>\n", "system\n", "user: ", "assistant: ", "user:", "assistant:", "$$<image>$$", "x"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(PARTS), max_size=12).map("".join) | st.text(max_size=60), st.integers(0, 3))
def test_any_string_parses_or_is_a_typed_error(prompt: str, images: int) -> None:
    try:
        messages = parse_prompt(prompt, ["data:image/png;base64,aGk="] * images)
    except JobError as exc:
        assert exc.code == 40001
        return
    assert messages[-1].role == "assistant" and messages[-1].content is None
    assert sum(len(m.image) for m in messages) == images


@pytest.fixture
def fake_stack(start_worker, start_gateway) -> str:  # type: ignore[no-untyped-def]
    start_worker(delay=0.001)
    return str(start_gateway()[1])


def test_fastchat_request_stops_echoes_and_answers_both_ways(fake_stack: str) -> None:
    conv = httpx.post(fake_stack + "/worker_get_conv_template", json={"model": "fake"}).json()["conv"]
    assert conv == conv_template() and conv["sep_style"] == 2  # ADD_COLON_TWO: the style that carries images
    # the fake engine answers "t0:6 t1:6 ..." (6 = len("Say hi")); the stop string and what follows never show
    body = fastchat_request(stop=["t3:", "never"])
    last = chunks(httpx.post(fake_stack + "/worker_generate_stream", json=body, timeout=30).content)[-1]
    assert (last["text"], last["finish_reason"], last["error_code"]) == ("t0:6 t1:6 t2:6 ", "stop", 0)
    one = httpx.post(fake_stack + "/worker_generate", json=body, timeout=30).json()
    assert (one["text"], one["finish_reason"]) == ("t0:6 t1:6 t2:6 ", "stop")
    echo = fastchat_request(echo=True, stop="t1:")
    assert httpx.post(fake_stack + "/worker_generate", json=echo, timeout=30).json()["text"] == SAY_HI + "t0:6 "
    streamed = chunks(httpx.post(fake_stack + "/worker_generate_stream", json=echo, timeout=30).content)
    assert [c["text"] for c in streamed][-1] == SAY_HI + "t0:6 "
    assert all(c["text"].startswith(SAY_HI) for c in streamed)
    # FastChat's model worker echoes when echo is left out
    default = fastchat_request(stop="t1:")
    del default["echo"]
    assert httpx.post(fake_stack + "/worker_generate", json=default, timeout=30).json()["text"] == SAY_HI + "t0:6 "


def test_count_token_counts_the_rendered_chat_as_the_conversation_it_is(fake_stack: str) -> None:
    def count(prompt: object) -> int:
        body = httpx.post(fake_stack + "/count_token", json={"model": "fake", "prompt": prompt}, timeout=30).json()
        return int(body["count"])

    # the fake engine counts the question's characters: "Say hi" is 6, however the chat arrives
    assert count(SAY_HI) == count([{"role": "user", "content": "Say hi"}]) == 6
    assert count("not a rendered chat") == len("not a rendered chat")  # any other string: one user message


def test_fastchat_parameters_that_cannot_be_honoured_are_refused(fake_stack: str) -> None:
    def refused(body: dict[str, Any]) -> tuple[int, int, str]:
        response = httpx.post(fake_stack + "/worker_generate_stream", json=body, timeout=30)
        last = chunks(response.content)[-1]
        return response.status_code, last["error_code"], last["text"]

    assert refused(fastchat_request(logprobs=1))[:2] == (400, 40302)
    assert refused(fastchat_request(logprobs=0))[:2] == (400, 40302)  # FastChat's worker: any number turns it on
    listed = {"model": "fake", "prompt": [{"role": "user", "content": "hi"}]}
    assert refused(listed | {"images": ["data:image/png;base64,aGk="]})[:2] == (400, 40001)
    assert refused(listed | {"echo": True})[:2] == (400, 40001)
    status, code, text = refused(fastchat_request(prompt="Once upon a time"))
    assert (status, code) == (400, 40001) and "Raw text completion is not supported" in text
    assert refused(fastchat_request(top_k=-2))[:2] == (400, 40001)


# ---- FastChat 0.2.36's controller and openai_api_server in front of the gateway ---------------------------------


@pytest.fixture(scope="session")
def fastchat_python() -> Path:
    """The FastChat venv's Python, built on first use (from PyPI) and reused while the pins are the same."""
    python = FASTCHAT_VENV / "bin" / "python"
    stamp = FASTCHAT_VENV / "requirements.txt"
    wanted = "\n".join(FASTCHAT_REQUIREMENTS)
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(FASTCHAT_VENV)], check=True)
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", *FASTCHAT_REQUIREMENTS], capture_output=True, text=True
    )
    assert install.returncode == 0, f"installing {FASTCHAT_REQUIREMENTS} failed:\n{install.stderr[-3000:]}"
    stamp.write_text(wanted)
    return python


@dataclass
class FastChatStack:
    python: Path
    controller: str
    api: str
    gateway: str
    gateway_proc: Proc
    controller_proc: Proc


@pytest.fixture(scope="module")
def fastchat_stack(
    fastchat_python: Path, redis_server: RedisServer, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FastChatStack]:
    """FastChat's controller (expiry EXPIRY_S) and openai_api_server; the gateway registered with the
    controller, heart-beating every second; one worker on the tiny model."""
    logs = tmp_path_factory.mktemp("fastchat")
    redis_server.client().flushall()
    env = {"LOGDIR": str(logs), "FASTCHAT_CONTROLLER_HEART_BEAT_EXPIRATION": str(EXPIRY_S)}
    started: list[Proc] = []
    try:
        controller = f"http://127.0.0.1:{free_port()}"
        started.append(fastchat_server(fastchat_python, "controller", controller, [], logs, env))
        wait_for(lambda: answers(controller + "/list_models", started), 120, "FastChat's controller")
        worker = spawn("worker", worker_args(redis_server.url, model=MODEL, model_path=tiny_model), logs)
        started.append(worker)
        gateway_proc, gateway = spawn_gateway(
            redis_server.url, logs, "--controller-address", controller, "--heartbeat-s", "1"
        )
        started.append(gateway_proc)
        api = f"http://127.0.0.1:{free_port()}"
        args = ["--controller-address", controller]
        started.append(fastchat_server(fastchat_python, "openai_api_server", api, args, logs, env))
        wait_for(lambda: MODEL in listed(controller, started), 120, "FastChat's controller to list the model")
        wait_for(lambda: answers(api + "/v1/models", started), 120, "FastChat's openai_api_server")
        yield FastChatStack(fastchat_python, controller, api, gateway, gateway_proc, started[0])
    finally:
        for proc in started:
            proc.stop(10)


def fastchat_server(python: Path, module: str, url: str, args: list[str], logs: Path, env: dict[str, str]) -> Proc:
    host, port = url.removeprefix("http://").split(":")
    command = [str(python), "-m", f"fastchat.serve.{module}", "--host", host, "--port", port, *args]
    return spawn(module, command, logs, env)


def answers(url: str, procs: list[Proc]) -> bool:
    for proc in procs:
        assert proc.alive, f"{proc.name} exited:\n{proc.log()[-3000:]}"
    try:
        return httpx.request("GET" if "/v1/" in url else "POST", url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def listed(controller: str, procs: list[Proc]) -> list[str]:
    if not answers(controller + "/list_models", procs):
        return []
    return list(httpx.post(controller + "/list_models", timeout=5).json()["models"])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_fastchat_openai_server_answers_as_the_gateway_does(fastchat_stack: FastChatStack) -> None:
    spec = {
        "fastchat": fastchat_stack.api,
        "gateway": fastchat_stack.gateway,
        "model": MODEL,
        "image": "data:image/png;base64," + png_b64(800, 600, 5),
    }
    client = subprocess.run(
        [str(fastchat_stack.python), str(ROOT / "tests" / "fastchat_client.py")],
        input=json.dumps(spec),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert client.returncode == 0, client.stderr[-3000:]
    seen = json.loads(client.stdout)
    for chat in ("text", "image"):
        ours = seen[f"gateway/{chat}/plain"]["text"]
        assert ours, f"{chat}: empty answer"
        assert seen[f"gateway/{chat}/stream"]["text"] == ours
        # temperature 0: through FastChat, the string prompt reaches the model as the same conversation
        assert seen[f"fastchat/{chat}/plain"]["text"] == ours, chat
        # FastChat's own streaming drops U+FFFD (the random-weight model writes stray bytes): all else is equal
        assert seen[f"fastchat/{chat}/stream"]["text"] == ours.replace("\ufffd", ""), chat
    usage = seen["usage"]
    assert usage["last_choices"] == [] and usage["usage_chunks"] == 1  # OpenAI's usage chunk: choices []
    assert usage["last_usage"]["completion_tokens"] >= 1
    answer, stop = seen["long"]["text"], seen["stop"]
    assert stop, f"no stop string to try in {answer!r}"
    for form in ("stop/string", "stop/list", "stop/stream"):
        assert seen[form]["text"] == answer[: answer.find(stop)], form
    assert seen["stop/string"]["finish_reason"] == "stop"
    assert seen["n=2"]["status"] == 400 and seen["n=2"]["body"]["code"] == 40302


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_gateway_stays_listed_across_the_controllers_expiry_sweep(fastchat_stack: FastChatStack) -> None:
    procs = [fastchat_stack.controller_proc, fastchat_stack.gateway_proc]
    registrations = fastchat_stack.gateway_proc.log().count("registered with controller")
    # A worker that never heart-beats: it disappears at the first sweep at least EXPIRY_S after it registered.
    # Nothing may call /refresh_all_workers (FastChat's /v1/models does) meanwhile: it re-registers everyone.
    canary = {"worker_name": "http://127.0.0.1:9/canary", "check_heart_beat": True}
    status = {"model_names": ["canary"], "speed": 1, "queue_length": 0}
    httpx.post(fastchat_stack.controller + "/register_worker", json=canary | {"worker_status": status}, timeout=5)
    assert "canary" in listed(fastchat_stack.controller, procs)
    wait_for(lambda: "canary" not in listed(fastchat_stack.controller, procs), 4 * EXPIRY_S, "an expiry sweep")
    assert MODEL in listed(fastchat_stack.controller, procs)
    # and not dropped by the sweep then registered again in between: its heartbeats kept it
    assert fastchat_stack.gateway_proc.log().count("registered with controller") == registrations
