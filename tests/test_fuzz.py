"""Property tests at every parsing boundary. Each example builds a valid value from the pydantic model's own
fields and constraints (it must be accepted, exactly), then breaks it in one place (it must be refused with a
typed error that names that place). So every test exercises acceptance and refusal on every example.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from broker_worker.job_run import BadEntry, parse_entry
from broker_worker.model.prompt import CHATML, build_conversation
from broker_worker.protocol.errors import JobError
from broker_worker.protocol.messages import (
    JOB_ID_PATTERN,
    MAX_CONTENT_CHARS,
    MAX_IMAGES_PER_JOB,
    MAX_MESSAGES,
    Cancelled,
    ChatMessage,
    Delta,
    Done,
    Failed,
    Job,
    SamplingParams,
    Started,
    Usage,
    parse_event,
)
from gateway.openai_request import OpenAIChatRequest, openai_to_prompt
from gateway.settings import GatewaySettings
from gateway.validation import GenerateRequest, build_job
from tests.helpers import png_b64

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DELETE = object()  # a mutation that removes the field
Path = tuple[str | int, ...]
#: Each field's own constraints (ge/gt/le/lt), read from the model: the strategies follow the code, not a copy.
SAMPLING_FIELDS = ("temperature", "top_p", "max_new_tokens", "max_input_tiles", "repetition_penalty")
ROLES = ("system", "user", "assistant")
IMAGE = png_b64(2, 2)  # the gateway reads image headers, so a real (tiny) PNG


def constraint(model: type[BaseModel], name: str, key: str) -> Any:
    """A bound (ge, gt, le, lt, min_length, max_length, pattern) of a model field, or None."""
    return next((getattr(m, key) for m in model.model_fields[name].metadata if getattr(m, key, None) is not None), None)


def in_range(model: type[BaseModel], name: str) -> st.SearchStrategy[Any]:
    lo = constraint(model, name, "ge") if constraint(model, name, "ge") is not None else constraint(model, name, "gt")
    hi = constraint(model, name, "le") if constraint(model, name, "le") is not None else constraint(model, name, "lt")
    if model.model_fields[name].annotation is int:
        return st.integers(lo, hi)
    return st.floats(lo, hi, exclude_min=constraint(model, name, "gt") is not None, allow_nan=False)


def out_of_range(model: type[BaseModel], name: str) -> st.SearchStrategy[Any]:
    """A value just past either bound, or of a type no lax coercion turns into a number."""
    is_int = model.model_fields[name].annotation is int
    options: list[st.SearchStrategy[Any]] = [st.lists(st.integers(), max_size=2), st.just({"n": 1})]
    for key, below in (("ge", True), ("gt", True), ("le", False), ("lt", False)):
        bound = constraint(model, name, key)
        if bound is None:
            continue
        inclusive = key in ("ge", "le")  # the bound itself is allowed: step past it
        if is_int:
            step = 1 if inclusive else 0
            options.append(
                st.integers(bound - 10**6, bound - step) if below else st.integers(bound + step, bound + 10**6)
            )
        else:
            far = bound - 1e6 if below else bound + 1e6
            lo, hi = (far, bound) if below else (bound, far)
            options.append(st.floats(lo, hi, exclude_min=not below and inclusive, exclude_max=below and inclusive))
    return st.one_of(options)


def sampling(model: type[BaseModel] = SamplingParams) -> dict[str, st.SearchStrategy[Any]]:
    return {name: in_range(model, name) for name in SAMPLING_FIELDS}


messages = st.builds(
    ChatMessage,
    role=st.sampled_from(ROLES),
    content=st.none() | st.text(max_size=30),
    image=st.lists(st.just(IMAGE), max_size=2),
)
job_ids = st.from_regex(JOB_ID_PATTERN, fullmatch=True)
jobs = st.builds(
    Job,
    id=job_ids,
    model=st.text(min_size=1, max_size=20),
    prompt=st.lists(messages, min_size=1, max_size=6),
    deadline_ms=st.none() | st.integers(0, 2**42),
    count_only=st.booleans(),
    **sampling(),
)


def set_at(value: dict[str, Any], path: Path, new: Any) -> dict[str, Any]:
    """A deep copy of ``value`` with ``new`` at ``path`` (or the field removed, for DELETE)."""
    out = copy.deepcopy(value)
    *parents, last = path
    target: Any = out
    for key in parents:
        target = target[key]
    if new is DELETE:
        del target[last]
    else:
        target[last] = new
    return out


def job_mutations(value: dict[str, Any], *, job_only: bool = True) -> st.SearchStrategy[tuple[Path, Any]]:
    """One broken field of a valid job (or of a worker-protocol request: ``job_only=False``), and where it shows."""
    message = st.integers(0, len(value["prompt"]) - 1)
    # a worker-protocol request's own bounds (FastChat's form sends any max_new_tokens: capped, not refused)
    model: type[BaseModel] = Job if job_only else GenerateRequest
    numeric = st.sampled_from(SAMPLING_FIELDS).flatmap(lambda f: out_of_range(model, f).map(lambda v: ((f,), v)))
    shared = st.one_of(
        numeric,
        st.sampled_from([(("model",), DELETE), (("prompt",), DELETE), (("model",), ""), (("model",), "m" * 201)]),
        st.just((("prompt",), [])),
        st.just((("prompt",), value["prompt"][:1] * (MAX_MESSAGES + 1))),
        message.map(lambda k: (("prompt", k, "role"), "wizard")),
        message.map(lambda k: (("prompt", k, "content"), "x" * (MAX_CONTENT_CHARS + 1))),
        message.map(lambda k: (("prompt", k, "image"), [IMAGE] * (MAX_IMAGES_PER_JOB + 1))),
        message.map(lambda k: (("prompt", k), "not a message")),
    )
    if not job_only:
        return shared
    return shared | st.one_of(
        st.sampled_from(["a{b}", "", "x" * 81, "white space", "é"]).map(lambda bad: (("id",), bad)),
        st.just((("prompt",), [{"role": "user", "image": [IMAGE] * 17}] * 2)),  # 34 images across messages
        st.just((("deadline_ms",), "tomorrow")),
    )


def refused_at(error: ValidationError, path: Path) -> bool:
    """Whether pydantic named ``path`` (or a place inside it) as a problem."""
    return any(tuple(e["loc"][: len(path)]) == path for e in error.errors())


@FAST
@given(jobs, st.data())
def test_jobs_built_from_the_model_are_accepted_and_broken_ones_refused(job: Job, data: st.DataObject) -> None:
    value = job.model_dump(mode="json")
    assert Job.model_validate(value) == job
    assert Job.model_validate_json(job.model_dump_json()) == job
    path, bad = data.draw(job_mutations(value))
    with pytest.raises(ValidationError) as refused:
        Job.model_validate(set_at(value, path, bad))
    assert refused_at(refused.value, path), (path, refused.value.errors())


@FAST
@given(jobs, st.data())
def test_stream_entries_are_jobs_or_bad_entries_that_say_why(job: Job, data: st.DataObject) -> None:
    value = job.model_dump(mode="json")
    assert parse_entry({"job": json.dumps(value)}) == job
    path, bad = data.draw(job_mutations(value))
    with pytest.raises(BadEntry, match=r"^invalid job: ") as refused:
        parse_entry({"job": json.dumps(set_at(value, path, bad))})
    where = ".".join(str(p) for p in path)
    assert f"{where}: " in str(refused.value) or f"{where}." in str(refused.value), (where, str(refused.value))
    with pytest.raises(BadEntry, match="id: missing"):
        parse_entry({"job": json.dumps(set_at(value, ("id",), DELETE))})
    junk = data.draw(st.text(max_size=20).filter(lambda t: not t.strip().startswith(("{", "[", '"'))))
    with pytest.raises(BadEntry, match=r"^invalid job: |^no 'job' field"):
        parse_entry(data.draw(st.sampled_from([{"job": junk + "{"}, {"other": junk}])))


@st.composite
def conversations(draw: st.DrawFn) -> list[ChatMessage]:
    """What InternVL accepts: an optional system first, user and assistant turns after a first user message, a
    user message last, then optionally the empty assistant message InternVL's app appends."""
    user = st.builds(
        ChatMessage, role=st.just("user"), content=st.text(max_size=20), image=st.lists(st.just(IMAGE), max_size=3)
    )
    assistant = st.builds(ChatMessage, role=st.just("assistant"), content=st.none() | st.text(max_size=20))
    system = st.builds(ChatMessage, role=st.just("system"), content=st.text(max_size=20))
    prompt = [*draw(st.lists(system, max_size=1)), draw(user), *draw(st.lists(user | assistant, max_size=4))]
    prompt.append(draw(user))
    return prompt + draw(st.lists(st.just(ChatMessage(role="assistant", content=None)), max_size=1))


