"""The worker loop: pull jobs from the model's stream when a slot is free, run them, stream events back.

Lifecycle of one entry (one short step each): parse → start (idempotency, attempts, fencing token) → refuse
what must not run (duplicate, cancelled, past deadline, too many attempts) → resume text from the replay →
generate (deltas coalesced and published under the token) → terminal event → ack + delete. A job whose worker
dies stays pending; another worker takes it over after ``lease_s`` (XAUTOCLAIM) and resumes from the text
already published. Live workers renew their lease, so a long job is never run twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis.asyncio as aioredis
from pydantic import ValidationError
from redis.exceptions import RedisError, ResponseError

from broker_worker import constants as c
from broker_worker import health
from broker_worker.engine import Engine, Finish
from broker_worker.errors import ErrorCode, JobError, describe_problems
from broker_worker.jobs import FENCED, JobStore, StreamReply, entry_job_id, replay, replay_text
from broker_worker.messages import (
    Cancelled,
    DeadLetter,
    Done,
    Event,
    Failed,
    Job,
    Started,
    Usage,
    WorkerHealth,
    now_ms,
)
from broker_worker.relay import Handback, Relay, Running, Throughput
from broker_worker.settings import WorkerSettings

log = logging.getLogger("broker_worker.worker")
MAX_ENTRY_CHARS = 64 * 1024 * 1024


class BadEntry(Exception):
    """A stream entry that can never run: it goes to the dead-letter stream with this reason."""


def parse_entry(fields: dict[str, Any]) -> Job:
    raw = fields.get(c.JOB_FIELD)
    if raw is None:
        raise BadEntry(f"no '{c.JOB_FIELD}' field (fields: {sorted(fields)[:5]})")
    if len(raw) > MAX_ENTRY_CHARS:
        raise BadEntry(f"job is {len(raw)} characters; the limit is {MAX_ENTRY_CHARS}")
    try:
        job = Job.model_validate_json(raw)
    except ValidationError as exc:
        raise BadEntry(f"invalid job: {describe_problems(exc.errors())}") from exc
    if "id" not in job.model_fields_set:
        raise BadEntry("invalid job: id: missing (the client chooses it, to read the job's events)")
    return job


class Worker:
    def __init__(self, settings: WorkerSettings, engine: Engine, redis: aioredis.Redis) -> None:
        self.settings = settings
        self.engine = engine
        self.redis = redis
        self.store = JobStore(redis, settings.job_ttl_s)
        self.model = engine.model_name
        self.stream = c.job_stream(self.model)
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.slots = settings.limit_model_concurrency
        self.running: dict[str, Running] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._slot_freed = asyncio.Event()
        self._stopping = asyncio.Event()
        # More generations at once than the device gains from only thrash it (CPU: threads fight for the cores).
        # With batching, every waiting job must reach the batcher, so each gets a thread.
        unbatched_cpu = engine.device == "cpu" and settings.max_batch_size == 1
        parallel = settings.parallel_generations or (1 if unbatched_cpu else self.slots)
        self._executor = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="generate")
        self._started_ms = now_ms()
        self._jobs_done = 0
        self._tokens = Throughput()

    @property
    def free_slots(self) -> int:
        return self.slots - len(self._tasks)

    # --- main loop -------------------------------------------------------------------------------------------

    async def run(self) -> None:
        log.info("worker %s serving %r on %s (%d slots)", self.worker_id, self.model, self.stream, self.slots)
        await self._ensure_group()
        loops = [self._heartbeat_loop(), self._renew_loop(), self._reclaim_loop(), self._read_loop()]
        background = [asyncio.create_task(loop) for loop in loops]
        stopping = asyncio.create_task(self._stopping.wait())
        done, _ = await asyncio.wait([stopping, *background], return_when=asyncio.FIRST_COMPLETED)
        crashed = next((t for t in done if t is not stopping and not t.cancelled() and t.exception()), None)
        if crashed is not None:  # a dead loop would leave a zombie worker: stop, hand back, exit non-zero
            log.error("worker loop crashed: %r; stopping", crashed.exception(), exc_info=crashed.exception())
            self.stop()
        await self._drain()
        for task in [stopping, *background]:
            task.cancel()
        await asyncio.gather(stopping, *background, return_exceptions=True)
        with contextlib.suppress(RedisError):
            await health.remove(self.redis, self.worker_id)
        self._executor.shutdown(wait=False, cancel_futures=True)
        log.info("worker %s stopped", self.worker_id)
        if crashed is not None:
            raise RuntimeError("a worker loop crashed") from crashed.exception()

    def stop(self) -> None:
        """Stop taking jobs; running ones get ``shutdown_grace_s`` to finish, then are handed back."""
        if not self._stopping.is_set():
            log.info("worker %s stopping: no new jobs, %d running", self.worker_id, len(self._tasks))
            self._stopping.set()

    async def _drain(self) -> None:
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=self.settings.shutdown_grace_s)
            if pending:
                for run in self.running.values():
                    run.stop("handback")
                await asyncio.wait(pending, timeout=30)

    async def _ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.stream, c.CONSUMER_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _read_loop(self) -> None:
        while not self._stopping.is_set():
            if self.free_slots <= 0:
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            try:
                response: StreamReply = await self.redis.xreadgroup(  # type: ignore[assignment]
                    c.CONSUMER_GROUP, self.worker_id, {self.stream: ">"}, count=self.free_slots, block=1000
                )
            except (RedisError, OSError) as exc:
                await self._on_redis_error("read", exc)
                continue
            for _, entries in response or []:
                for entry_id, fields in entries:
                    self._spawn(entry_id, fields or {}, reclaimed=False)

    async def _reclaim_loop(self) -> None:
        interval = max(0.2, min(self.settings.lease_s / 2, 5.0))
        while not self._stopping.is_set():
            await asyncio.sleep(interval)
            if self.free_slots <= 0 or self._stopping.is_set():
                continue
            try:
                _, claimed, _ = await self.redis.xautoclaim(
                    self.stream,
                    c.CONSUMER_GROUP,
                    self.worker_id,
                    int(self.settings.lease_s * 1000),
                    start_id="0-0",
                    count=self.free_slots,
                )
            except (RedisError, OSError) as exc:
                await self._on_redis_error("reclaim", exc)
                continue
            for entry_id, fields in claimed:
                log.info("entry %s reclaimed from a silent worker", entry_id)
                self._spawn(entry_id, fields or {}, reclaimed=True)

    async def _renew_loop(self) -> None:
        while not self._stopping.is_set() or self.running:
            await asyncio.sleep(self.settings.lease_renew_s)
            with contextlib.suppress(RedisError, OSError):
                await self._renew_all()

    async def _renew_all(self) -> None:
        owned: list[int | bytes | str | memoryview] = []
        for job_id, run in list(self.running.items()):
            state = await self.store.renew(job_id, run.token)
            if state == 0:
                run.stop("fenced")
            elif state == 2:
                run.stop("cancelled")
            else:
                owned.append(run.entry_id)
        if owned:
            await self.redis.xclaim(self.stream, c.CONSUMER_GROUP, self.worker_id, 0, list(owned), justid=True)

    async def _heartbeat_loop(self) -> None:
        beats = 0
        while True:
            with contextlib.suppress(RedisError, OSError):
                await health.record(self.redis, self._health(), self.settings.health_ttl_s)
                await self._ensure_group()  # re-creates the group after a Redis restart without persistence
                if beats % 30 == 0:
                    await self._forget_dead_consumers()
            beats += 1
            await asyncio.sleep(self.settings.heartbeat_s)

    async def _forget_dead_consumers(self) -> None:
        """Every worker process joins the group under a new name; drop the names of long-gone ones that hold no
        entries, so the group does not grow with every restart. (A dead consumer's pending entries are first
        taken over by XAUTOCLAIM; only then is it empty.)"""
        idle_ms = int(self.settings.forget_consumers_after_s * 1000)
        for consumer in await self.redis.xinfo_consumers(self.stream, c.CONSUMER_GROUP):
            if consumer["name"] != self.worker_id and consumer["pending"] == 0 and consumer["idle"] > idle_ms:
                await self.redis.xgroup_delconsumer(self.stream, c.CONSUMER_GROUP, consumer["name"])
                log.info("forgot consumer %s (idle %.0fs, nothing pending)", consumer["name"], consumer["idle"] / 1000)

    def _health(self) -> WorkerHealth:
        return WorkerHealth(
            worker_id=self.worker_id,
            model=self.model,
            slots=self.slots,
            running=len(self._tasks),
            tokens_per_s=round(self._tokens.rate(), 2),
            jobs_done=self._jobs_done,
            host=socket.gethostname(),
            pid=os.getpid(),
            device=self.engine.device,
            context_len=self.engine.context_len,
            started_ms=self._started_ms,
            draining=self._stopping.is_set(),
        )

    async def _on_redis_error(self, what: str, exc: BaseException) -> None:
        log.warning("redis error during %s: %s; retrying", what, exc)
        await asyncio.sleep(0.5)
        with contextlib.suppress(RedisError, OSError):
            await self._ensure_group()

    def _spawn(self, entry_id: str, fields: dict[str, Any], reclaimed: bool) -> None:
        task = asyncio.create_task(self._handle(entry_id, fields, reclaimed))
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slot_freed.set()
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("job handler crashed: %r", exc, exc_info=exc)

    # --- one job -----------------------------------------------------------------------------------------------

    async def _handle(self, entry_id: str, fields: dict[str, Any], reclaimed: bool) -> None:
        try:
            job = parse_entry(fields)
        except BadEntry as exc:
            await self._reject_entry(entry_id, fields, str(exc))
            return
        log.info("job %s received (entry %s%s)", job.id, entry_id, ", reclaimed" if reclaimed else "")
        token = uuid.uuid4().hex[:12]
        decision = await self.store.start(job.id, entry_id, token, self.worker_id, now_ms())
        if not decision.run:
            log.info("job %s duplicate of a %s job: not run again", job.id, decision.status)
            await self._ack(entry_id)
            return
        run = Running(job, entry_id, token)
        if reason := self._refusal(job, decision.attempts, decision.cancelled, decision.resumed):
            await self._refuse(run, *reason)
            return
        self.running[job.id] = run
        try:
            await self._execute(run, decision.resumed, reclaimed, decision.attempts)
        finally:
            self.running.pop(job.id, None)

    def _refusal(self, job: Job, attempts: int, cancelled: bool, resumed: bool) -> tuple[str, Event] | None:
        if cancelled:
            return "cancelled before start", Cancelled()
        if attempts > self.settings.max_attempts:
            message = f"job failed on {attempts - 1} deliveries (limit {self.settings.max_attempts}); dead-lettered"
            return "dead-lettered", Failed(error_code=ErrorCode.INTERNAL_ERROR, message=message)
        if job.expired() and not resumed:
            late = (now_ms() - (job.deadline_ms or 0)) / 1000
            message = f"no worker started the job before its deadline ({late:.1f}s late); it was not run"
            return "deadline passed", Failed(error_code=ErrorCode.CONTROLLER_WORKER_TIMEOUT, message=message)
        return None

    async def _refuse(self, run: Running, what: str, event: Event) -> None:
        log.info("job %s %s", run.job.id, what)
        if what == "dead-lettered":
            await self._dead_letter(
                run.entry_id, {c.JOB_FIELD: run.job.model_dump_json()}, event_text(event), run.job.id
            )
        await self.store.publish(run.job.id, run.token, event)
        await self._ack(run.entry_id)

    async def _execute(self, run: Running, resumed: bool, reclaimed: bool, attempt: int) -> None:
        job, started = run.job, time.perf_counter()
        prefix = replay_text(await replay(self.redis, job.id)) if resumed else ""
        log.info(
            "job %s %s (queued %.2fs, %d chars already sent%s)",
            job.id,
            "resumed" if resumed else "started",
            max(0.0, (now_ms() - job.created_ms) / 1000),
            len(prefix),
            ", reclaimed" if reclaimed else "",
        )
        try:
            finish = await self._produce(run, prefix, resumed)
        except Handback:
            if await self._requeue(run):
                log.info("job %s handed back on shutdown; another worker resumes it", job.id)
        except JobError as exc:
            await self._on_job_error(run, exc, attempt, started)
        except Exception as exc:  # the error boundary: log the real error, tell the client what it was
            log.exception("job %s crashed in the engine", job.id)
            failed = Failed(error_code=ErrorCode.INTERNAL_ERROR, message=f"{type(exc).__name__}: {exc}")
            await self._finish(run, failed, started, "failed")
        else:
            await self._conclude(run, finish, started)

    async def _produce(self, run: Running, prefix: str, resumed: bool) -> Finish:
        if run.job.count_only:
            return await self._count(run.job)
        relay = Relay(
            self.store, self.engine, self._executor, run, self.settings.stream_interval_ms / 1000, self._tokens
        )
        return await relay.generate(prefix, Started(worker=self.worker_id, resumed=resumed))

    async def _on_job_error(self, run: Running, exc: JobError, attempt: int, started: float) -> None:
        """Transient errors (CUDA OOM) go back to the queue as a counted attempt; the rest fail the job."""
        if exc.retryable and attempt < self.settings.max_attempts:
            await self._requeue(run, failed_attempt=True)
            log.info(
                "job %s hit a transient error (%s); re-queued after attempt %d of %d",
                run.job.id,
                exc.message,
                attempt,
                self.settings.max_attempts,
            )
            return
        await self._finish(run, Failed(error_code=exc.code, message=exc.message), started, f"failed: {exc}")

    async def _conclude(self, run: Running, finish: Finish, started: float) -> None:
        if run.stop_reason == "fenced":
            log.info("job %s taken over by another worker: this worker publishes nothing more", run.job.id)
        elif run.stop_reason == "cancelled":
            await self._finish(run, Cancelled(), started, "cancelled")
        else:
            done = Done(finish_reason=finish.finish_reason, usage=finish.usage)
            await self._finish(run, done, started, f"done ({finish.usage.completion_tokens} tokens)")

    async def _count(self, job: Job) -> Finish:
        count = await asyncio.get_running_loop().run_in_executor(self._executor, self.engine.count_tokens, job)
        return Finish("stop", Usage(prompt_tokens=count, completion_tokens=0))

    async def _finish(self, run: Running, event: Event, started: float, what: str) -> None:
        if await self.store.publish(run.job.id, run.token, event) == FENCED:
            log.info("job %s taken over before it finished here", run.job.id)
            return
        self._jobs_done += 1
        log.info("job %s %s in %.2fs", run.job.id, what, time.perf_counter() - started)
        await self._ack(run.entry_id)

    async def _requeue(self, run: Running, *, failed_attempt: bool = False) -> bool:
        """Queue the job again (new entry, this one acked); the next run resumes from the text already sent."""
        if not await self.store.release(run.job.id, run.token, failed_attempt=failed_attempt):
            return False
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(self.stream, {c.JOB_FIELD: run.job.model_dump_json()})
            pipe.xack(self.stream, c.CONSUMER_GROUP, run.entry_id)
            pipe.xdel(self.stream, run.entry_id)
            await pipe.execute()
        return True

    async def _ack(self, entry_id: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(self.stream, c.CONSUMER_GROUP, entry_id)
            pipe.xdel(self.stream, entry_id)
            await pipe.execute()

    async def _reject_entry(self, entry_id: str, fields: dict[str, Any], reason: str) -> None:
        job_id = entry_job_id(fields)
        log.warning("entry %s dead-lettered: %s", entry_id, reason)
        await self._dead_letter(entry_id, fields, reason, job_id)
        if job_id is not None:  # tell whoever waits on this id why nothing will come
            token = uuid.uuid4().hex[:12]
            decision = await self.store.start(job_id, entry_id, token, self.worker_id, now_ms())
            if decision.run:
                await self.store.publish(
                    job_id, token, Failed(error_code=ErrorCode.VALIDATION_TYPE_ERROR, message=reason)
                )
        await self._ack(entry_id)

    async def _dead_letter(self, entry_id: str, fields: dict[str, Any], reason: str, job_id: str | None) -> None:
        kept = {str(k)[:200]: str(v)[:4096] for k, v in list(fields.items())[:20]}
        letter = DeadLetter(stream=self.stream, entry_id=entry_id, job_id=job_id, reason=reason, fields=kept)
        await self.redis.xadd(
            c.DEAD_LETTER_STREAM,
            {"letter": letter.model_dump_json(), "reason": reason[:500]},
            maxlen=c.DEAD_LETTER_MAXLEN,
            approximate=True,
        )


def event_text(event: Event) -> str:
    return event.message if isinstance(event, Failed) else event.type
