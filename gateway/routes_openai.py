"""OpenAI-compatible chat completions (``image_url`` with data: URLs), streaming (SSE) and not."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from json.encoder import encode_basestring as quote  # json.dumps(str, ensure_ascii=False), minus its wrappers
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from broker_worker.protocol.errors import ErrorCode, JobError
from broker_worker.protocol.messages import Event, Job, Usage
from gateway.deps import get_service
from gateway.errors import openai_error
from gateway.service import GatewayService
from gateway.streaming import RelayResponse
from gateway.validation import OpenAIChatRequest, openai_job, validation_error

router = APIRouter(prefix="/v1", tags=["openai"])
Service = Annotated[GatewayService, Depends(get_service)]


@router.get("/models")
async def models(service: Service) -> dict[str, object]:
    names = (await service.status()).model_names
    return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "internvl-redis"} for n in names]}


@router.post("/chat/completions")
async def chat_completions(request: OpenAIChatRequest, service: Service) -> Response:
    try:
        job = openai_job(request, service.settings)
        await service.admit(job.model)
        if request.stream:  # queued before the response starts: a full queue is an HTTP 429
            events = await service.start(job)
    except (JobError, ValidationError) as exc:
        service.metrics.requests.labels("chat_completions", "refused").inc()
        return openai_error(exc if isinstance(exc, JobError) else validation_error(exc))
    service.metrics.requests.labels("chat_completions", "accepted").inc()
    if request.stream:
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        return RelayResponse(_sse(events, job, include_usage), media_type="text/event-stream")
    return await _complete(service, job)


async def _complete(service: GatewayService, job: Job) -> Response:
    try:
        outcome = await service.complete(job)
        if outcome.failed is not None:
            raise JobError(ErrorCode(outcome.failed.error_code), outcome.failed.message)
    except JobError as exc:
        return openai_error(exc)
    finish, usage = outcome.finish_reason or "stop", outcome.usage or Usage()
    return JSONResponse(
        {
            "id": f"chatcmpl-{job.id}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": job.model,
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": outcome.text}, "finish_reason": finish}
            ],
            "usage": usage.with_total(),
        }
    )


async def _sse(events: AsyncIterator[Event], job: Job, include_usage: bool) -> AsyncIterator[bytes]:
    def chunk(delta: dict[str, Any] | None, finish: str | None = None, **extra: Any) -> bytes:
        """One SSE event; ``delta=None`` is OpenAI's usage chunk, whose ``choices`` is empty."""
        choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
        body = {
            "id": f"chatcmpl-{job.id}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": job.model,
            "choices": choices,
            **extra,
        }
        return b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n"

    # A delta's event as the bytes ``chunk({"content": piece})`` makes, without building and encoding the
    # dict each time (the per-event JSON work was a share of the gateway's CPU per relayed event).
    head = 'data: {"id": ' + json.dumps(f"chatcmpl-{job.id}", ensure_ascii=False)
    head += ', "object": "chat.completion.chunk", "created": '
    middle = ', "model": ' + json.dumps(job.model, ensure_ascii=False) + ', "choices": [{"index": 0, "delta": '
    middle += '{"content": '

    def delta(piece: str) -> bytes:
        content = quote(piece)
        return (head + str(int(time.time())) + middle + content + '}, "finish_reason": null}]}\n\n').encode()

    yield chunk({"role": "assistant", "content": ""})
    try:
        async for event in events:
            if event.type == "delta":
                yield delta(event.text)
            elif event.type == "done":
                yield chunk({}, event.finish_reason)
                if include_usage:
                    yield chunk(None, usage=event.usage.with_total())
            elif event.type == "cancelled":
                yield chunk({}, "cancelled")
            elif event.type == "failed":
                yield _sse_error(event.message, event.error_code)
    except JobError as exc:
        yield _sse_error(exc.message, exc.code)
    yield b"data: [DONE]\n\n"


def _sse_error(message: str, code: int) -> bytes:
    return b"data: " + json.dumps({"error": {"message": message, "code": code}}).encode() + b"\n\n"
