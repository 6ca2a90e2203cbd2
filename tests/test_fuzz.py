"""Property tests: whatever arrives (JSON of any shape), parsing gives a typed value or a typed error."""

from __future__ import annotations

import contextlib
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from broker_worker.job_run import BadEntry, parse_entry
from broker_worker.model.prompt import CHATML, build_conversation
from broker_worker.protocol.errors import JobError
from broker_worker.protocol.messages import EVENT_ADAPTER, ChatMessage, Job, parse_event
from gateway.validation import OpenAIChatRequest, SeedRequest, openai_to_prompt

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
roles = st.sampled_from(["system", "user", "assistant"])
messages = st.builds(
    lambda role, text, n: {"role": role, "content": text, "image": ["aGk="] * n},
    roles,
    st.text(max_size=30),
    st.integers(0, 2),
)
job_like = st.fixed_dictionaries(
    {"model": st.text(min_size=1, max_size=10), "prompt": st.lists(messages, min_size=1, max_size=5)},
    optional={
        "id": st.from_regex(r"[A-Za-z0-9_.:-]{1,20}", fullmatch=True),
        "temperature": st.floats(0, 2),
        "top_p": st.floats(0, 1),
        "max_new_tokens": st.integers(1, 4096),
        "max_input_tiles": st.integers(1, 64),
        "repetition_penalty": st.floats(0.01, 10),
        "deadline_ms": st.integers(0, 2**42),
    },
)
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(json_values)
def test_any_json_is_a_job_or_a_validation_error(value: Any) -> None:
    with contextlib.suppress(ValidationError):
        Job.model_validate(value)


@FAST
@given(
    st.dictionaries(st.text(max_size=10), st.text(max_size=50), max_size=4)
    | st.builds(lambda v: {"job": json.dumps(v)}, json_values)
)
def test_any_stream_entry_is_a_job_or_a_bad_entry(fields: dict[str, str]) -> None:
    try:
        assert isinstance(parse_entry(fields), Job)
    except BadEntry as exc:
        assert str(exc)


@FAST
@given(job_like)
def test_jobs_round_trip_through_json(value: dict[str, Any]) -> None:
    job = Job.model_validate(value)
    assert Job.model_validate_json(job.model_dump_json()) == job


@FAST
@given(st.lists(messages, min_size=1, max_size=6), st.integers(1, 24))
def test_any_conversation_builds_or_is_a_typed_error(raw: list[dict[str, Any]], tiles: int) -> None:
    prompt = [ChatMessage.model_validate(m) for m in raw]
    try:
        conversation = build_conversation(prompt, tiles)
    except JobError as exc:
        assert exc.code == 40001
        return
    assert len(conversation.images) == len(conversation.budgets)
    assert all(b >= 1 for b in conversation.budgets)
    rendered = conversation.render(CHATML)
    assert rendered.count("<image>") == len(conversation.images)


@FAST
@given(json_values)
def test_any_json_is_an_event_or_a_validation_error(value: Any) -> None:
    try:
        event = EVENT_ADAPTER.validate_python(value)
    except ValidationError:
        return
    assert parse_event(event.model_dump_json()) == event


@FAST
@given(json_values)
def test_gateway_request_models_never_crash(value: Any) -> None:
    for model in (SeedRequest, OpenAIChatRequest):
        try:
            parsed = model.model_validate(value)
        except ValidationError:
            continue
        if isinstance(parsed, OpenAIChatRequest):
            with contextlib.suppress(JobError, ValidationError):
                openai_to_prompt(parsed)
