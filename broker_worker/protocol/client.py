"""Python clients for the job protocol: ``AsyncClient`` (the gateway uses it) and a small blocking ``Client``.

Streaming is lossless: subscribe to the job's channel first, then read the replay record, then take live
events, dropping duplicates by seq and filling any gap (or a quiet spell, or a Redis reconnect) from the replay.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator

import redis
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from broker_worker.protocol import constants as c
from broker_worker.protocol import health, jobs
from broker_worker.protocol.cluster_pubsub import subscriber_for
from broker_worker.protocol.connections import is_cluster
from broker_worker.protocol.delivered import Delivered, check_timeouts
from broker_worker.protocol.errors import ErrorCode, JobError
from broker_worker.protocol.inbox import Inbox
from broker_worker.protocol.jobs import StreamReply
from broker_worker.protocol.messages import Event, Job, WorkerHealth, is_terminal, parse_event
from broker_worker.protocol.readers import HANGUP_GRACE_S, Readers
from broker_worker.protocol.replica_ack import ReplicaAck, write_and_wait_sync
from broker_worker.protocol.submission import queue_commands, submission
from broker_worker.protocol.subscription import RESYNC
from broker_worker.protocol.tap import Tap, next_deltas

log = logging.getLogger("broker_worker.protocol.client")


class AsyncClient:
    """``replica_ack`` (``--min-replicas-ack``): each submission waits for that many replicas; a job they did not
    acknowledge in time is queued all the same, logged and counted (``replica_ack.short``)."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        poll_s: float = 1.0,
        hangup_grace_s: float = HANGUP_GRACE_S,
        replica_ack: ReplicaAck | None = None,
    ) -> None:
        self.redis = redis
        self.replica_ack = replica_ack or ReplicaAck()
        self.store = jobs.JobStore(redis, replica_ack=self.replica_ack)
        self.subscriber = subscriber_for(redis)
        self.readers = Readers(redis, hangup_grace_s=hangup_grace_s)
        self.poll_s = poll_s
        #: Cancel a job whose ``generate`` stream is given up before its end (its caller went away), unless
        #: another reader still reads it. The gateway turns it off while it shuts down: clients resume by id.
        self.cancel_abandoned = True

    @classmethod
    def from_url(cls, url: str, min_replicas_ack: int = 0, replica_ack_timeout_s: float = 1.0) -> AsyncClient:
        from broker_worker.protocol.connections import async_redis

        return cls(async_redis(url), replica_ack=ReplicaAck(min_replicas_ack, replica_ack_timeout_s))

    async def submit(self, job: Job, max_queue: int = 0) -> str:
        """Queue the job (an id that already ran or runs is not run twice); returns the stream entry id.
        ``max_queue`` > 0: refuse with 42903 when the model has that many jobs queued or running (atomic)."""
        return await self.store.submit(job, max_queue)

    async def start(
        self, job: Job, max_queue: int = 0, *, tap: Tap | None = None, **timeouts: float | None
    ) -> AsyncIterator[Event]:
        """Subscribe and queue the job now (a refusal, e.g. 42903 for a full queue, raises here, before any
        event), then return its event stream, through the terminal event.

        SUBSCRIBE is sent first but its confirmation is awaited together with the submission (which carries the
        reader's join: one round trip): one round trip less before the job is queued. An event published before
        the subscription took effect is read from the replay record (gap or quiet-spell check), so nothing is lost
        either way. The replay is read up front only for an id Redis knew already (a retry: its events may all be
        recorded) or when the subscription was not confirmed; for a new id the live events come from seq 1 on,
        and any that went by before the subscription shows as a gap. Given up before its end, the
        job is cancelled when no other reader wants it (``cancel_abandoned``). The stream is a generator that
        has already started, so even one that is dropped without being read is closed (by asyncio's finaliser).
        A ``tap`` whose sink is set takes the deltas that arrive in order directly (protocol/tap.py); the stream
        then yields only the others."""
        events = self._run(job, max_queue, tap, timeouts)
        assert await anext(events) is None  # up to the submission
        return events  # type: ignore[return-value]  # every item after the first is an Event

    async def generate(self, job: Job, max_queue: int = 0, **timeouts: float | None) -> AsyncIterator[Event]:
        """``start`` and read the stream."""
        async for event in await self.start(job, max_queue, tap=None, **timeouts):
            yield event

    async def _run(
        self, job: Job, max_queue: int, tap: Tap | None, timeouts: dict[str, float | None]
    ) -> AsyncIterator[Event | None]:
        reader, queued, finished, gave_up = self.readers.new(job.id), False, False, False
        try:
            with self.subscriber.open(c.job_channel(job.id)) as subscription:
                join = self.readers.join_call(reader)
                submission = self.store.queue(job, max_queue, also=[join] if join else [])
                confirmed, submitted = await asyncio.gather(
                    subscription.confirmed(), submission, return_exceptions=True
                )
                if isinstance(submitted, BaseException):
                    raise submitted
                if isinstance(confirmed, BaseException):
                    raise confirmed
                queued = True
                yield None
                replay_first = not (confirmed and submitted.new)
                try:
                    async for event in self._events(job.id, subscription.queue, 0, tap, replay_first, **timeouts):
                        finished = is_terminal(event)
                        yield event
                except JobError:  # the caller is told the job failed (e.g. not started in time): no grace,
                    gave_up = True  # and the cancel is recorded before it is told, so no later worker runs it
                    await asyncio.shield(self.readers.leave_now(reader, cancel=self.cancel_abandoned))
                    raise
        finally:  # a refused submission cancels nothing: the id may be another request's running job
            cancel = self.cancel_abandoned and queued and not finished
            self.readers.leave_later(reader, cancel=cancel, grace=not gave_up)

    async def stream(
        self, job_id: str, after_seq: int = 0, *, tap: Tap | None = None, **timeouts: float | None
    ) -> AsyncIterator[Event]:
        """Events of a job with seq > after_seq (resume after a dropped connection), through the terminal one.
        A reader of the job meanwhile (another reader's hang-up does not cancel it); it never cancels it.
        ``tap`` as for ``start``."""
        reader = self.readers.new(job_id)
        try:
            with self.subscriber.open(c.job_channel(job_id)) as subscription:
                await asyncio.gather(subscription.confirmed(), self.readers.join(reader))
                async for event in self._events(job_id, subscription.queue, after_seq, tap, True, **timeouts):
                    yield event
        finally:
            self.readers.leave_later(reader, cancel=False)

    async def _events(
        self,
        job_id: str,
        queue: Inbox,
        after_seq: int,
        tap: Tap | None = None,
        replay_first: bool = True,
        start_timeout_s: float | None = None,
        idle_timeout_s: float | None = None,
    ) -> AsyncIterator[Event]:
        delivered, started = Delivered(job_id, after_seq), time.monotonic()
        if tap is not None:
            queue.take_directly(next_deltas(tap, delivered))
        pending = await jobs.replay(self.redis, job_id, after_seq) if replay_first else []
        while True:
            for event in pending:
                if event.seq <= delivered.last:
                    delivered.check_again(event)  # a duplicate is fine; the same seq with other content is not
                    continue
                if event.seq != delivered.last + 1:
                    break  # a gap: the replay below fills it
                delivered.add(event)
                yield event
                if is_terminal(event):
                    return
            received = delivered.last - after_seq
            check_timeouts(job_id, received, started, delivered.at, start_timeout_s, idle_timeout_s)
            pending = await self._next(job_id, queue, delivered)

    async def _next(self, job_id: str, queue: Inbox, delivered: Delivered) -> list[Event]:
        # Inbox.next: no timer per event (bench/capacity.py measures the gateway's CPU per relayed event)
        raw = await queue.next(self.poll_s)
        if raw is None or raw == RESYNC:
            return await self._recheck(job_id, delivered)
        event = parse_event(raw)
        if event.seq > delivered.last + 1:
            return await self._recheck(job_id, delivered)
        return [event]

    async def _recheck(self, job_id: str, delivered: Delivered) -> list[Event]:
        """After a quiet spell, a gap or a reconnect: read the replay (from the last event delivered, to check that
        Redis still has it); notice a job Redis no longer has."""
        try:
            events = await jobs.replay(self.redis, job_id, max(0, delivered.last - 1))
            if not events and not await jobs.exists(self.redis, job_id):
                raise JobError(
                    ErrorCode.INTERNAL_ERROR,
                    f"job {job_id} is gone from Redis (restarted without persistence?); submit it again",
                )
            delivered.check_replay(events)
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
        await self.readers.close()
        await self.subscriber.close()
        await self.redis.aclose()


