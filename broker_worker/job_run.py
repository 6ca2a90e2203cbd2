"""One stream entry's life on a worker, one short step each: parse → start (idempotency, attempts, fencing
token) → refuse what must not run (duplicate, cancelled, past deadline, too many attempts) → resume text from
the replay → generate (deltas coalesced and published under the token) → terminal event → finish the entry.

Every Redis transition has one owner: the job's keys change only through ``JobStore`` (Lua), the stream entry
only through the ``JobQueue`` of the lane it came from (``entry.queue``)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from broker_worker.handoff import Handoff
from broker_worker.job_queue import Entry
from broker_worker.model.engine import Engine, Finish
from broker_worker.protocol import constants as c
from broker_worker.protocol.errors import ErrorCode, JobError, describe_problems
from broker_worker.protocol.image_refs import is_ref, resolve_images
from broker_worker.protocol.jobs import FENCED, Announce, JobStore, StartDecision, entry_job_id, replay, replay_text
from broker_worker.protocol.messages import Cancelled, Done, Event, Failed, Job, Started, Usage, now_ms
from broker_worker.protocol.states import StopReason
from broker_worker.relay import Handback, Relay, Running, Throughput
from broker_worker.settings import WorkerSettings
from broker_worker.stall import StallWatch

log = logging.getLogger("broker_worker.worker")
MAX_ENTRY_CHARS = 64 * 1024 * 1024


class BadEntry(Exception):
    """A stream entry that can never run: it goes to the dead-letter stream with this reason."""


def parse_entry(fields: dict[str, Any]) -> Job:
    """The entry's job, or BadEntry for anything else: any bytes, any nesting, any size."""
    raw = fields.get(c.JOB_FIELD)
    if raw is None:
        raise BadEntry(f"no '{c.JOB_FIELD}' field (fields: {sorted(map(str, fields))[:5]})")
    if len(raw) > MAX_ENTRY_CHARS:
        raise BadEntry(f"job is {len(raw)} characters; the limit is {MAX_ENTRY_CHARS}")
    try:
        raw.encode("utf-8")  # undecodable bytes arrive as lone surrogates (the connection's surrogateescape)
        job = Job.model_validate_json(raw)
    except UnicodeEncodeError as exc:
        raise BadEntry(f"job is not UTF-8 (byte {exc.start})") from exc
    except ValidationError as exc:
        raise BadEntry(f"invalid job: {describe_problems(exc.errors())}") from exc
    except RecursionError as exc:
        raise BadEntry("invalid job: JSON nested too deeply") from exc
    if "id" not in job.model_fields_set:
        raise BadEntry("invalid job: id: missing (the client chooses it, to read the job's events)")
    return job


