"""Events to OpenAI's chat completion chunks, as server-sent events (``data: {...}``), ending with ``[DONE]``."""

from __future__ import annotations

import json
import time
from json.encoder import encode_basestring as quote  # json.dumps(str, ensure_ascii=False), minus its wrappers
from typing import Any

from broker_worker.protocol.messages import Delta, Event, Job, Usage


class OpenAIFrames:
    """``include_usage`` (``stream_options``): a last chunk with ``usage`` and empty ``choices``, as OpenAI sends."""

    def __init__(self, job: Job, include_usage: bool) -> None:
        self._id = f"chatcmpl-{job.id}"
        self._model = job.model
        self._include_usage = include_usage
        # A delta's event as the bytes ``_chunk({"content": piece})`` makes, without building and encoding the
        # dict each time (the per-event JSON work was a share of the gateway's CPU per relayed event).
        self._head = 'data: {"id": ' + json.dumps(self._id, ensure_ascii=False)
        self._head += ', "object": "chat.completion.chunk", "created": '
        self._middle = ', "model": ' + json.dumps(job.model, ensure_ascii=False)
        self._middle += ', "choices": [{"index": 0, "delta": {"content": '

    def opening(self) -> bytes:
        return self._chunk({"role": "assistant", "content": ""})

    def delta(self, event: Delta) -> bytes:
        content = quote(event.text)
        return (
            self._head + str(int(time.time())) + self._middle + content + '}, "finish_reason": null}]}\n\n'
        ).encode()

    def event(self, event: Event) -> bytes:
        if event.type == "delta":
            return self.delta(event)
        if event.type == "done":
            last = self._chunk({}, event.finish_reason)
            return last + self._usage(event.usage) if self._include_usage else last
        if event.type == "cancelled":
            return self._chunk({}, "cancelled")
        if event.type == "failed":
            return self.failure(event.error_code, event.message)
        return b""  # started: nothing to show

    def failure(self, code: int, message: str) -> bytes:
        return b"data: " + json.dumps({"error": {"message": message, "code": code}}).encode() + b"\n\n"

    def closing(self) -> bytes:
        return b"data: [DONE]\n\n"

    def _usage(self, usage: Usage) -> bytes:
        return self._chunk(None, usage=usage.with_total())

    def _chunk(self, delta: dict[str, Any] | None, finish: str | None = None, **extra: Any) -> bytes:
        """One SSE event; ``delta=None`` is OpenAI's usage chunk, whose ``choices`` is empty."""
        choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
        body = {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": self._model,
            "choices": choices,
            **extra,
        }
        return b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n"