@FAST
@given(conversations(), st.integers(1, 24), st.data())
def test_conversations_build_and_broken_ones_are_typed_errors(
    prompt: list[ChatMessage], tiles: int, data: st.DataObject
) -> None:
    conversation = build_conversation(prompt, tiles)
    users = [m for m in prompt if m.role == "user"]
    assert conversation.images == [image for m in users for image in m.image]
    assert len(conversation.budgets) == len(conversation.images) and min(conversation.budgets, default=1) >= 1
    if users[-1].image:  # the last message with images shares the tile budget
        assert conversation.budgets[-1] == max(1, tiles // len(users[-1].image))
    assert conversation.render(CHATML).count("<image>") == len(conversation.images)
    first = 1 if prompt[0].role == "system" else 0
    breakers: list[Callable[[], list[ChatMessage]]] = [
        lambda: [*prompt[:first], ChatMessage(role="assistant", content="too early"), *prompt[first:]],
        lambda: [*prompt[: first + 1], ChatMessage(role="system", content="late"), *prompt[first + 1 :]],
        lambda: [m for m in prompt if m.role != "user"],
    ]
    with pytest.raises(JobError) as refused:
        build_conversation(data.draw(st.sampled_from(breakers))(), tiles)
    assert refused.value.code == 40001


events = st.one_of(
    st.builds(Started, seq=st.integers(1, 10**6), worker=st.text(min_size=1, max_size=20), resumed=st.booleans()),
    st.builds(Delta, seq=st.integers(1, 10**6), text=st.text(max_size=30)),
    st.builds(
        Done,
        seq=st.integers(1, 10**6),
        finish_reason=st.sampled_from(["stop", "length"]),
        usage=st.builds(Usage, prompt_tokens=st.integers(0, 10**6), completion_tokens=st.integers(0, 10**6)),
    ),
    st.builds(Failed, seq=st.integers(1, 10**6), error_code=st.integers(40001, 50006), message=st.text(max_size=30)),
    st.builds(Cancelled, seq=st.integers(1, 10**6)),
)
#: The field each event type cannot do without.
REQUIRED = {"started": "worker", "delta": "text", "done": "finish_reason", "failed": "message"}


@FAST
@given(events, st.data())
def test_events_round_trip_and_broken_ones_are_refused(event: Any, data: st.DataObject) -> None:
    raw = event.model_dump_json()
    assert parse_event(raw) == event
    kind = event.type
    breaks: list[tuple[str, Any, Path]] = [("seq", {"n": 1}, (kind, "seq"))]  # (field, bad value, error loc)
    breaks += [("type", "unknown", ()), ("type", DELETE, ())]  # no tag: refused as a whole
    if kind in REQUIRED:
        breaks.append((REQUIRED[kind], DELETE, (kind, REQUIRED[kind])))
    if kind == "done":
        breaks.append(("finish_reason", "eos", ("done", "finish_reason")))
    field, bad, loc = data.draw(st.sampled_from(breaks))
    with pytest.raises(ValidationError) as refused:
        parse_event(json.dumps(set_at(json.loads(raw), (field,), bad)))
    if loc:
        assert refused_at(refused.value, loc), refused.value.errors()
    else:
        assert [e["type"] for e in refused.value.errors()] in (["union_tag_invalid"], ["union_tag_not_found"])


worker_requests = st.builds(
    GenerateRequest,
    model=st.text(min_size=1, max_size=20),
    prompt=st.lists(messages, min_size=1, max_size=5),
    job_id=st.none() | job_ids,
    **(sampling(GenerateRequest) | {"max_new_tokens": st.integers(1, GatewaySettings().max_new_tokens)}),
)


@FAST
@given(worker_requests, st.data())
def test_worker_requests_become_jobs_and_broken_ones_are_refused(request: GenerateRequest, data: st.DataObject) -> None:
    value = request.model_dump(mode="json")
    parsed = GenerateRequest.model_validate(value)
    built = build_job(parsed.model, parsed.prompt, parsed, GatewaySettings(), parsed.job_id)
    assert (built.prompt, built.model) == (request.prompt, request.model)
    assert {f: getattr(built, f) for f in SAMPLING_FIELDS} == {f: getattr(request, f) for f in SAMPLING_FIELDS}
    assert built.id == request.job_id or request.job_id is None
    path, bad = data.draw(job_mutations(value, job_only=False))
    with pytest.raises(ValidationError) as refused:
        GenerateRequest.model_validate(set_at(value, path, bad))
    assert refused_at(refused.value, path), (path, refused.value.errors())


openai_parts = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=10)}),
    st.just({"type": "image_url", "image_url": {"url": "data:image/png;base64," + IMAGE}}),
)
openai_messages = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "user", "assistant", "developer"]),
        "content": st.none() | st.text(max_size=20) | st.lists(openai_parts, max_size=3),
    }
)
openai_requests = st.fixed_dictionaries(
    {"model": st.text(min_size=1, max_size=20), "messages": st.lists(openai_messages, min_size=1, max_size=5)},
    optional={
        "stream": st.booleans(),
        "temperature": in_range(OpenAIChatRequest, "temperature"),
        "top_p": in_range(OpenAIChatRequest, "top_p"),
        "max_tokens": st.integers(1, 4096),
        "max_input_tiles": in_range(OpenAIChatRequest, "max_input_tiles"),
    },
)