@dataclass
class JobRunner:
    """What every run on one worker shares; ``handle`` takes one entry to its end."""

    settings: WorkerSettings
    engine: Engine
    store: JobStore
    executor: Executor
    worker_id: str
    #: Every run's engine text to the loop (the store's publisher collects it: one wake-up per call, not per token).
    handoff: Handoff = field(default_factory=Handoff)
    throughput: Throughput = field(default_factory=Throughput)
    #: Runs in progress by job id; the worker renews their leases and stops them on shutdown.
    running: dict[str, Running] = field(default_factory=dict)
    #: What the engine made lately: a hung engine is noticed (stall.py; off unless the worker sets a timeout).
    watch: StallWatch = field(default_factory=lambda: StallWatch(0.0))
    jobs_done: int = 0

    async def handle(self, entry: Entry) -> None:
        try:
            job = parse_entry(entry.fields)
        except BadEntry as exc:
            await self.reject(entry, str(exc))
            return
        log.info("job %s received (entry %s%s)", job.id, entry.entry_id, ", reclaimed" if entry.reclaimed else "")
        token = uuid.uuid4().hex[:12]
        fresh_run_ms = int(self.settings.lease_s * 500)  # half a lease: no run fails that fast unnoticed
        # The start script publishes the run's started event itself (one round trip less before the first token).
        # A count-only job has none; a job with images by reference gets it once they are read (a missing one
        # fails the job before it started). It also decides whether the deadline passed, by Redis' clock.
        plain = not job.count_only and not any(is_ref(b) for m in job.prompt for b in m.image)
        announce = Announce(self.worker_id, self.settings.max_attempts) if plain else None
        decision = await self.store.start(
            job.id, entry.entry_id, token, self.worker_id, now_ms(), fresh_run_ms, announce, job.deadline_ms
        )
        if not decision.run:
            log.info("job %s duplicate of a %s job: not run again", job.id, decision.duplicate_of)
            await entry.queue.finish(entry.entry_id)
            return
        run = Running(job, entry, token, seq=decision.seq + int(decision.started))
        if reason := self._refusal(decision):
            await self._refuse(run, *reason)
            return
        self.running[job.id] = run
        try:
            await self._execute(run, decision)
        finally:
            self.watch.last_progress = time.monotonic()  # a run that ended is progress, text or not (count-only)
            if self.running.get(job.id) is run:  # a later run of the same job (after a freeze) keeps its tracking
                del self.running[job.id]

    def _refusal(self, decision: StartDecision) -> tuple[str, Event] | None:
        if decision.cancelled:
            return "cancelled before start", Cancelled()
        if (attempts := decision.attempts) > self.settings.max_attempts:
            message = f"job failed on {attempts - 1} deliveries (limit {self.settings.max_attempts}); dead-lettered"
            return "dead-lettered", Failed(error_code=ErrorCode.INTERNAL_ERROR, message=message)
        if decision.late_ms and not decision.resumed:
            late = decision.late_ms / 1000
            message = f"no worker started the job before its deadline ({late:.1f}s late); it was not run"
            return "deadline passed", Failed(error_code=ErrorCode.CONTROLLER_WORKER_TIMEOUT, message=message)
        return None

    async def _refuse(self, run: Running, what: str, event: Event) -> None:
        log.info("job %s %s", run.job.id, what)
        if what == "dead-lettered":
            fields = {c.JOB_FIELD: run.job.model_dump_json()}
            await run.queue.dead_letter(run.entry_id, fields, _event_text(event), run.job.id)
        await run.publish(self.store, event)
        await run.queue.finish(run.entry_id)

    async def _execute(self, run: Running, decision: StartDecision) -> None:
        job, started, resumed = run.job, time.perf_counter(), decision.resumed
        prefix = replay_text(await replay(self.store.redis, job.id)) if resumed else ""
        queued_s = max(0.0, (now_ms() - job.created_ms) / 1000)
        how = "resumed" if resumed else "started"
        log.info(
            "job %s %s (queued %.2fs, %d chars already sent%s)",
            *(job.id, how, queued_s, len(prefix), ", reclaimed" if run.entry.reclaimed else ""),
        )
        try:
            announce = None if decision.started else Started(worker=self.worker_id, resumed=resumed)
            finish = await self._produce(run, prefix, announce)
        except Handback:
            if await self._hand_back(run):
                log.info("job %s handed back on shutdown; another worker resumes it", job.id)
        except JobError as exc:
            await self._on_job_error(run, exc, decision.attempts, started)
        except Exception as exc:  # the error boundary: log the real error, tell the client what it was
            log.exception("job %s crashed in the engine", job.id)
            failed = Failed(error_code=ErrorCode.INTERNAL_ERROR, message=f"{type(exc).__name__}: {exc}")
            await self._finish(run, failed, started, "failed")
        else:
            await self._conclude(run, finish, started)

    async def _produce(self, run: Running, prefix: str, started: Started | None) -> Finish:
        """``started``: the event to publish first, unless the start script published it already (None)."""
        run.job = await resolve_images(self.store.redis, run.job)  # images by reference (40001 when missing)
        if run.job.count_only:
            return await self._count(run.job)
        interval = self.settings.stream_interval_ms / 1000
        relay = Relay(self.store, self.engine, self.executor, run, interval, self.throughput, self.handoff, self.watch)
        return await relay.generate(prefix, started)

    async def _on_job_error(self, run: Running, exc: JobError, attempt: int, started: float) -> None:
        """Transient errors (CUDA OOM) go back to the queue as a counted attempt; the rest fail the job."""
        if exc.retryable and attempt < self.settings.max_attempts:
            await self._hand_back(run, failed_attempt=True)
            log.info(
                "job %s hit a transient error (%s); re-queued after attempt %d of %d",
                *(run.job.id, exc.message, attempt, self.settings.max_attempts),
            )
            return
        await self._finish(run, Failed(error_code=exc.code, message=exc.message), started, f"failed: {exc}")

    async def _conclude(self, run: Running, finish: Finish, started: float) -> None:
        if run.stop_reason == StopReason.FENCED:
            log.info("job %s taken over by another worker: this worker publishes nothing more", run.job.id)
        elif run.stop_reason == StopReason.CANCELLED:
            await self._finish(run, Cancelled(), started, "cancelled")
        else:
            done = Done(finish_reason=finish.finish_reason, usage=finish.usage)
            await self._finish(run, done, started, f"done ({finish.usage.completion_tokens} tokens)")

    async def _count(self, job: Job) -> Finish:
        count = await asyncio.get_running_loop().run_in_executor(self.executor, self.engine.count_tokens, job)
        return Finish("stop", Usage(prompt_tokens=count, completion_tokens=0))

    async def _finish(self, run: Running, event: Event, started: float, what: str) -> None:
        if await run.publish(self.store, event) == FENCED:
            log.info("job %s taken over before it finished here", run.job.id)
            return
        self.jobs_done += 1
        log.info("job %s %s in %.2fs", run.job.id, what, time.perf_counter() - started)
        await run.queue.finish(run.entry_id)

    async def _hand_back(self, run: Running, *, failed_attempt: bool = False) -> bool:
        """Give the job back (it keeps its text; the next run resumes it), ahead of jobs nobody has started."""
        if self.running.get(run.job.id) is run:
            del self.running[run.job.id]  # no lease renewal may undo the hand-back
        if not await self.store.release(run.job.id, run.token, failed_attempt=failed_attempt):
            return False
        await run.queue.hand_back(run.entry_id)
        return True

    async def hand_back_stalled(self, run: Running) -> None:
        """A run whose engine thread is stuck: its job given back from outside (its own handler never returns)."""
        if await self._hand_back(run):
            log.info("job %s handed back: its engine stalled; another worker resumes it", run.job.id)

    async def reject(self, entry: Entry, reason: str) -> None:
        """Dead-letter an entry that can never run; tell whoever waits on its id (if it has one) why."""
        job_id = entry_job_id(entry.fields)
        log.warning("entry %s dead-lettered: %s", entry.entry_id, reason)
        await entry.queue.dead_letter(entry.entry_id, entry.fields, reason, job_id)
        if job_id is not None:
            token = uuid.uuid4().hex[:12]
            decision = await self.store.start(job_id, entry.entry_id, token, self.worker_id, now_ms())
            if decision.run:
                failed = Failed(error_code=ErrorCode.VALIDATION_TYPE_ERROR, message=reason)
                await self.store.publish(job_id, token, failed, decision.seq + 1)
        await entry.queue.finish(entry.entry_id)


def _event_text(event: Event) -> str:
    return event.message if isinstance(event, Failed) else event.type
