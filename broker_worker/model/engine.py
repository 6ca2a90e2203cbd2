"""The model behind a small interface, so the worker loop runs the same with InternVL or a fake.

``Engine.generate(job, answer_prefix, cancel, on_delta)`` blocks (the worker calls it off the event loop), calls
``on_delta`` with each new piece of text as soon as it is decodable, stops within one token once ``cancel`` is
set, and returns a ``Finish``. Failures are ``JobError`` with a FastChat code and the real cause.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from broker_worker.protocol.messages import FinishReason, Job, Usage

OnDelta = Callable[[str], None]


@dataclass(frozen=True)
class Finish:
    finish_reason: FinishReason
    usage: Usage


class Engine(Protocol):
    """What the worker needs from a model."""

    model_name: str
    device: str
    context_len: int

    def generate(self, job: Job, answer_prefix: str, cancel: threading.Event, on_delta: OnDelta) -> Finish:
        """Run one job. ``answer_prefix`` is text already published by an earlier worker: continue after it."""
        ...

    def count_tokens(self, job: Job) -> int:
        """Prompt tokens of the job as the model would see it, images expanded; raises ``JobError`` like generate."""
        ...
