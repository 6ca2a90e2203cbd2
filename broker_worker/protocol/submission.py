"""Queueing jobs, shared by clients, the gateway and ``broker-batch``: ``Submitter`` (the submission side of
``JobStore``), ``submit`` for callers without a store, and the same submission as raw commands for pipelines of
their own. Queueing is one script over the stream of the model's lane (admission and XADD in one step), after one
that marks the job ``queued`` on its own keys."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import redis.asyncio as aioredis

from broker_worker.protocol import constants as c
from broker_worker.protocol.connections import is_cluster
from broker_worker.protocol.errors import ErrorCode, JobError
from broker_worker.protocol.job_keys import JobKeys
from broker_worker.protocol.messages import Job
from broker_worker.protocol.replica_ack import ReplicaAck, Write, write_and_wait
from broker_worker.protocol.script_pipeline import ScriptCall, evalsha_pipeline, lua

T = TypeVar("T")


class Submitter:
    """The submission scripts, registered once on an asyncio Redis client."""

    def __init__(self, redis: aioredis.Redis, replica_ack: ReplicaAck | None = None) -> None:
        self.redis = redis
        #: ``--min-replicas-ack``: submissions wait for that many replicas (``replica_ack``).
        self.replica_ack = replica_ack or ReplicaAck()
        self._mark_queued = redis.register_script(lua("mark_queued"))
        self._enqueue = redis.register_script(lua("enqueue"))

    async def submit(self, job: Job, max_queue: int = 0) -> str:
        """Queue a job in one round trip; returns the stream entry id (``queue``'s, without its other facts).

        The job goes on its lane's stream (``job.priority``). ``max_queue`` > 0 refuses (42903) when that many
        entries of the lane are queued or running for the model, checked and added atomically. Re-submitting an
        id that is running or finished queues an entry that the worker acks without running it (the start script
        decides), so the caller may simply stream the id's events.
        """
        return (await self.queue(job, max_queue)).entry_id

    async def queue(self, job: Job, max_queue: int = 0, also: Sequence[ScriptCall] = ()) -> Queued:
        """``submit``, and whether the id was new. ``also``: script calls on the job's own keys (e.g. a reader's
        join) sent in the same round trip where the submission is one pipeline, else alongside it; an error in
        any of them is raised."""
        marked, entry = await self._queue(job, max_queue, also)
        if isinstance(entry, list):  # ['full', depth]
            if marked:  # nothing was queued: do not leave a 'queued' marker behind
                await self.redis.delete(JobKeys.of(job.id).state)
            raise queue_full(job.model, int(entry[1]), max_queue, job.priority)
        return Queued(str(entry), bool(marked))

    async def _queue(self, job: Job, max_queue: int, also: Sequence[ScriptCall] = ()) -> tuple[int, str | list[Any]]:
        """The ``mark_queued`` and ``enqueue`` scripts' replies; with ``--min-replicas-ack``, each followed by
        ``WAIT`` on its connection, and a queued job that too few replicas acknowledged is reported."""
        if self.replica_ack.wanted or is_cluster(self.redis):
            return await _first(self._queue_apart(job, max_queue), also)
        k, stream = JobKeys.of(job.id), c.job_stream(job.model, job.priority)
        calls = [  # one round trip (a script pipeline of redis-py's would ask SCRIPT EXISTS first: two)
            *also,
            (self._mark_queued, [k.state, k.events], [c.JOB_TTL_S]),
            (self._enqueue, [stream], [job.model_dump_json(), max_queue]),
        ]
        results = await evalsha_pipeline(self.redis, calls)
        if error := next((r for r in results if isinstance(r, Exception)), None):
            raise error
        marked, entry = results[-2:]
        return marked, entry

    async def _queue_apart(self, job: Job, max_queue: int) -> tuple[int, str | list[Any]]:
        """``_queue`` where the submission is not one plain pipeline: with ``--min-replicas-ack`` or on a cluster."""
        if self.replica_ack.wanted:
            (marked, entry), acked = await write_and_wait(self.redis, submission(job, max_queue), self.replica_ack)
            if not isinstance(entry, list):
                self.replica_ack.check(job.id, job.model, acked)
            return marked, entry
        k, stream = JobKeys.of(job.id), c.job_stream(job.model, job.priority)
        # The job's keys and the model's stream are in different slots (maybe nodes), and a cluster pipeline
        # does not reload a script a node lacks (a promoted replica): two calls, in parallel.
        marked, entry = await asyncio.gather(
            self._mark_queued(keys=[k.state, k.events], args=[c.JOB_TTL_S]),
            self._enqueue(keys=[stream], args=[job.model_dump_json(), max_queue]),
        )
        return marked, entry

    async def submit_many(self, jobs: list[Job]) -> None:
        """Queue jobs in one round trip, each on its lane's stream, without a queue limit (the caller bounds what
        it has in flight). Each entry goes in before its ``queued`` marker: a submitter killed half way leaves
        at most an entry without a marker (it runs as a new job), never a marker without an entry, which a reader
        that re-attaches to the id would wait on for ever."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for job in jobs:
                k = JobKeys.of(job.id)
                stream = c.job_stream(job.model, job.priority)
                await self._enqueue(keys=[stream], args=[job.model_dump_json(), 0], client=pipe)
                await self._mark_queued(keys=[k.state, k.events], args=[c.JOB_TTL_S], client=pipe)
            await pipe.execute()


@dataclass(frozen=True)
class Queued:
    entry_id: str
    #: The id was unknown to Redis: this submission created it, so no event of it can have been recorded before.
    new: bool


async def _first(submission: Awaitable[T], calls: Sequence[ScriptCall]) -> T:
    """``submission``'s result, with ``calls`` run alongside it (errors raised)."""
    result, *_ = await asyncio.gather(submission, *(script(keys=keys, args=args) for script, keys, args in calls))
    return result  # type: ignore[no-any-return]


def queue_full(model: str, depth: int, limit: int, lane: str = c.INTERACTIVE) -> JobError:
    jobs = "jobs" if lane == c.INTERACTIVE else f"{lane} jobs"
    return JobError(
        ErrorCode.ENGINE_OVERLOADED,
        f"{depth} {jobs} are queued or running for {model!r} (limit {limit}); retry later or start more workers",
    )


async def submit(redis: aioredis.Redis, job: Job, max_queue: int = 0) -> str:
    """``Submitter.submit`` for callers without a store of their own."""
    return await Submitter(redis).submit(job, max_queue)


def submission(job: Job, max_queue: int = 0) -> list[Write]:
    """A job's submission as raw writes (the scripts' text, each routed by its first key): the queued marker,
    then the entry. Their last reply is the entry id (or ``['full', depth]``)."""
    k, stream = JobKeys.of(job.id), c.job_stream(job.model, job.priority)
    return [
        (k.state, ("EVAL", lua("mark_queued"), 2, k.state, k.events, c.JOB_TTL_S)),
        (stream, ("EVAL", lua("enqueue"), 1, stream, job.model_dump_json(), max_queue)),
    ]


def queue_commands(pipe: Any, job: Job) -> None:
    """Add a job's submission to a pipeline (sync or asyncio: adding commands is synchronous in both; the script
    text is sent each time, for callers that queue many jobs in one pipeline). The last reply is the entry id."""
    for _, command in submission(job):
        pipe.execute_command(*command)
