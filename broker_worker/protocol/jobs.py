"""Job-side Redis operations, shared by workers and clients: start, publish (fenced), renew, release, replay,
cancel. Each multi-key step is one Lua script over keys that share the job's hash tag. ``JobStore`` is also a
``Submitter``: queueing jobs is in submission.py."""

from __future__ import annotations

import asyncio
import functools
import json
import re
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from pydantic_core import to_json

from broker_worker.protocol import constants as c
from broker_worker.protocol.connections import is_cluster
from broker_worker.protocol.job_keys import JobKeys
from broker_worker.protocol.messages import JOB_ID_PATTERN, Event, Started, parse_event
from broker_worker.protocol.publish_batch import Collector, PublishBatcher
from broker_worker.protocol.replica_ack import ReplicaAck
from broker_worker.protocol.script_pipeline import ScriptCall, evalsha_pipeline, lua
from broker_worker.protocol.states import JobStatus, Ownership, PublishRefused

# Queued, queue_commands, queue_full, submission and submit moved to submission.py; re-exported (``as`` itself) so
# that scripts written against earlier releases keep importing them from here.
from broker_worker.protocol.submission import Queued as Queued
from broker_worker.protocol.submission import Submitter
from broker_worker.protocol.submission import queue_commands as queue_commands
from broker_worker.protocol.submission import queue_full as queue_full
from broker_worker.protocol.submission import submission as submission
from broker_worker.protocol.submission import submit as submit

FENCED = PublishRefused.FENCED
CANCELLED = PublishRefused.CANCELLED
#: XREAD / XREADGROUP reply with decode_responses: [(stream, [(entry id, fields), …]), …], or None on timeout.
StreamReply = list[tuple[str, list[tuple[str, dict[str, str]]]]] | None


@dataclass(frozen=True)
class StartDecision:
    run: bool
    #: The job's status when this start found it a duplicate (it is not run again).
    duplicate_of: str
    attempts: int
    #: Events recorded for the job before this run.
    seq: int
    cancelled: bool
    #: The start script recorded and published this run's ``started`` event (seq ``seq + 1``).
    started: bool = False
    #: How far past its deadline the job is, by Redis' clock (0: not past, or none).
    late_ms: int = 0

    @property
    def resumed(self) -> bool:
        return self.seq > 0


@dataclass(frozen=True)
class Announce:
    """What the start script needs to publish a run's ``started`` event itself (lua/start.lua's ARGV[8:])."""

    worker_id: str
    max_attempts: int

    def args(self) -> list[str | int]:
        fresh, resumed = (
            Started(worker=self.worker_id, resumed=r).model_dump_json(exclude={"seq"})[1:] for r in (False, True)
        )
        return [self.max_attempts, fresh, resumed, c.REPLAY_MAXLEN]


