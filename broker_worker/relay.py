"""One running job's generation: the engine in a thread, its deltas coalesced and published under the job's
fencing token. Publishing is also where cancel and take-over are noticed, so both stop generation within one
token."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Protocol

from redis.exceptions import RedisError

from broker_worker.handoff import Handoff
from broker_worker.job_queue import Entry, JobQueue
from broker_worker.model.engine import Engine, Finish
from broker_worker.protocol.jobs import CANCELLED, FENCED, JobStore
from broker_worker.protocol.messages import Event, Job, Started
from broker_worker.protocol.states import StopReason

log = logging.getLogger("broker_worker.worker")


class Handback(Exception):
    """The worker is shutting down and gave the job back; it was not finished here."""


@dataclass
class Running:
    job: Job
    #: The stream entry being run (its queue is the lane it came from).
    entry: Entry
    token: str
    #: Seq of the last event recorded for the job (this run's publishes continue from it).
    seq: int = 0
    cancel: threading.Event = field(default_factory=threading.Event)
    #: Why generation stopped early.
    stop_reason: StopReason | None = None
    #: When the engine last made text for this run (monotonic); None before its first (stall.py watches it).
    text_at: float | None = None

    @property
    def entry_id(self) -> str:
        return self.entry.entry_id

    @property
    def queue(self) -> JobQueue:
        return self.entry.queue

    def stop(self, reason: StopReason) -> None:
        self.stop_reason = self.stop_reason or reason
        self.cancel.set()

    async def publish(self, store: JobStore, event: Event) -> int:
        """Record ``event`` as this run's next event: its seq, or FENCED / CANCELLED. A call Redis already applied
        (re-sent after a timeout) is not applied twice: the script checks the seq this run expects."""
        result = await store.publish(self.job.id, self.token, event, self.seq + 1)
        if result > 0:
            self.seq = result
        return result

    async def publish_text(self, store: JobStore, text: str) -> int:
        """``publish(Delta(text=text))``, the model not built (once per streamed event)."""
        return self.count(await store.publish_text(self.job.id, self.token, text, self.seq + 1))

    def send_text(self, store: JobStore, text: str, urgent: bool = False) -> asyncio.Future[int]:
        """``publish_text`` as a future; its result goes through ``count`` (the caller's done callback)."""
        return store.send_text(self.job.id, self.token, text, self.seq + 1, urgent)

    def count(self, result: int) -> int:
        """A publish's result: a seq is this run's latest."""
        if result > 0:
            self.seq = result
        return result


class Progress(Protocol):
    last_progress: float


class Throughput:
    """Tokens per second over the last minute, for the health key. Counted per second of the clock: ``add`` runs
    once per published event (thousands a second), so it keeps at most 61 counts, not one stamp per event."""

    def __init__(self) -> None:
        self._seconds: deque[list[float]] = deque()  # [second, tokens, its first stamp], oldest first
        self._last = 0.0

    def add(self, tokens: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        second = float(int(now))
        if self._seconds and self._seconds[-1][0] == second:
            self._seconds[-1][1] += tokens
        else:
            self._seconds.append([second, tokens, now])
            while self._seconds[0][0] < second - 60:
                self._seconds.popleft()
        self._last = now

    def rate(self) -> float:
        span = self._last - self._seconds[0][2] if self._seconds else 0.0
        return sum(count for _, count, _ in self._seconds) / span if span > 0 else 0.0


@dataclass
class Relay:
    """Runs ``engine.generate`` on ``executor`` and publishes what it produces.

    One publish is in flight at a time; text produced meanwhile, or within ``interval_s`` of the last event,
    goes out in the next event. Once ``started`` went out, text that finds no publish in flight and the interval
    over goes out from ``_add`` itself, its result taken in a done callback (``_sent``): no task step per token.
    The pump task does the rest: the interval's wait, a failed delta's retries, the end.
    """

    store: JobStore
    engine: Engine
    executor: Executor
    run: Running
    interval_s: float
    throughput: Throughput
    handoff: Handoff
    #: Where the engine's latest text is marked for the whole worker (stall.StallWatch).
    progress: Progress
    _buffer: list[str] = field(default_factory=list)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _closed: bool = False
    _ready: bool = False  # ``started`` went out: _add may send
    _inflight: bool = False  # a publish is in flight (from _add or the pump)
    _last: float = 0.0  # when the last delta went out (monotonic)
    #: A delta sent from _add whose call failed: its text, token count and error; the pump sends it again, as is.
    _failed: tuple[str, int, BaseException] | None = None

    async def generate(self, prefix: str, started: Started | None) -> Finish:
        """``started`` (unless the start script published it: None) goes out first, while the engine already
        prepares the prompt (one round trip less)."""
        loop = asyncio.get_running_loop()
        feed = self.handoff.feeder(self._add)
        pump = asyncio.create_task(self._pump(started))
        try:
            finish = await loop.run_in_executor(
                self.executor, self.engine.generate, self.run.job, prefix, self.run.cancel, feed
            )
        finally:
            self.handoff.collect()  # the engine's last text, queued before it returned
            self._closed = True
            self._wake.set()
            await pump
        if self.run.stop_reason == StopReason.HANDBACK:
            raise Handback
        return finish

    def _add(self, text: str) -> None:
        self.run.text_at = self.progress.last_progress = time.monotonic()
        self._buffer.append(text)
        if self._may_send():
            self._send_buffer()
        else:
            self._wake.set()

    def _may_send(self) -> bool:
        """Whether the buffer may go out now, without the pump (a failed delta goes first, by the pump)."""
        idle = self._ready and not self._inflight and self._failed is None and not self._closed
        return idle and time.monotonic() >= self._last + self.interval_s

    def _send_buffer(self) -> None:
        text, count = "".join(self._buffer), len(self._buffer)
        self._buffer.clear()
        if self._stopped():
            return
        first = self._last == 0.0  # the run's first delta: its client's time to first token waits on it
        self._inflight, self._last = True, time.monotonic()
        sending = self.run.send_text(self.store, text, urgent=first)
        sending.add_done_callback(lambda future: self._sent(text, count, future))

    def _sent(self, text: str, count: int, future: asyncio.Future[int]) -> None:
        self._inflight = False
        error = asyncio.CancelledError() if future.cancelled() else future.exception()
        if error is not None:
            self._failed = (text, count, error)
        else:
            self._settle(self.run.count(future.result()), count)
        if self._buffer and self._may_send():
            self._send_buffer()  # what came meanwhile
        elif self._failed is not None or self._buffer or self._closed:
            self._wake.set()  # the pump: the retry, what came meanwhile (after the interval), the end

    async def _pump(self, started: Started | None) -> None:
        if started is not None and await self._publish_with_retry(started) == FENCED:
            self.run.stop(StopReason.FENCED)
        self._ready = True
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._inflight:
                continue  # its answer wakes the pump again
            if self._failed is not None:
                await self._send_again(*self._failed)
            if self._buffer and not self._closed and (wait := self._last + self.interval_s - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            if self._buffer and not self._inflight:
                self._last = time.monotonic()
                await self._publish_buffer()
            if self._closed and not self._buffer and not self._inflight:
                return

    async def _send_again(self, text: str, count: int, error: BaseException) -> None:
        """A delta whose call failed goes again, the same text under the same seq (Redis may have applied it)."""
        if not isinstance(error, RedisError | OSError):
            raise error
        self._inflight, self._failed = True, None  # in flight from now: nothing may overtake it during the backoff
        try:
            log.warning("job %s: publish failed (%s), retry 1", self.run.job.id, error)
            await asyncio.sleep(0.1)
            self._settle(await self._publish_with_retry(text, first_attempt=1), count)
        finally:
            self._inflight = False

    async def _publish_buffer(self) -> None:
        text, count = "".join(self._buffer), len(self._buffer)
        self._buffer.clear()
        if self._stopped():
            return
        self._inflight = True
        try:
            self._settle(await self._publish_with_retry(text), count)
        finally:
            self._inflight = False

    def _stopped(self) -> bool:
        return self.run.stop_reason in (StopReason.CANCELLED, StopReason.FENCED)

    def _settle(self, seq: int, count: int) -> None:
        self.throughput.add(count)
        if seq == FENCED:
            self.run.stop(StopReason.FENCED)
        elif seq == CANCELLED:
            self.run.stop(StopReason.CANCELLED)

    async def _publish_with_retry(self, event: Event | str, first_attempt: int = 0) -> int:
        """``event``, or a delta's text."""
        for attempt in range(first_attempt, 20):
            try:
                if isinstance(event, str):
                    return await self.run.publish_text(self.store, event)
                return await self.run.publish(self.store, event)
            except (RedisError, OSError) as exc:
                log.warning("job %s: publish failed (%s), retry %d", self.run.job.id, exc, attempt + 1)
                await asyncio.sleep(min(0.1 * 2**attempt, 2.0))
        self.run.stop(StopReason.FENCED)  # Redis is gone for good: stop; a live worker re-runs the job from the replay
        return FENCED
