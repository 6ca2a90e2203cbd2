"""Python clients for the job protocol: ``AsyncClient`` (the gateway uses it) and a small blocking ``Client``.

Streaming is lossless: subscribe to the job's channel first, then read the replay record, then take live
events, dropping duplicates by seq and filling any gap (or a quiet spell, or a Redis reconnect) from the replay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from broker_worker.protocol import constants as c
from broker_worker.protocol import health, jobs
from broker_worker.protocol.errors import ErrorCode, JobError
from broker_worker.protocol.jobs import StreamReply
from broker_worker.protocol.messages import Event, Job, WorkerHealth, is_terminal, parse_event

log = logging.getLogger("broker_worker.protocol.client")
_RESYNC = "resync"


class Subscriber:
    """One pub/sub connection shared by every stream; each channel feeds its own queues."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._queues: dict[str, set[asyncio.Queue[str]]] = {}
        self._confirmed: dict[str, asyncio.Future[None]] = {}
        self._pubsub: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._has_channels = asyncio.Event()

    async def subscribe(self, channel: str) -> asyncio.Queue[str]:
        queue: asyncio.Queue[str] = asyncio.Queue()
        first = channel not in self._queues
        self._queues.setdefault(channel, set()).add(queue)
        if first:
            await self._send_subscribe(channel)
        return queue

    async def _send_subscribe(self, channel: str) -> None:
        self._ensure_reader()
        waiter = self._confirmed[channel] = asyncio.get_running_loop().create_future()
        with contextlib.suppress(RedisError, OSError):
            await self._pubsub.subscribe(channel)
            self._has_channels.set()
            # A missed confirmation is harmless (the replay covers it); waiting bounds the usual race.
            await asyncio.wait_for(asyncio.shield(waiter), timeout=2.0)

    async def unsubscribe(self, channel: str, queue: asyncio.Queue[str]) -> None:
        queues = self._queues.get(channel, set())
        queues.discard(queue)
        if not queues:
            self._queues.pop(channel, None)
            self._confirmed.pop(channel, None)
            with contextlib.suppress(RedisError, OSError):
                await self._pubsub.unsubscribe(channel)

    def _ensure_reader(self) -> None:
        if self._pubsub is None:
            self._pubsub = self._redis.pubsub()
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        backoff = 0.1
        while True:
            try:
                if not self._pubsub.subscribed:
                    self._has_channels.clear()
                    await self._has_channels.wait()  # woken by the next subscribe, not by polling
                    continue
                message = await self._pubsub.get_message(timeout=1.0)
                backoff = 0.1
            except (RedisError, OSError) as exc:
                log.warning("pub/sub connection lost (%s); resubscribing", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                await self._reconnect()
                continue
            if message is not None:
                self._dispatch(message)

    async def _reconnect(self) -> None:
        with contextlib.suppress(Exception):
            await self._pubsub.aclose()
        self._pubsub = self._redis.pubsub()
        with contextlib.suppress(RedisError, OSError):
            if self._queues:
                await self._pubsub.subscribe(*self._queues)
        for queues in self._queues.values():
            for queue in queues:
                queue.put_nowait(_RESYNC)

    def _dispatch(self, message: dict[str, Any]) -> None:
        channel = message.get("channel")
        if message.get("type") == "subscribe":
            waiter = self._confirmed.get(channel or "")
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        elif message.get("type") == "message":
            for queue in self._queues.get(channel or "", ()):
                queue.put_nowait(message["data"])

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(BaseException):
                await self._reader
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()


class AsyncClient:
    def __init__(self, redis: aioredis.Redis, *, poll_s: float = 1.0) -> None:
        self.redis = redis
        self.store = jobs.JobStore(redis)
        self.subscriber = Subscriber(redis)
        self.poll_s = poll_s

    @classmethod
    def from_url(cls, url: str) -> AsyncClient:
        from broker_worker.protocol.connections import async_redis

        return cls(async_redis(url))

    async def submit(self, job: Job, max_queue: int = 0) -> str:
        """Queue the job (an id that already ran or runs is not run twice); returns the stream entry id.
        ``max_queue`` > 0: refuse with 42903 when the model has that many jobs queued or running (atomic)."""
        return await self.store.submit(job, max_queue)

    async def generate(self, job: Job, max_queue: int = 0, **timeouts: float | None) -> AsyncIterator[Event]:
        """Subscribe, submit, then stream the job's events until the terminal one.

        SUBSCRIBE is sent first but its confirmation is awaited together with the submission: one round trip
        less before the job is queued. An event published before the subscription took effect is read from the
        replay record (gap or quiet-spell check), so nothing is lost either way.
        """
        channel = c.job_channel(job.id)
        queue, submitted = await asyncio.gather(
            self.subscriber.subscribe(channel), self.submit(job, max_queue), return_exceptions=True
        )
        assert isinstance(queue, asyncio.Queue)  # subscribe() does not raise: Redis errors end up in a resync
        try:
            if isinstance(submitted, BaseException):
                raise submitted
            async for event in self._events(job.id, queue, 0, **timeouts):
                yield event
        finally:
            await self.subscriber.unsubscribe(channel, queue)

    async def stream(self, job_id: str, after_seq: int = 0, **timeouts: float | None) -> AsyncIterator[Event]:
        """Events of a job with seq > after_seq (resume after a dropped connection), through the terminal one."""
        channel = c.job_channel(job_id)
        queue = await self.subscriber.subscribe(channel)
        try:
            async for event in self._events(job_id, queue, after_seq, **timeouts):
                yield event
        finally:
            await self.subscriber.unsubscribe(channel, queue)

    async def _events(
        self,
        job_id: str,
        queue: asyncio.Queue[str],
        after_seq: int,
        start_timeout_s: float | None = None,
        idle_timeout_s: float | None = None,
    ) -> AsyncIterator[Event]:
        last, started = after_seq, time.monotonic()
        last_event_at = started
        pending = await jobs.replay(self.redis, job_id, last)
        while True:
            for event in pending:
                if event.seq != last + 1:
                    break  # a gap: the replay below fills it
                last, last_event_at = event.seq, time.monotonic()
                yield event
                if is_terminal(event):
                    return
            _check_timeouts(job_id, last - after_seq, started, last_event_at, start_timeout_s, idle_timeout_s)
            pending = await self._next(job_id, queue, last)

    async def _next(self, job_id: str, queue: asyncio.Queue[str], last: int) -> list[Event]:
        try:
            raw = await asyncio.wait_for(queue.get(), self.poll_s)
        except TimeoutError:
            return await self._recheck(job_id, last)
        if raw == _RESYNC:
            return await self._recheck(job_id, last)
        event = parse_event(raw)
        if event.seq > last + 1:
            return await self._recheck(job_id, last)
        return [event]

    async def _recheck(self, job_id: str, last: int) -> list[Event]:
        """After a quiet spell, a gap or a reconnect: read the replay; notice a job Redis no longer has."""
        try:
            events = await jobs.replay(self.redis, job_id, last)
            if not events and not await jobs.exists(self.redis, job_id):
                raise JobError(
                    ErrorCode.INTERNAL_ERROR,
                    f"job {job_id} is gone from Redis (restarted without persistence?); submit it again",
                )
            return events
        except (RedisError, OSError) as exc:
            log.warning("job %s: replay read failed (%s); will retry", job_id, exc)
            await asyncio.sleep(0.2)
            return []

    async def cancel(self, job_id: str) -> None:
        await jobs.cancel(self.redis, job_id)

    async def workers(self) -> list[WorkerHealth]:
        return await health.live_workers(self.redis)

    async def queue_length(self, model: str) -> int:
        return await health.queue_length(self.redis, model)

    async def queue_lengths(self, models: list[str]) -> dict[str, int]:
        return await health.queue_lengths(self.redis, models)

    async def close(self) -> None:
        await self.subscriber.close()
        await self.redis.aclose()


def _check_timeouts(
    job_id: str,
    received: int,
    started: float,
    last_event_at: float,
    start_timeout_s: float | None,
    idle_timeout_s: float | None,
) -> None:
    now = time.monotonic()
    if received == 0 and start_timeout_s is not None and now - started > start_timeout_s:
        raise JobError(
            ErrorCode.CONTROLLER_WORKER_TIMEOUT,
            f"no worker started job {job_id} within {start_timeout_s:.0f}s (are workers running for this model?)",
        )
    if received > 0 and idle_timeout_s is not None and now - last_event_at > idle_timeout_s:
        raise JobError(
            ErrorCode.CONTROLLER_WORKER_TIMEOUT,
            f"job {job_id} produced nothing for {idle_timeout_s:.0f}s; its worker may be gone",
        )


class Client:
    """Blocking client for scripts: reads a job's replay stream with XREAD BLOCK (no pub/sub needed)."""

    def __init__(self, url: str) -> None:
        from broker_worker.protocol.connections import sync_redis

        self.redis: redis.Redis = sync_redis(url, socket_timeout=None)

    def submit(self, job: Job) -> bool:
        """Queue the job; False (and nothing queued) when its id is already running or finished."""
        status = self.redis.hget(c.job_state_key(job.id), "status")
        if status in ("running", "done", "failed", "cancelled"):
            return False
        with self.redis.pipeline(transaction=False) as pipe:
            jobs.queue_commands(pipe, job)
            pipe.execute()
        return True

    def stream(self, job_id: str, after_seq: int = 0, timeout_s: float = 300) -> Iterator[Event]:
        key, entry_id, deadline = c.job_events_key(job_id), "0-0", time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            response: StreamReply = self.redis.xread({key: entry_id}, block=1000, count=500)  # type: ignore[assignment]
            for _, entries in response or []:
                for entry_id, fields in entries:  # noqa: B007 - the next XREAD starts after it
                    event = parse_event(fields[c.EVENT_FIELD])
                    if event.seq > after_seq:
                        yield event
                    if is_terminal(event):
                        return
        raise JobError(ErrorCode.CONTROLLER_WORKER_TIMEOUT, f"job {job_id} did not finish within {timeout_s:.0f}s")

    def generate(self, job: Job, timeout_s: float = 300) -> Iterator[Event]:
        self.submit(job)
        yield from self.stream(job.id, timeout_s=timeout_s)

    def cancel(self, job_id: str) -> None:
        self.redis.set(c.job_cancel_key(job_id), "1", ex=c.JOB_TTL_S)

    def workers(self) -> list[WorkerHealth]:
        """Live workers (fresh health keys), for every model."""
        ids = self.redis.zrangebyscore(c.WORKERS_INDEX, int(time.time() * 1000), "+inf")
        values = self.redis.mget([c.worker_health_key(str(i)) for i in ids]) if ids else []
        return [WorkerHealth.model_validate_json(v) for v in values if v]

    def queue_length(self, model: str) -> int:
        return int(self.redis.xlen(c.job_stream(model)))

    def close(self) -> None:
        self.redis.close()
