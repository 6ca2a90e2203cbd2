"""What every HTTP protocol of the gateway shares: model checks, admission, and streaming a job from Redis."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from redis.exceptions import RedisError

from broker_worker.protocol.client import AsyncClient
from broker_worker.protocol.errors import ErrorCode, JobError, redis_failure
from broker_worker.protocol.image_refs import store_images
from broker_worker.protocol.messages import Event, Failed, Job, Usage, WorkerHealth
from broker_worker.protocol.tap import Tap
from gateway.metrics import Metrics
from gateway.settings import GatewaySettings

log = logging.getLogger("gateway.service")

STATUS_REUSE_S = 0.25


@dataclass
class Status:
    workers: list[WorkerHealth]
    queues: dict[str, int]

    @property
    def model_names(self) -> list[str]:
        return sorted({w.model for w in self.workers if not w.draining} or {w.model for w in self.workers})

    @property
    def queue_length(self) -> int:
        return sum(self.queues.values())

    def to_worker_status(self) -> dict[str, object]:
        return {"model_names": self.model_names, "speed": max(1, len(self.workers)), "queue_length": self.queue_length}


@dataclass
class Outcome:
    """A job run to its end, for the endpoints that answer once."""

    text: str = ""
    finish_reason: str | None = None  # "stop", "length" or "cancelled"
    usage: Usage | None = None
    failed: Failed | None = None


class GatewayService:
    def __init__(self, settings: GatewaySettings, client: AsyncClient, metrics: Metrics) -> None:
        self.settings = settings
        self.client = client
        self.metrics = metrics
        self._status: Status | None = None
        self._status_at = 0.0
        self._last_served: dict[str, float] = {}  # model -> when a live worker last served it (monotonic)
        self._refresh: asyncio.Task[None] | None = None

    @property
    def draining(self) -> bool:
        """Set when the gateway itself shuts down: its streams end, but their jobs go on (clients resume by id)."""
        return not self.client.cancel_abandoned

    @draining.setter
    def draining(self, value: bool) -> None:
        self.client.cancel_abandoned = not value

    async def status(self) -> Status:
        workers = await self.client.workers()
        models = sorted({w.model for w in workers})
        queues = await self.client.queue_lengths(models)
        self._status, self._status_at = Status(workers, queues), time.monotonic()
        self._last_served.update(dict.fromkeys(self._status.model_names, self._status_at))
        return self._status

    async def recent_status(self, model: str) -> Status:
        """Admission reuses a status younger than STATUS_REUSE_S: three Redis round trips less per request.
        A model missing from it is looked up fresh before it is refused.

        An older status that lists the model is reused too, while a fresh one is read in the background, as long
        as it is younger than ``admit_grace_s``: within that time the model is admitted whatever a fresh status
        says (``_served_lately``), so no request needs to wait for it."""
        cached, age = self._status, time.monotonic() - self._status_at
        if cached is None or model not in cached.model_names or age >= max(STATUS_REUSE_S, self.settings.admit_grace_s):
            return await self.status()
        if age >= STATUS_REUSE_S:
            self._refresh_in_background()
        return cached

    def _refresh_in_background(self) -> None:
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.create_task(self._refresh_status())

    async def _refresh_status(self) -> None:
        try:
            await self.status()
        except (RedisError, OSError) as exc:  # the next admission past STATUS_REUSE_S tries again
            log.warning("could not refresh the workers' status: %s", exc)

    async def admit(self, model: str) -> None:
        """Refuse at once what no worker will take: an unknown model (40301). (A full queue is refused when the
        job is queued, atomically: ``start``.)"""
        try:
            status = await self.recent_status(model)
        except (RedisError, OSError) as exc:
            raise redis_failure(exc) from exc
        if model not in status.model_names and not self._served_lately(model):
            served = ", ".join(status.model_names) or "none"
            raise JobError(ErrorCode.INVALID_MODEL, f"no live worker serves model {model!r} (served: {served})")

    def _served_lately(self, model: str) -> bool:
        """A model whose workers lapsed only moments ago is still admitted: its jobs wait in the queue. A Redis
        stall longer than the health TTL lapses every worker's health key at once, and they come back with their
        next heartbeat; refusing in between would fail requests that a worker takes seconds later."""
        seen = self._last_served.get(model)
        return seen is not None and time.monotonic() - seen < self.settings.admit_grace_s

    async def start(self, job: Job, tap: Tap | None = None) -> AsyncIterator[Event]:
        """Queue the job now, so a refusal (42903: the queue is full, checked atomically in Redis) is a JobError
        before any response starts; return its events. A client that goes away cancels the job unless another
        reader still wants it (``AsyncClient.start``). The stream ends with a terminal event or JobError.
        ``tap``: see protocol/tap.py (deltas it takes are not counted here: only the first delta is timed)."""
        try:
            # each image once in Redis; the job carries references
            job = await store_images(self.client.redis, job, ack=self.client.replica_ack)
            events = await self.client.start(job, self.settings.max_queue, tap=tap, **self._timeouts())
        except (RedisError, OSError) as exc:
            raise redis_failure(exc) from exc
        except JobError as exc:
            self.metrics.jobs.labels(job.model, "refused").inc()
            raise exc
        return self._observed(job, events)

    async def _observed(self, job: Job, events: AsyncIterator[Event]) -> AsyncIterator[Event]:
        started, first = time.monotonic(), True
        try:
            async for event in events:
                if event.type == "delta" and first:
                    first = False
                    self.metrics.ttft.labels(job.model).observe(time.monotonic() - started)
                self._observe(job, event, started)
                yield event
        except (RedisError, OSError) as exc:
            raise redis_failure(exc, f" while streaming job {job.id}") from exc
        except JobError as exc:
            self.metrics.jobs.labels(job.model, f"error_{int(exc.code)}").inc()
            raise exc

    async def complete(self, job: Job) -> Outcome:
        """Run a job and collect it; a worker's ``failed`` event is returned, a stream error raised."""
        outcome = Outcome()
        async for event in await self.start(job):
            if event.type == "delta":
                outcome.text += event.text
            elif event.type == "done":
                outcome.finish_reason, outcome.usage = event.finish_reason, event.usage
            elif event.type == "failed":
                outcome.failed = event
            elif event.type == "cancelled":
                outcome.finish_reason = "cancelled"
        return outcome

    async def resume(self, job_id: str, after_seq: int, tap: Tap | None = None) -> AsyncIterator[Event]:
        async for event in self.client.stream(job_id, after_seq, tap=tap, **self._timeouts()):
            yield event

    def _timeouts(self) -> dict[str, float | None]:
        return {"start_timeout_s": self.settings.start_timeout_s + 5, "idle_timeout_s": self.settings.idle_timeout_s}

    def _observe(self, job: Job, event: Event, started: float) -> None:
        if event.type == "started" and event.resumed:
            self.metrics.resumes.labels(job.model).inc()
        elif event.type == "done":
            self.metrics.jobs.labels(job.model, "done").inc()
            elapsed = time.monotonic() - started
            if elapsed > 0:
                self.metrics.tokens_per_s.labels(job.model).observe(event.usage.completion_tokens / elapsed)
        elif event.type in ("failed", "cancelled"):
            self.metrics.jobs.labels(job.model, event.type).inc()
