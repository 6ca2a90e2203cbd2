"""Job-side Redis operations, shared by workers and clients: submit, start, publish (fenced), renew, release,
replay, cancel. Each multi-key step is one Lua script over keys that share the job's hash tag."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis.asyncio as aioredis

from broker_worker import constants as c
from broker_worker.messages import JOB_ID_PATTERN, Event, Job, parse_event

FENCED = -1
#: XREAD / XREADGROUP reply with decode_responses: [(stream, [(entry id, fields), …]), …], or None on timeout.
StreamReply = list[tuple[str, list[tuple[str, dict[str, str]]]]] | None
CANCELLED = -2


def _lua(name: str) -> str:
    return resources.files("broker_worker").joinpath(f"lua/{name}.lua").read_text()


@dataclass(frozen=True)
class JobKeys:
    state: str
    events: str
    channel: str
    cancel: str

    @classmethod
    def of(cls, job_id: str) -> JobKeys:
        return cls(c.job_state_key(job_id), c.job_events_key(job_id), c.job_channel(job_id), c.job_cancel_key(job_id))


@dataclass(frozen=True)
class StartDecision:
    run: bool
    status: str
    attempts: int
    seq: int
    cancelled: bool

    @property
    def resumed(self) -> bool:
        return self.seq > 0


class JobStore:
    """The Lua scripts, registered once on an asyncio Redis client."""

    def __init__(self, redis: aioredis.Redis, job_ttl_s: int = c.JOB_TTL_S) -> None:
        self.redis = redis
        self.job_ttl_s = job_ttl_s
        self._start = redis.register_script(_lua("start"))
        self._publish = redis.register_script(_lua("publish"))
        self._renew = redis.register_script(_lua("renew"))
        self._release = redis.register_script(_lua("release"))

    async def start(self, job_id: str, entry_id: str, token: str, worker_id: str, now_ms: int) -> StartDecision:
        k = JobKeys.of(job_id)
        action, status, seq, cancelled = await self._start(
            keys=[k.state, k.cancel], args=[entry_id, token, worker_id, now_ms, self.job_ttl_s]
        )
        run = action == "run"
        return StartDecision(run, str(status), int(status) if run else 0, int(seq), bool(cancelled))

    async def publish(self, job_id: str, token: str, event: Event) -> int:
        """The event's seq, or FENCED / CANCELLED. The seq in ``event`` is ignored: Redis assigns it."""
        k = JobKeys.of(job_id)
        body = event.model_dump_json(exclude={"seq"})  # '{"type":"…",…}': the script puts the seq first
        result = await self._publish(
            keys=[k.state, k.events, k.cancel], args=[token, body[1:], c.REPLAY_MAXLEN, self.job_ttl_s]
        )
        return int(result)

    async def renew(self, job_id: str, token: str) -> int:
        """1 still owned, 2 owned but cancelled, 0 taken over."""
        k = JobKeys.of(job_id)
        return int(await self._renew(keys=[k.state, k.events, k.cancel], args=[token, self.job_ttl_s]))

    async def release(self, job_id: str, token: str, *, failed_attempt: bool = False) -> bool:
        """Hand the job back for another run; ``failed_attempt`` counts this run against ``max_attempts``."""
        status = "retry" if failed_attempt else "released"
        return bool(await self._release(keys=[JobKeys.of(job_id).state], args=[token, status]))


async def submit(redis: aioredis.Redis, job: Job) -> str:
    """Queue a job in one round trip; returns the stream entry id.

    Re-submitting an id that is running or finished queues an entry that the worker acks without running it
    (the start script decides, atomically), so the caller may simply stream the id's events.
    """
    async with redis.pipeline(transaction=False) as pipe:
        queue_commands(pipe, job)
        entry: str = (await pipe.execute())[-1]
    return entry


def queue_commands(pipe: Any, job: Job) -> None:
    """Add a job's submission to a pipeline (sync or asyncio: adding commands is synchronous in both); the
    last reply is the stream entry id."""
    state = c.job_state_key(job.id)
    # "queued" lets a resuming client tell a waiting job from an unknown id; workers treat it as new.
    pipe.hsetnx(state, "status", "queued")
    pipe.expire(state, c.JOB_TTL_S)
    pipe.xadd(
        c.job_stream(job.model), {c.JOB_FIELD: job.model_dump_json()}, maxlen=c.JOB_STREAM_MAXLEN, approximate=True
    )


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
    except (ValueError, TypeError):
        return None
    job_id = value.get("id") if isinstance(value, dict) else None
    return job_id if isinstance(job_id, str) and re.fullmatch(JOB_ID_PATTERN, job_id) else None
