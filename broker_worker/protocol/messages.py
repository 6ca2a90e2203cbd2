"""Typed messages at the Redis boundary: the job a client queues and the events a worker publishes.

Both sides import these; nothing here imports torch. Everything on the wire is plain JSON (never pickle).
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator

from broker_worker.protocol.errors import ErrorCode
from broker_worker.protocol.states import TERMINAL_STATUSES

# Hard limits a job must respect whoever submits it (the gateway may enforce lower ones).
MAX_MESSAGES = 256
MAX_CONTENT_CHARS = 200_000
MAX_IMAGES_PER_JOB = 32
MAX_IMAGE_B64_CHARS = 28_000_000  # ~20 MB decoded
MAX_NEW_TOKENS = 16_384
MAX_STOPS = 16  # stop strings, and stop token ids, per job
MAX_STOP_CHARS = 256
JOB_ID_PATTERN = r"^[A-Za-z0-9_.:\-]{1,80}$"

Role = Literal["system", "user", "assistant"]
#: The lane a job is queued on (constants.LANES): a worker takes a batch job only when no interactive one waits.
Priority = Literal["interactive", "batch"]


def new_job_id() -> str:
    return uuid.uuid4().hex


def now_ms() -> int:
    return int(time.time() * 1000)


class ChatMessage(BaseModel):
    """One element of the ``prompt`` list of InternVL's model worker protocol."""

    model_config = ConfigDict(extra="ignore")

    role: Role
    content: str | None = Field(default="", max_length=MAX_CONTENT_CHARS)
    image: list[Annotated[str, Field(max_length=MAX_IMAGE_B64_CHARS)]] = Field(
        default_factory=list, max_length=MAX_IMAGES_PER_JOB
    )

    @property
    def text(self) -> str:
        return self.content or ""


class SamplingParams(BaseModel):
    """The generation fields of InternVL's worker request, with the Streamlit app's defaults."""

    model_config = ConfigDict(extra="ignore")

    temperature: float = Field(default=0.7, ge=0.0, le=2.0)
    top_p: float = Field(default=0.95, ge=0.0, le=1.0)
    max_new_tokens: int = Field(default=1024, ge=1, le=MAX_NEW_TOKENS)
    max_input_tiles: int = Field(default=12, ge=1, le=64)
    repetition_penalty: float = Field(default=1.1, gt=0.0, le=10.0)
    #: Sample from the k likeliest tokens; None keeps the model's own setting, 0 or -1 turns top-k off.
    top_k: int | None = Field(default=None, ge=-1)


class Job(SamplingParams):
    """A generation job as queued on ``ivl:jobs:<model>`` under the field ``job``."""

    id: str = Field(default_factory=new_job_id, pattern=JOB_ID_PATTERN)
    model: str = Field(min_length=1, max_length=200)
    prompt: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    #: Unix ms after which a job that has not started is dropped (failed with 50006) instead of run.
    deadline_ms: int | None = None
    created_ms: int = Field(default_factory=now_ms)
    #: Only count the prompt's tokens (images included): the job ends with ``done`` and usage, nothing generated.
    count_only: bool = False
    #: Generation ends at the first of these strings; the text is published up to it, without it (OpenAI's and
    #: FastChat's ``stop``).
    stop: list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]] = Field(
        default_factory=list, max_length=MAX_STOPS
    )
    #: Token ids that end generation besides the model's own end tokens (FastChat's ``stop_token_ids``).
    stop_token_ids: list[Annotated[int, Field(ge=0)]] = Field(default_factory=list, max_length=MAX_STOPS)
    #: Which lane the Python clients queue the job on (``JobStore.submit``). Workers go by the stream an entry
    #: is on, so an entry added by hand to ``ivl:jobs:<model>:batch`` is a batch job whatever it says here.
    priority: Priority = "interactive"

    @field_validator("prompt")
    @classmethod
    def _images_bounded(cls, prompt: list[ChatMessage]) -> list[ChatMessage]:
        total = sum(len(m.image) for m in prompt)
        if total > MAX_IMAGES_PER_JOB:
            raise ValueError(f"{total} images in one job; at most {MAX_IMAGES_PER_JOB} are allowed")
        return prompt

    @property
    def image_count(self) -> int:
        return sum(len(m.image) for m in self.prompt)

    def expired(self, at_ms: int | None = None) -> bool:
        return self.deadline_ms is not None and (at_ms or now_ms()) > self.deadline_ms


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def with_total(self) -> dict[str, int]:
        """The usage object HTTP clients get (OpenAI's shape, which FastChat's worker chunks reuse)."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


FinishReason = Literal["stop", "length"]


class _Event(BaseModel):
    model_config = ConfigDict(extra="ignore")
    seq: int = 0


class Started(_Event):
    type: Literal["started"] = "started"
    worker: str
    #: True when this worker continues a job another worker had begun (text so far is kept).
    resumed: bool = False


class Delta(_Event):
    type: Literal["delta"] = "delta"
    text: str


class Done(_Event):
    type: Literal["done"] = "done"
    finish_reason: FinishReason
    usage: Usage


class Failed(_Event):
    type: Literal["failed"] = "failed"
    error_code: int = ErrorCode.INTERNAL_ERROR
    message: str


class Cancelled(_Event):
    type: Literal["cancelled"] = "cancelled"


Event = Annotated[Started | Delta | Done | Failed | Cancelled, Field(discriminator="type")]
TerminalEvent = Done | Failed | Cancelled
EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)
TERMINAL_TYPES = frozenset(status.value for status in TERMINAL_STATUSES)  # event types that end a job


def parse_event(raw: str | bytes) -> Event:
    return EVENT_ADAPTER.validate_json(raw)


def is_terminal(event: Event) -> bool:
    return event.type in TERMINAL_TYPES


class WorkerHealth(BaseModel):
    """Value of a worker's health key (JSON), refreshed every heartbeat with a TTL."""

    worker_id: str
    model: str
    slots: int
    running: int
    tokens_per_s: float = 0.0
    jobs_done: int = 0
    host: str = ""
    pid: int = 0
    device: str = ""
    context_len: int = 0
    started_ms: int = Field(default_factory=now_ms)
    updated_ms: int = Field(default_factory=now_ms)
    draining: bool = False


class DeadLetter(BaseModel):
    """An entry of ``ivl:dead``: what could not be run and why."""

    stream: str
    entry_id: str
    job_id: str | None = None
    reason: str
    fields: dict[str, str] = Field(default_factory=dict)
    at_ms: int = Field(default_factory=now_ms)