@FAST
@given(openai_requests, st.data())
def test_openai_requests_become_prompts_and_broken_ones_are_refused(value: dict[str, Any], data: st.DataObject) -> None:
    prompt = openai_to_prompt(OpenAIChatRequest.model_validate(value))
    roles = [m["role"].replace("developer", "system") for m in value["messages"]]
    assert [m.role for m in prompt] == roles
    for message, sent in zip(prompt, value["messages"], strict=True):
        parts = sent["content"] if isinstance(sent["content"], list) else [{"type": "text", "text": sent["content"]}]
        assert message.text == "\n".join(p.get("text") or "" for p in parts if p["type"] == "text")
        assert message.image == [IMAGE] * sum(p["type"] == "image_url" for p in parts)
    numeric = st.sampled_from(["temperature", "top_p", "n", "max_input_tiles", "repetition_penalty"])
    path, bad = data.draw(
        st.one_of(
            numeric.flatmap(lambda f: out_of_range(OpenAIChatRequest, f).map(lambda v: ((f,), v))),
            st.sampled_from([(("messages",), []), (("model",), DELETE), (("messages", 0, "role"), "tool")]),
            st.just((("max_tokens",), 0)),
        )
    )
    with pytest.raises(ValidationError) as refused:
        OpenAIChatRequest.model_validate(set_at(value, path, bad))
    assert refused_at(refused.value, path), (path, refused.value.errors())
    remote = set_at(value, ("messages", 0, "content"), [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}])
    with pytest.raises(JobError, match="data: URL") as fetched:
        openai_to_prompt(OpenAIChatRequest.model_validate(remote))
    assert fetched.value.code == 40001
