"""The FastChat worker protocol: what InternVL's Streamlit app, api.py and the controller call, and what
FastChat's openai_api_server calls on a model worker."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends
from fastapi.responses import JSONResponse, Response, StreamingResponse

from broker_worker.protocol import constants as c
from broker_worker.protocol import health
from broker_worker.protocol.errors import ErrorCode, JobError
from broker_worker.protocol.messages import Job, SamplingParams
from broker_worker.protocol.tap import Tap
from gateway.deps import get_service
from gateway.errors import fastchat_error
from gateway.fastchat_conv import conv_template
from gateway.fastchat_stream import FastChatFrames
from gateway.service import GatewayService
from gateway.streaming import RelayResponse
from gateway.validation import CountRequest, GenerateRequest, build_job, count_prompt, worker_job

router = APIRouter(tags=["worker protocol"])
Service = Annotated[GatewayService, Depends(get_service)]
EXAMPLE = {
    "model": "tiny-internvl",
    "prompt": [{"role": "user", "content": "Hello"}],
    "temperature": 0.7,
    "top_p": 0.95,
    "max_new_tokens": 64,
    "max_input_tiles": 12,
    "repetition_penalty": 1.1,
}
FASTCHAT_EXAMPLE = {
    "model": "tiny-internvl",
    "prompt": "<|im_start|>system\n<|im_end|>\n<|im_start|>user: Hello<|im_end|>\n<|im_start|>assistant:",
    "temperature": 0.7,
    "top_p": 1.0,
    "top_k": -1,
    "max_new_tokens": 64,
    "echo": False,
    "stop": [],
    "stop_token_ids": None,
}
GenerateBody = Annotated[GenerateRequest, Body(examples=[EXAMPLE, FASTCHAT_EXAMPLE])]
JsonBody = Annotated[dict[str, Any], Body()]


async def _prepare(service: GatewayService, request: GenerateRequest) -> Job:
    job = worker_job(request, service.settings)
    await service.admit(job.model)
    return job


@router.post(
    "/worker_generate_stream",
    response_class=StreamingResponse,
    responses={
        200: {"description": "JSON chunks, each followed by a NUL byte", "content": {"application/octet-stream": {}}}
    },
)
async def worker_generate_stream(body: GenerateBody, service: Service) -> Response:
    tap = Tap()
    try:
        job = await _prepare(service, body)
        events = await service.start(job, tap)  # queued before the response starts: a full queue is an HTTP 429
    except JobError as exc:
        service.metrics.requests.labels("worker_generate_stream", "refused").inc()
        return fastchat_error(exc)
    service.metrics.requests.labels("worker_generate_stream", "accepted").inc()
    return RelayResponse(
        events,
        FastChatFrames(job.id, body.echo_text),
        tap,
        media_type="application/octet-stream",
        headers={"X-Job-Id": job.id},
    )


@router.post("/worker_generate")
async def worker_generate(body: GenerateBody, service: Service) -> Response:
    """The same job, answered as one JSON object when it ends."""
    try:
        job = await _prepare(service, body)
        outcome = await service.complete(job)
    except JobError as exc:
        return fastchat_error(exc)
    if outcome.failed is not None:
        return JSONResponse({"text": outcome.failed.message, "error_code": outcome.failed.error_code, "job_id": job.id})
    text = body.echo_text + outcome.text
    last: dict[str, Any] = {"text": text, "error_code": 0, "finish_reason": outcome.finish_reason}
    if outcome.usage is not None:
        last["usage"] = outcome.usage.with_total()
    return JSONResponse(last | {"job_id": job.id})


@router.post("/worker_get_status")
async def worker_get_status(service: Service) -> dict[str, object]:
    """``queue_length`` counts interactive jobs (what a new request waits behind; the controller's heartbeats
    carry the same); ``batch_queue_length`` the batch lane's, which interactive requests go ahead of."""
    status = await service.status()
    batch = await health.queue_lengths(service.client.redis, sorted(status.queues), c.BATCH)
    return status.to_worker_status() | {"batch_queue_length": sum(batch.values())}


@router.post("/count_token")
async def count_token(body: Annotated[CountRequest, Body()], service: Service) -> Response:
    """Prompt tokens as the model sees them (template, images expanded), counted by a worker of the model."""
    try:
        prompt = count_prompt(body.prompt)
        job = build_job(body.model, prompt, SamplingParams(max_new_tokens=1), service.settings).model_copy(
            update={"count_only": True}
        )
        await service.admit(job.model)
        outcome = await service.complete(job)
        if outcome.failed is not None:
            raise JobError(ErrorCode(outcome.failed.error_code), outcome.failed.message)
    except JobError as exc:
        return fastchat_error(exc)
    return JSONResponse({"count": outcome.usage.prompt_tokens if outcome.usage else 0, "error_code": 0})


@router.post("/worker_get_conv_template")
async def worker_get_conv_template(body: JsonBody | None = None) -> dict[str, object]:
    """FastChat's conversation dict; its openai_api_server renders chats with it into a string prompt, which
    ``/worker_generate_stream`` parses back into the same conversation (gateway/fastchat_conv.py). One
    template for every model: each model's own chat template is applied by its workers, after the parse."""
    return {"conv": conv_template()}


@router.post("/model_details")
async def model_details(service: Service, body: JsonBody | None = None) -> dict[str, object]:
    model = (body or {}).get("model")
    workers = [w for w in (await service.status()).workers if model is None or w.model == model]
    return {"context_length": min((w.context_len for w in workers if w.context_len), default=0)}