class Client:
    """Blocking client for scripts: reads a job's replay stream with XREAD BLOCK (no pub/sub needed).
    ``min_replicas_ack`` as for ``AsyncClient``."""

    def __init__(self, url: str, min_replicas_ack: int = 0, replica_ack_timeout_s: float = 1.0) -> None:
        from broker_worker.protocol.connections import sync_redis

        self.redis: redis.Redis = sync_redis(url, socket_timeout=None)
        self.replica_ack = ReplicaAck(min_replicas_ack, replica_ack_timeout_s)

    def submit(self, job: Job) -> bool:
        """Queue the job; False (and nothing queued) when its id is already running or finished."""
        status = self.redis.hget(c.job_state_key(job.id), "status")
        if status in ("running", "done", "failed", "cancelled"):
            return False
        if self.replica_ack.wanted:
            _, acked = write_and_wait_sync(self.redis, submission(job), self.replica_ack)
            self.replica_ack.check(job.id, job.model, acked)
            return True
        with self.redis.pipeline(transaction=False) as pipe:
            queue_commands(pipe, job)
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
        keys = [c.worker_health_key(str(i)) for i in ids]
        if not keys:
            return []
        # On a cluster each health key lives in its own slot: one MGET per node instead of one for all
        values = self.redis.mget_nonatomic(keys) if is_cluster(self.redis) else self.redis.mget(keys)  # type: ignore[attr-defined]
        return [WorkerHealth.model_validate_json(v) for v in values if v]

    def queue_length(self, model: str) -> int:
        return int(self.redis.xlen(c.job_stream(model)))

    def close(self) -> None:
        self.redis.close()
