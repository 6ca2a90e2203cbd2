"""OpenAI-compatible chat completions (``image_url`` with data: URLs), streaming (SSE) and not."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from broker_worker.protocol.errors import ErrorCode, JobError
from broker_worker.protocol.messages import Job, Usage
from broker_worker.protocol.tap import Tap
from gateway.deps import get_service
from gateway.errors import openai_error
from gateway.openai_request import OpenAIChatRequest, openai_job
from gateway.openai_stream import OpenAIFrames
from gateway.service import GatewayService
from gateway.streaming import RelayResponse
from gateway.validation import validation_error

router = APIRouter(prefix="/v1", tags=["openai"])
Service = Annotated[GatewayService, Depends(get_service)]


@router.get("/models")
async def models(service: Service) -> dict[str, object]:
    names = (await service.status()).model_names
    return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "internvl-redis"} for n in names]}


@router.post("/chat/completions")
async def chat_completions(request: OpenAIChatRequest, service: Service) -> Response:
    tap = Tap()
    try:
        job = openai_job(request, service.settings)
        await service.admit(job.model)
        if request.stream:  # queued before the response starts: a full queue is an HTTP 429
            events = await service.start(job, tap)
    except (JobError, ValidationError) as exc:
        service.metrics.requests.labels("chat_completions", "refused").inc()
        return openai_error(exc if isinstance(exc, JobError) else validation_error(exc))
    service.metrics.requests.labels("chat_completions", "accepted").inc()
    if request.stream:
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        return RelayResponse(events, OpenAIFrames(job, include_usage), tap, media_type="text/event-stream")
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
