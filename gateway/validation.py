"""Requests in, jobs out: the worker protocol's request (InternVL's or FastChat's form) becomes a ``Job`` within
the gateway's limits (``build_job``, which the OpenAI request of ``openai_request.py`` goes through too).

Images are checked here (base64, format, header size) so bad input is refused in milliseconds with a typed
error, before anything is queued. Only the header is parsed: a decompression bomb is never decompressed. Bytes
after an image's end are dropped and its size is bounded by its pixels (``image_bytes``).
"""

from __future__ import annotations

import itertools
import time
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, PlainValidator, TypeAdapter, ValidationError

from broker_worker.protocol.errors import ErrorCode, JobError, describe_problems, invalid
from broker_worker.protocol.images import ImageLimits
from broker_worker.protocol.messages import (
    JOB_ID_PATTERN,
    MAX_CONTENT_CHARS,
    MAX_IMAGE_B64_CHARS,
    MAX_IMAGES_PER_JOB,
    MAX_MESSAGES,
    MAX_NEW_TOKENS,
    MAX_STOP_CHARS,
    MAX_STOPS,
    ChatMessage,
    Job,
    SamplingParams,
)
from gateway import image_bytes
from gateway.fastchat_conv import parse_prompt
from gateway.settings import GatewaySettings

#: A string prompt holds a whole rendered chat (every turn's text, no image data).
MAX_PROMPT_CHARS = 4_000_000
#: ``fastchat.serve.inference.generate_stream``'s defaults: what FastChat's model worker uses for a parameter
#: a string-prompt request leaves out (top_k -1: off). Echo too defaults to on there.
FASTCHAT_DEFAULTS: dict[str, Any] = {
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": -1,
    "max_new_tokens": 256,
    "repetition_penalty": 1.0,
}
StopString = Annotated[str, Field(max_length=MAX_STOP_CHARS)]
_MESSAGES: TypeAdapter[list[ChatMessage]] = TypeAdapter(
    Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
)
_RENDERED: TypeAdapter[str] = TypeAdapter(Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)])


def _prompt(value: Any) -> list[ChatMessage] | str:
    """The form is picked by type, so a bad prompt gets its own form's errors at their own place
    (``prompt.0.image``), not both union branches' under their type names."""
    return _RENDERED.validate_python(value) if isinstance(value, str) else _MESSAGES.validate_python(value)


def _dump_prompt(value: list[ChatMessage] | str) -> list[dict[str, Any]] | str:
    # Written out: pydantic's serializer for a union behind a PlainValidator warned on every message.
    return value if isinstance(value, str) else [message.model_dump() for message in value]


Prompt = Annotated[
    list[ChatMessage] | str,
    PlainValidator(_prompt, json_schema_input_type=list[ChatMessage] | str),
    PlainSerializer(_dump_prompt),
]


class GenerateRequest(BaseModel):
    """Body of ``/worker_generate_stream`` and ``/worker_generate``, in either of two forms.

    InternVL's (its Streamlit app, api.py): ``prompt`` is a list of messages, images inside them; parameters the
    request leaves out take the Streamlit app's defaults. FastChat's model-worker request (its
    openai_api_server): ``prompt`` is a chat rendered with ``/worker_get_conv_template``, ``images`` are data URLs
    for its ``$$<image>$$`` placeholders, and parameters left out take FastChat's model worker's defaults.
    ``presence_penalty`` and ``frequency_penalty`` are accepted and ignored, as FastChat's model worker does.
    """

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=200)
    prompt: Prompt
    job_id: str | None = Field(default=None, pattern=JOB_ID_PATTERN, description="client-chosen id (idempotent)")
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1, description="-1 or 0: off")
    max_new_tokens: int | None = Field(default=None, ge=1)
    max_input_tiles: int = Field(default=12, ge=1, le=64)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    images: list[Annotated[str, Field(max_length=MAX_IMAGE_B64_CHARS + 100)]] = Field(
        default_factory=list, max_length=MAX_IMAGES_PER_JOB, description="data URLs (string prompt only)"
    )
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOPS)] | None = None
    stop_token_ids: list[int] | None = None
    echo: bool | None = Field(default=None, description="string prompt: text starts with it (default: on)")
    logprobs: bool | int | None = Field(default=None, description="not available: any value but null is refused")
    presence_penalty: float | None = None
    frequency_penalty: float | None = None

    @property
    def fastchat(self) -> bool:
        return isinstance(self.prompt, str)

    @property
    def echo_text(self) -> str:
        """What the answer's text starts with: the string prompt itself when echo is on (FastChat's default)."""
        return self.prompt if isinstance(self.prompt, str) and self.echo is not False else ""


