"""Operations: health, metrics, and job control by id (resume a stream after a drop, cancel)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query
from fastapi.responses import JSONResponse, Response, StreamingResponse
from redis.exceptions import RedisError

from broker_worker.protocol import constants as c
from broker_worker.protocol import health as lanes_health
from broker_worker.protocol import jobs
from broker_worker.protocol.errors import ErrorCode, JobError
from broker_worker.protocol.messages import JOB_ID_PATTERN
from broker_worker.protocol.tap import Tap
from gateway.deps import get_service
from gateway.errors import fastchat_error
from gateway.fastchat_stream import FastChatFrames
from gateway.service import GatewayService
from gateway.streaming import RelayResponse

router = APIRouter(tags=["operations"])
Service = Annotated[GatewayService, Depends(get_service)]
JobId = Annotated[str, Path(pattern=JOB_ID_PATTERN)]


@router.get("/health")
async def health(service: Service) -> Response:
    """``queues``: interactive jobs queued or running per model (what a new request waits behind);
    ``batch_queues``: the batch lane's, which a new interactive request goes ahead of."""
    try:
        status = await service.status()
        batch = await lanes_health.queue_lengths(service.client.redis, sorted(status.queues), c.BATCH)
    except (RedisError, OSError) as exc:
        return JSONResponse({"status": "unavailable", "redis": False, "error": str(exc)}, status_code=503)
    per_model: dict[str, int] = {}
    for w in status.workers:
        per_model[w.model] = per_model.get(w.model, 0) + 1
    body = {"status": "ok", "redis": True, "workers": per_model, "queues": status.queues, "batch_queues": batch}
    return JSONResponse(body)


@router.get("/metrics")
async def metrics(service: Service) -> Response:
    m = service.metrics
    m.pubsub_channels.set(service.client.subscriber.channels)
    m.job_readers.set(len(service.client.readers))
    try:
        status = await service.status()
        m.set_workers(status.workers, status.queues)
        m.set_batch(await lanes_health.queue_lengths(service.client.redis, sorted(status.queues), c.BATCH))
        m.dead_letters.set(await service.client.redis.xlen(c.DEAD_LETTER_STREAM))
        m.redis_up.set(1)
    except (RedisError, OSError):
        m.redis_up.set(0)
    return Response(m.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/jobs/{job_id}/stream", response_class=StreamingResponse)
async def resume_stream(job_id: JobId, service: Service, after: Annotated[int, Query(ge=0)] = 0) -> Response:
    """Continue a job's FastChat chunk stream after sequence number ``after`` (e.g. after a gateway restart).

    Chunk text is cumulative over the events after ``after``; join it to what you already had.
    """
    if not await jobs.exists(service.client.redis, job_id):
        return fastchat_error(
            JobError(ErrorCode.VALIDATION_TYPE_ERROR, f"unknown job id {job_id!r} (or it expired)"), status_code=404
        )
    tap = Tap()
    events = service.resume(job_id, after, tap)
    return RelayResponse(events, FastChatFrames(job_id), tap, media_type="application/octet-stream")


@router.post("/jobs/{job_id}/cancel")
async def cancel_job(job_id: JobId, service: Service) -> dict[str, object]:
    await service.client.cancel(job_id)
    return {"job_id": job_id, "cancelled": True}