class JobStore(Submitter):
    """The Lua scripts, registered once on an asyncio Redis client: a worker's run transitions, and (inherited from
    ``Submitter``) queueing."""

    def __init__(
        self,
        redis: aioredis.Redis,
        job_ttl_s: int = c.JOB_TTL_S,
        publish_window_s: float = 0.0,
        replica_ack: ReplicaAck | None = None,
        collector: Collector | None = None,
        publish_batch: int = 0,
    ) -> None:
        super().__init__(redis, replica_ack)
        self.job_ttl_s = job_ttl_s
        self._start = redis.register_script(lua("start"))
        self._publish = redis.register_script(lua("publish"))
        # A worker's events of many jobs go out in one call per round trip; on a cluster each job's keys have a
        # slot of their own, so there each event is a call of its own.
        common: list[str | int] = [c.REPLAY_MAXLEN, job_ttl_s]
        batcher = PublishBatcher(redis, self._publish, common, publish_window_s, collector, publish_batch)
        self._publish_batch = None if is_cluster(redis) else batcher
        self._renew = redis.register_script(lua("renew"))
        self._release = redis.register_script(lua("release"))

    async def start(
        self,
        job_id: str,
        entry_id: str,
        token: str,
        worker_id: str,
        now_ms: int,
        fresh_run_ms: int = 0,
        announce: Announce | None = None,
        deadline_ms: int | None = None,
    ) -> StartDecision:
        """Decide whether this delivery runs the job. Taking over a run that started less than ``fresh_run_ms``
        ago (Redis' clock) counts no attempt: both workers were handed the entry at once. With ``announce``, a
        run that is not refused also gets its ``started`` event, recorded and published in the same step; a new
        run past ``deadline_ms`` (Redis' clock) gets none."""
        k = JobKeys.of(job_id)
        args: list[str | int] = [entry_id, token, worker_id, now_ms, self.job_ttl_s, fresh_run_ms, deadline_ms or 0]
        if announce is not None:
            args += announce.args()
        action, status, seq, cancelled, *more = await self._start(keys=[k.state, k.cancel, k.events], args=args)
        if action == "run":
            started, late_ms = bool(more[0]), int(more[1])
            return StartDecision(True, "", int(status), int(seq), bool(cancelled), started, late_ms)
        return StartDecision(False, str(status), 0, int(seq), bool(cancelled))

    async def publish(self, job_id: str, token: str, event: Event, seq: int) -> int:
        """Record and publish ``event`` as the job's event number ``seq`` (the caller counts its events, so a call
        re-sent after a timeout is applied once). Returns the seq, or FENCED / CANCELLED."""
        body = event.model_dump_json(exclude={"seq"})  # '{"type":"…",…}': the script puts the seq first
        return await self._publish_body(job_id, token, body[1:], seq)

    async def publish_text(self, job_id: str, token: str, text: str, seq: int) -> int:
        """``publish`` of ``Delta(text=text)``, its JSON written without building the model (pydantic's own string
        encoder, so the bytes are the same): this runs once per streamed event."""
        return await self._publish_body(job_id, token, _delta_body(text), seq)

    def send_text(self, job_id: str, token: str, text: str, seq: int, urgent: bool = False) -> asyncio.Future[int]:
        """``publish_text`` as a future: the relay takes its result in a done callback, no task step per event.
        ``urgent`` (a run's first delta): not held for a busy worker's publish window."""
        if self._publish_batch is not None:
            keys = list(_publish_keys(job_id))
            return self._publish_batch.submit(keys, [token, _delta_body(text), seq], urgent)
        return asyncio.ensure_future(self.publish_text(job_id, token, text, seq))

    async def _publish_body(self, job_id: str, token: str, body: str, seq: int) -> int:
        keys = list(_publish_keys(job_id))
        args: list[str | int] = [token, body, seq]
        if self._publish_batch is not None:
            return await self._publish_batch.submit(keys, args)
        results = await self._publish(keys=keys, args=[c.REPLAY_MAXLEN, self.job_ttl_s, *args])
        return int(results[0])

    async def renew(self, job_id: str, token: str) -> Ownership:
        k = JobKeys.of(job_id)
        return Ownership(int(await self._renew(keys=[k.state, k.events, k.cancel], args=[token, self.job_ttl_s])))

    async def renew_many(self, runs: list[tuple[str, str]]) -> list[Ownership | Exception]:
        """``renew`` for each (job id, token), in one round trip (a worker renews all its runs at once: one call
        each cost Redis a socket read and write apiece); on a cluster, in parallel (each job has its own slot)."""
        if is_cluster(self.redis):
            found = await asyncio.gather(*(self.renew(job_id, token) for job_id, token in runs), return_exceptions=True)
            return [r if isinstance(r, Ownership) else _as_error(r) for r in found]
        calls: list[ScriptCall] = []
        for job_id, token in runs:
            k = JobKeys.of(job_id)
            calls.append((self._renew, [k.state, k.events, k.cancel], [token, self.job_ttl_s]))
        results = await evalsha_pipeline(self.redis, calls)
        return [r if isinstance(r, Exception) else Ownership(int(r)) for r in results]

    async def release(self, job_id: str, token: str, *, failed_attempt: bool = False) -> bool:
        """Hand the job back for another run; ``failed_attempt`` counts this run against ``max_attempts``."""
        status = JobStatus.RETRY if failed_attempt else JobStatus.RELEASED
        return bool(await self._release(keys=[JobKeys.of(job_id).state], args=[token, status.value]))


def _delta_body(text: str) -> str:
    return '"type":"delta","text":' + to_json(text).decode() + "}"


@functools.lru_cache(maxsize=4096)
def _publish_keys(job_id: str) -> tuple[str, str, str]:
    """``lua/publish.lua``'s keys of a job (state, replay, cancel): built once per running job, not per event."""
    k = JobKeys.of(job_id)
    return k.state, k.events, k.cancel


def _as_error(result: BaseException) -> Exception:
    if isinstance(result, Exception):
        return result
    raise result  # CancelledError and the like are not one job's failure


async def exists(redis: aioredis.Redis, job_id: str) -> bool:
    """Whether Redis knows the job (queued through a client, running, or finished within the TTL)."""
    return bool(await redis.exists(c.job_state_key(job_id), c.job_events_key(job_id)))


async def cancel(redis: aioredis.Redis, job_id: str, ttl_s: int = c.JOB_TTL_S) -> None:
    await redis.set(c.job_cancel_key(job_id), "1", ex=ttl_s)


async def replay(redis: aioredis.Redis, job_id: str, after_seq: int = 0) -> list[Event]:
    """Every recorded event of a job with seq > after_seq, in order."""
    entries: list[tuple[str, dict[str, str]]] = await redis.xrange(c.job_events_key(job_id))  # type: ignore[assignment]
    events = [parse_event(fields[c.EVENT_FIELD]) for _, fields in entries if c.EVENT_FIELD in fields]
    return [e for e in events if e.seq > after_seq]


def replay_text(events: list[Event]) -> str:
    return "".join(e.text for e in events if e.type == "delta")


def entry_job_id(fields: dict[str, Any]) -> str | None:
    """Best effort: the id of a job whose entry failed validation, so its subscribers can be told."""
    try:
        value = json.loads(fields.get(c.JOB_FIELD, ""))
    except (ValueError, TypeError, RecursionError):
        return None
    job_id = value.get("id") if isinstance(value, dict) else None
    return job_id if isinstance(job_id, str) and re.fullmatch(JOB_ID_PATTERN, job_id) else None