class CountRequest(BaseModel):
    """Body of ``/count_token``: FastChat sends a plain string; InternVL's prompt list is accepted too."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=200)
    prompt: (
        Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]
        | Annotated[list[ChatMessage], Field(max_length=MAX_MESSAGES)]
    )


def validation_error(exc: ValidationError) -> JobError:
    return invalid(f"invalid request: {describe_problems(exc.errors(), empty='body')}")


def worker_job(request: GenerateRequest, settings: GatewaySettings) -> Job:
    """The job for either form of the worker protocol's request (see ``GenerateRequest``)."""
    if request.logprobs is not None and request.logprobs is not False:
        raise JobError(ErrorCode.PARAM_OUT_OF_RANGE, "logprobs: this gateway's workers return no log probabilities")
    if isinstance(request.prompt, str):
        prompt = parse_prompt(request.prompt, request.images)
    elif request.images:
        raise invalid("images: only with a string prompt; InternVL's list prompt has each message's own 'image'")
    elif request.echo:
        raise invalid("echo: only a string prompt can be echoed")
    else:
        prompt = request.prompt
    given = request.model_dump(include=set(SamplingParams.model_fields), exclude_none=True)
    values = (FASTCHAT_DEFAULTS | given) if request.fastchat else given
    if request.fastchat:
        # FastChat sends the context's room when its client sets no max_tokens: capped, and "length" says so.
        values["max_new_tokens"] = min(values["max_new_tokens"], settings.max_new_tokens, MAX_NEW_TOKENS)
    try:
        params = SamplingParams(**values)
    except ValidationError as exc:
        raise validation_error(exc) from exc
    return build_job(
        request.model,
        prompt,
        params,
        settings,
        request.job_id,
        stop=stop_list(request.stop),
        stop_token_ids=request.stop_token_ids or [],
    )


def count_prompt(prompt: str | list[ChatMessage]) -> list[ChatMessage]:
    """``/count_token``'s prompt: a list, a chat rendered with our template (images uncounted: FastChat sends
    none), or any other string as one user message."""
    if isinstance(prompt, list):
        return prompt
    try:
        return parse_prompt(prompt, None)
    except JobError:
        if len(prompt) > MAX_CONTENT_CHARS:
            raise
        return [ChatMessage(role="user", content=prompt)]


def stop_list(stop: str | list[str] | None) -> list[str]:
    """OpenAI's and FastChat's ``stop`` (a string or a list) as a list without empty strings or repeats."""
    given = [stop] if isinstance(stop, str) else stop or []
    return list(dict.fromkeys(s for s in given if s))


def build_job(
    model: str,
    prompt: list[ChatMessage],
    params: SamplingParams,
    settings: GatewaySettings,
    job_id: str | None = None,
    *,
    stop: list[str] | None = None,
    stop_token_ids: list[int] | None = None,
) -> Job:
    prompt = check_limits(prompt, params, settings)
    deadline_ms = int((time.time() + settings.start_timeout_s) * 1000)
    fields: dict[str, Any] = params.model_dump(include=set(SamplingParams.model_fields))
    fields.update(stop=stop or [], stop_token_ids=stop_token_ids or [])
    if job_id:
        fields["id"] = job_id
    try:
        return Job(model=model, prompt=prompt, deadline_ms=deadline_ms, **fields)
    except ValidationError as exc:
        raise validation_error(exc) from exc


def check_limits(prompt: list[ChatMessage], params: SamplingParams, settings: GatewaySettings) -> list[ChatMessage]:
    """The prompt within this gateway's limits, its images cut to the bytes they need (or a typed error)."""
    if params.max_new_tokens > settings.max_new_tokens:
        raise JobError(
            ErrorCode.PARAM_OUT_OF_RANGE,
            f"max_new_tokens {params.max_new_tokens} is over this gateway's limit {settings.max_new_tokens}",
        )
    count = sum(len(m.image) for m in prompt)
    if count > settings.max_images:
        raise JobError(
            ErrorCode.PARAM_OUT_OF_RANGE,
            f"{count} images in one request; this gateway accepts at most {settings.max_images}",
        )
    limits, numbers = ImageLimits(max_pixels=settings.max_image_pixels), itertools.count(1)
    return [
        m.model_copy(update={"image": [image_bytes.bounded(b64, next(numbers), limits) for b64 in m.image]})
        if m.image
        else m
        for m in prompt
    ]
