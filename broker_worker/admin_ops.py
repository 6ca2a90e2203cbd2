"""What ``broker-admin`` (and the operations page) change in Redis: requeue and purge dead letters, cancel jobs,
drain workers. Every change goes through the documented keys (docs/protocol.md), never around the workers."""

from __future__ import annotations

import re
from dataclasses import dataclass

import redis

from broker_worker.admin_read import DeadView, dead_letters, find_dead, job_view, letter_job, live_workers
from broker_worker.protocol import constants as c
from broker_worker.protocol.job_keys import JobKeys
from broker_worker.protocol.messages import now_ms
from broker_worker.protocol.states import JobStatus
from broker_worker.protocol.submission import queue_commands

#: How long a drain request waits for its worker (worker ids are unique per process, so a stale one is harmless).
DRAIN_TTL_S = 3600
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")


#: ``broker-admin`` exit codes (docs in the README): the highest of a command's outcomes is its exit status.
OK, NOT_FOUND, USAGE, REFUSED, UNREACHABLE, TIMED_OUT = 0, 1, 2, 3, 4, 5


@dataclass
class Outcome:
    """What one change did: ``code`` is OK, NOT_FOUND (no such job, letter or worker) or REFUSED (it exists, but
    the change cannot be made: a letter without a runnable job, a job that already ended); ``message`` says why."""

    ref: str
    code: int
    message: str
    job_id: str | None = None
    entry_id: str | None = None

    @property
    def ok(self) -> bool:
        return self.code == OK


def requeue(r: redis.Redis, ref: str) -> Outcome:
    """Run a dead-lettered job again under its id.

    The job's old state, replay record and cancel key are deleted and it is queued afresh (``status: queued``,
    attempts from zero): the start script would otherwise take the ``failed`` state with its replay for a
    duplicate. Subscribers of the id then see the new run's events from seq 1. The dead letter is removed, so a
    second requeue cannot queue the job twice. A letter without a runnable job is left as it is."""
    dead = find_dead(r, ref)
    if dead is None:
        return Outcome(ref, NOT_FOUND, f"no dead letter {ref!r} in {c.DEAD_LETTER_STREAM}")
    job, why = letter_job(dead.fields)
    if job is None:
        return Outcome(ref, REFUSED, f"dead letter {dead.id}: {why}", dead.job_id)
    seconds, micros = r.time()  # Redis' clock, as the start script judges deadlines (not this host's)
    if job.expired(int(seconds) * 1000 + int(micros) // 1000):
        return Outcome(
            ref, REFUSED, f"dead letter {dead.id}: cannot run: job {job.id}'s deadline_ms has passed", job.id
        )
    keys = JobKeys.of(job.id)
    with r.pipeline(transaction=True) as pipe:
        try:
            pipe.watch(keys.state)  # type: ignore[no-untyped-call]  # a run of the same id starting meanwhile aborts the requeue
            current = pipe.hget(keys.state, "status")
            if current == JobStatus.RUNNING.value:
                return Outcome(ref, REFUSED, f"job {job.id} is running again (another entry); not requeued", job.id)
            pipe.multi()
            pipe.delete(keys.state, keys.events, keys.cancel)
            queue_commands(pipe, job)
            entry_id = str(pipe.execute()[-1])
        except redis.WatchError:
            return Outcome(ref, REFUSED, f"job {job.id} changed while requeueing; try again", job.id)
    r.xdel(c.DEAD_LETTER_STREAM, dead.id)
    return Outcome(ref, OK, f"job {job.id} requeued on {c.job_stream(job.model)} as {entry_id}", job.id, entry_id)


def runnable_letters(r: redis.Redis) -> list[DeadView]:
    return [d for d in dead_letters(r, c.DEAD_LETTER_MAXLEN) if not d.cannot_run]


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``2h``, ``7d`` → seconds."""
    match = _DURATION.match(text.strip())
    if not match:
        raise ValueError(f"not a duration: {text!r} (e.g. 90s, 15m, 2h, 7d)")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


def purge(r: redis.Redis, older_than_s: float | None) -> int:
    """Delete dead letters (those written more than ``older_than_s`` ago, or all); returns how many."""
    if older_than_s is None:
        return int(r.xtrim(c.DEAD_LETTER_STREAM, maxlen=0, approximate=False))
    cutoff = now_ms() - int(older_than_s * 1000)
    return int(r.xtrim(c.DEAD_LETTER_STREAM, minid=f"{cutoff}-0", approximate=False))


def cancel(r: redis.Redis, job_id: str, force: bool = False) -> Outcome:
    """Ask the job's worker to stop it (``SET …:cancel``); a worker that picks it up later ends it cancelled."""
    view = job_view(r, job_id)
    if view is None and not force:
        hint = "a job queued by a plain XADD has no state until a worker takes it: --force sets the cancel key anyway"
        return Outcome(job_id, NOT_FOUND, f"unknown job {job_id!r} (or it expired); {hint}", job_id)
    if view is not None and view.status in {s.value for s in (JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED)}:
        return Outcome(job_id, REFUSED, f"job {job_id} already ended {view.status}; nothing to cancel", job_id)
    r.set(c.job_cancel_key(job_id), "1", ex=c.JOB_TTL_S)
    status = view.status if view else "unknown"
    return Outcome(job_id, OK, f"job {job_id} ({status}): cancel requested", job_id, view.entry if view else None)


def drain(r: redis.Redis, worker_id: str) -> Outcome:
    """Ask a live worker to drain: it stops taking jobs, finishes or hands back its running ones, then exits."""
    if worker_id not in {w.worker_id for w in live_workers(r)}:
        return Outcome(worker_id, NOT_FOUND, f"no live worker {worker_id!r} (see broker-admin status)")
    r.set(c.worker_drain_key(worker_id), str(now_ms()), ex=DRAIN_TTL_S)
    return Outcome(worker_id, OK, f"worker {worker_id}: drain requested; it exits once its jobs are done")


def worker_gone(r: redis.Redis, worker_id: str) -> bool:
    return worker_id not in {w.worker_id for w in live_workers(r)}
