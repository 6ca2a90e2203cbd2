"""OpenAI's chat request (``/v1/chat/completions``, and each line of ``broker-batch``) as a ``Job``: its messages
become the worker protocol's prompt list (content parts joined as FastChat's openai_api_server joins them), its
images must be data URLs, and what the workers cannot do (``n`` > 1, log probabilities) is refused with 40302."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from broker_worker.protocol.errors import ErrorCode, JobError, describe_problems, invalid
from broker_worker.protocol.images import strip_data_url
from broker_worker.protocol.messages import (
    MAX_CONTENT_CHARS,
    MAX_IMAGE_B64_CHARS,
    MAX_STOPS,
    ChatMessage,
    Job,
    SamplingParams,
)
from gateway.settings import GatewaySettings
from gateway.validation import StopString, build_job, stop_list

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
    n: int = Field(default=1, ge=1, description="only 1: more is refused with 40302")
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOPS)] | None = None
    logprobs: bool | None = Field(default=None, description="not available: true is refused with 40302")


def openai_to_prompt(request: OpenAIChatRequest) -> list[ChatMessage]:
    """The worker protocol's prompt list; a message the job cannot hold (joined text too long, too many
    images) is a typed 40001 naming the message, like ``/worker_generate_stream``'s."""
    return [_to_message(index, message) for index, message in enumerate(request.messages)]


def _to_message(index: int, message: OpenAIMessage) -> ChatMessage:
    role = "system" if message.role == "developer" else message.role
    if isinstance(message.content, list):
        # joined as FastChat's openai_api_server joins them, so both paths give the model the same text
        text = "\n".join(p.text or "" for p in message.content if p.type == "text")
        images = [_data_url(p.image_url.url) for p in message.content if p.type == "image_url" and p.image_url]
    else:
        text, images = message.content or "", []
    try:
        return ChatMessage(role=role, content=text, image=images)
    except ValidationError as exc:
        where = describe_problems(exc.errors(), empty="message").replace("image:", "images:")
        raise invalid(f"invalid request: messages.{index}.{where}") from exc


def openai_job(request: OpenAIChatRequest, settings: GatewaySettings) -> Job:
    """The job of an OpenAI chat request (``/v1/chat/completions``, and each line of ``broker-batch``)."""
    if request.n > 1:
        raise JobError(
            ErrorCode.PARAM_OUT_OF_RANGE, f"n: {request.n} choices asked; one per request here (send {request.n})"
        )
    if request.logprobs:
        raise JobError(ErrorCode.PARAM_OUT_OF_RANGE, "logprobs: this gateway's workers return no log probabilities")
    params = SamplingParams(
        temperature=request.temperature,
        top_p=request.top_p,
        max_new_tokens=min(request.max_completion_tokens or request.max_tokens or 1024, settings.max_new_tokens),
        max_input_tiles=request.max_input_tiles,
        repetition_penalty=request.repetition_penalty,
    )
    return build_job(request.model, openai_to_prompt(request), params, settings, stop=stop_list(request.stop))


def _data_url(url: str) -> str:
    if not url.startswith("data:"):
        raise invalid("image_url must be a data: URL (base64); the gateway does not fetch remote images")
    return strip_data_url(url)
