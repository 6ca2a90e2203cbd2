"""Requests in, jobs out: the seed payload and OpenAI chat messages become a ``Job`` within the gateway's limits.

Images are checked here (base64, format, header size) so bad input is refused in milliseconds with a typed
error, before anything is queued. Only the header is parsed: a decompression bomb is never decompressed. Bytes
after an image's end are dropped and its size is bounded by its pixels (``image_bytes``).
"""

from __future__ import annotations

import base64
import itertools
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from broker_worker.errors import ErrorCode, JobError, describe_problems, invalid
from broker_worker.images import ImageLimits, decode_base64, open_image, strip_data_url
from broker_worker.messages import (
    JOB_ID_PATTERN,
    MAX_CONTENT_CHARS,
    MAX_IMAGE_B64_CHARS,
    ChatMessage,
    Job,
    SamplingParams,
)
from gateway import image_bytes
from gateway.settings import GatewaySettings


class SeedRequest(SamplingParams):
    """Body of ``/worker_generate_stream`` as InternVL's Streamlit app and api.py send it."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=200)
    prompt: list[ChatMessage] = Field(min_length=1, max_length=256)
    job_id: str | None = Field(default=None, pattern=JOB_ID_PATTERN, description="client-chosen id (idempotent)")


class CountRequest(BaseModel):
    """Body of ``/count_token``: FastChat sends a plain string; a seed prompt list is accepted too."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=200)
    prompt: str | list[ChatMessage] = Field(max_length=200_000)


Text = Annotated[str, Field(max_length=MAX_CONTENT_CHARS)]
MAX_PARTS = 1024  # content parts of one OpenAI message (text pieces and images)


class OpenAIImageUrl(BaseModel):
    url: str = Field(max_length=MAX_IMAGE_B64_CHARS + 100)  # + the "data:image/…;base64," prefix


class OpenAIPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "image_url"]
    text: Text | None = None
    image_url: OpenAIImageUrl | None = None


class OpenAIMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: Text | Annotated[list[OpenAIPart], Field(max_length=MAX_PARTS)] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class OpenAIChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=200)
    messages: list[OpenAIMessage] = Field(min_length=1, max_length=256)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(default=0.7, ge=0.0, le=2.0)
    top_p: float = Field(default=0.95, ge=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    max_input_tiles: int = Field(default=12, ge=1, le=64)
    n: int = Field(default=1, ge=1, le=1)


def validation_error(exc: ValidationError) -> JobError:
    return invalid(f"invalid request: {describe_problems(exc.errors(), empty='body')}")


def openai_to_prompt(request: OpenAIChatRequest) -> list[ChatMessage]:
    """The worker protocol's prompt list; a message the job cannot hold (joined text too long, too many
    images) is a typed 40001 naming the message, like ``/worker_generate_stream``'s."""
    return [_to_message(index, message) for index, message in enumerate(request.messages)]


def _to_message(index: int, message: OpenAIMessage) -> ChatMessage:
    role = "system" if message.role == "developer" else message.role
    if isinstance(message.content, list):
        text = "".join(p.text or "" for p in message.content if p.type == "text")
        images = [_data_url(p.image_url.url) for p in message.content if p.type == "image_url" and p.image_url]
    else:
        text, images = message.content or "", []
    try:
        return ChatMessage(role=role, content=text, image=images)
    except ValidationError as exc:
        where = describe_problems(exc.errors(), empty="message").replace("image:", "images:")
        raise invalid(f"invalid request: messages.{index}.{where}") from exc


def _data_url(url: str) -> str:
    if not url.startswith("data:"):
        raise invalid("image_url must be a data: URL (base64); the gateway does not fetch remote images")
    return strip_data_url(url)


def build_job(
    model: str, prompt: list[ChatMessage], params: SamplingParams, settings: GatewaySettings, job_id: str | None = None
) -> Job:
    prompt = check_limits(prompt, params, settings)
    deadline_ms = int((time.time() + settings.start_timeout_s) * 1000)
    fields: dict[str, Any] = params.model_dump(include=set(SamplingParams.model_fields))
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
        m.model_copy(update={"image": [_bounded(b64, next(numbers), limits) for b64 in m.image]}) if m.image else m
        for m in prompt
    ]


def _bounded(b64: str, index: int, limits: ImageLimits) -> str:
    """Header checked (nothing decompressed), bytes after the image's end dropped, size bounded by its pixels."""
    data = decode_base64(b64, index, limits)
    image = open_image(data, index, limits, load=False)
    trimmed = image_bytes.trim(data)
    image_bytes.check_size(trimmed, image, index)
    return b64 if len(trimmed) == len(data) else base64.b64encode(trimmed).decode()
