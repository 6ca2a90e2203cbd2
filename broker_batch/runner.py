"""Runs parsed lines as jobs: at most ``max_in_flight`` at once, results written as each job ends.

Submitting: a job whose id Redis already knows (a killed or interrupted run queued it) is re-attached, not
queued again; the others are queued in one round trip per refill (``JobStore.submit_many``). Reading: one
``XREAD BLOCK`` over the replay streams of every job in flight, each from the last event read, so a job's
events are read exactly once whether it ran before this run started or not. A job Redis lost (restarted without
persistence, or its queued marker expired while it waited) is queued again: the id makes a second entry of a
job that did run a duplicate that workers ack without running.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from broker_batch.lines import BadLine, Parsed, Request
from broker_batch.progress import Progress
from broker_batch.results import ResultFile, answer_row, bad_line_row, failed_row
from broker_worker.protocol import constants as c
from broker_worker.protocol.jobs import JobStore, StreamReply
from broker_worker.protocol.messages import Event, parse_event
from broker_worker.protocol.states import JobStatus

READ_BLOCK_MS = 1000
READ_COUNT = 1000
#: How often jobs that have shown no event yet are checked for still being known to Redis.
LOST_CHECK_S = 30.0
#: At most one complaint about Redis errors this often.
ERROR_EVERY_S = 10.0


@dataclass
class Tracked:
    request: Request
    last_id: str = "0-0"
    text: list[str] = field(default_factory=list)


class BatchRunner:
    def __init__(self, redis: aioredis.Redis, results: ResultFile, progress: Progress, max_in_flight: int) -> None:
        self.redis = redis
        self.store = JobStore(redis)
        self.results = results
        self.progress = progress
        self.max_in_flight = max_in_flight
        self.in_flight: dict[str, Tracked] = {}
        self.submitted = 0
        self.attached = 0
        self._next_lost_check = time.monotonic() + LOST_CHECK_S

    async def run(self, items: Iterator[Parsed]) -> None:
        exhausted, complained = False, 0.0
        while not exhausted or self.in_flight:
            try:
                if not exhausted:
                    exhausted = await self._refill(items)
                if self.in_flight:
                    await self._read()
                    await self._requeue_lost()
            except (RedisError, OSError) as exc:
                # Nothing is lost: jobs being started are already tracked, and the check below queues whatever
                # the failed round trip did not.
                if time.monotonic() - complained > ERROR_EVERY_S:
                    complained = time.monotonic()
                    print(f"broker-batch: Redis error ({exc}); retrying", file=sys.stderr, flush=True)
                await asyncio.sleep(1.0)
                self._next_lost_check = 0.0

    async def _refill(self, items: Iterator[Parsed]) -> bool:
        """Bring the jobs in flight up to the bound (bad lines get their error line on the way); True once the
        input is used up."""
        wanted: list[Request] = []
        exhausted = True
        while len(self.in_flight) + len(wanted) < self.max_in_flight:
            item = next(items, None)
            if item is None:
                break
            if isinstance(item, BadLine):
                self._write(bad_line_row(item))
            else:
                wanted.append(item)
        else:
            exhausted = False
        await self._start(wanted)
        return exhausted

    async def _start(self, requests: list[Request]) -> None:
        if not requests:
            return
        for request in requests:
            self.in_flight[request.job.id] = Tracked(request)
        known = await self._known([r.job.id for r in requests])
        new = [r.job for r, k in zip(requests, known, strict=True) if not k]
        await self.store.submit_many(new)
        self.submitted += len(new)
        self.attached += len(requests) - len(new)

    async def _known(self, ids: list[str]) -> list[bool]:
        """Whether Redis has each job: queued, running, or finished with its outcome still readable."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hget(c.job_state_key(job_id), "status")
                pipe.exists(c.job_events_key(job_id))
            replies = await pipe.execute()
        known = []
        for status, events in zip(replies[::2], replies[1::2], strict=True):
            finished = status in {s.value for s in (JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED)}
            # a finished job whose replay expired runs again (the start script treats it as new): queue it
            known.append(bool(events) or (status is not None and not finished))
        return known

    async def _read(self) -> None:
        streams = {c.job_events_key(job_id): t.last_id for job_id, t in self.in_flight.items()}
        reply: StreamReply = await self.redis.xread(streams, count=READ_COUNT, block=READ_BLOCK_MS)  # type: ignore[arg-type,assignment]
        for key, entries in reply or []:
            job_id = key.partition("{")[2].rpartition("}")[0]
            tracked = self.in_flight.get(job_id)
            if tracked is None:
                continue
            for entry_id, fields in entries:
                tracked.last_id = entry_id
                if c.EVENT_FIELD in fields and self._on_event(tracked, parse_event(fields[c.EVENT_FIELD])):
                    break

    def _on_event(self, tracked: Tracked, event: Event) -> bool:
        """Take one event; True when it ended the job (its output line is written)."""
        if event.type == "delta":
            tracked.text.append(event.text)
            return False
        if event.type == "done":
            row = answer_row(tracked.request, "".join(tracked.text), event.finish_reason, event.usage)
        elif event.type == "failed":
            row = failed_row(tracked.request, event)
        elif event.type == "cancelled":
            row = failed_row(tracked.request, None)
        else:
            return False
        del self.in_flight[tracked.request.job.id]
        self._write(row)
        return True

    def _write(self, row: dict[str, object]) -> None:
        self.results.write(row)
        self.progress.advance(failed=bool(row.get("error")))

    async def _requeue_lost(self) -> None:
        if time.monotonic() < self._next_lost_check:
            return
        self._next_lost_check = time.monotonic() + LOST_CHECK_S
        silent = [t.request for t in self.in_flight.values() if t.last_id == "0-0"]
        known = await self._known([r.job.id for r in silent]) if silent else []
        lost = [r.job for r, k in zip(silent, known, strict=True) if not k]
        if lost:
            await self.store.submit_many(lost)
            self.submitted += len(lost)
