"""The worker: take jobs from the model's streams when a slot is free, run each (``job_run``), renew the
leases of the running ones, heart-beat, and drain on shutdown.

Taking has an order (``lanes``): interactive jobs before batch jobs; within a lane, entries idle past the lease
(a dead or frozen worker's, or handed back on shutdown) before entries nobody has started, so a resumed job never
waits behind its lane's backlog. A job whose worker dies stays pending; another worker takes it over after
``lease_s`` and resumes from the text already published. Live workers renew their lease, so a long job is never
run twice.
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

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from broker_worker.handoff import Handoff
from broker_worker.job_queue import Entry, at_end_of_id_space
from broker_worker.job_run import JobRunner
from broker_worker.lanes import Lanes
from broker_worker.model.engine import Engine
from broker_worker.protocol import constants as c
from broker_worker.protocol import health
from broker_worker.protocol.errors import USER_REFUSED
from broker_worker.protocol.jobs import JobStore
from broker_worker.protocol.messages import WorkerHealth, now_ms
from broker_worker.protocol.states import Ownership, StopReason
from broker_worker.settings import WorkerSettings
from broker_worker.stall import EXIT_STALLED, EngineStalled, StallWatch

log = logging.getLogger("broker_worker.worker")
#: Longest wait for new entries before looking for idle ones again (also bounds how long a hand-back waits).
TAKE_BLOCK_MS = 1000
#: After a stall, how long runs get to hand their jobs back themselves before the worker does it for them.
STALLED_HANDBACK_S = 5.0


class Worker:
    def __init__(self, settings: WorkerSettings, engine: Engine, redis: aioredis.Redis) -> None:
        self.settings = settings
        self.engine = engine
        self.redis = redis
        self.model = engine.model_name
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.lanes = Lanes(redis, self.model, self.worker_id, settings.lease_s)
        self.slots = settings.limit_model_concurrency
        #: Every entry this worker has taken and not yet let go of (one task each), from the moment it is taken:
        #: its own take-over pass must never claim one of them, even before its run has started.
        self._tasks: dict[asyncio.Task[None], Entry] = {}
        self._slot_freed = asyncio.Event()
        self._stopping = asyncio.Event()
        #: Set once running jobs are drained. The heartbeat ends on it by itself: with redis-py's asyncio client
        #: on Python 3.11, a cancel that lands while a command is in flight can be swallowed.
        self._drained = False
        self._started_ms = now_ms()
        self._next_take_over = 0.0
        handoff = Handoff()  # the store's publisher collects the engines' text (one wake-up per call)
        window_s, batch = settings.publish_window_ms / 1000, settings.publish_batch
        store = JobStore(redis, settings.job_ttl_s, window_s, collector=handoff, publish_batch=batch)
        watch = StallWatch(settings.stall_timeout_s, settings.lease_renew_s)
        self.runner = JobRunner(settings, engine, store, self._executor(), self.worker_id, handoff, watch=watch)
        self._stalled = False

    def _executor(self) -> ThreadPoolExecutor:
        # More generations at once than the device gains from only thrash it (CPU: threads fight for the cores).
        # With batching, every waiting job must reach the batcher, so each gets a thread.
        unbatched_cpu = self.engine.device == "cpu" and self.settings.max_batch_size == 1
        parallel = self.settings.parallel_generations or (1 if unbatched_cpu else self.slots)
        return ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="generate")

    @property
    def free_slots(self) -> int:
        return self.slots - len(self._tasks)

    async def run(self) -> None:
        streams = " and ".join(self.lanes.streams)
        log.info("worker %s serving %r on %s (%d slots)", self.worker_id, self.model, streams, self.slots)
        await self._ensure_groups()
        loops = [self._heartbeat_loop(), self._renew_loop(), self._take_loop()]
        background = [asyncio.create_task(loop) for loop in loops]
        stopping = asyncio.create_task(self._stopping.wait())
        done, _ = await asyncio.wait([stopping, *background], return_when=asyncio.FIRST_COMPLETED)
        crashed = next((t for t in done if t is not stopping and not t.cancelled() and t.exception()), None)
        if crashed is not None:  # a dead loop would leave a zombie worker: stop, hand back, exit non-zero
            log.error("worker loop crashed: %r; stopping", crashed.exception(), exc_info=crashed.exception())
            self.stop()
        await self._drain()
        self._drained = True
        for task in [stopping, *background]:
            task.cancel()
        await asyncio.gather(stopping, *background, return_exceptions=True)
        with contextlib.suppress(RedisError):
            await health.remove(self.redis, self.worker_id)
        self.runner.executor.shutdown(wait=False, cancel_futures=True)
        log.info("worker %s stopped", self.worker_id)
        if crashed is not None:
            raise RuntimeError("a worker loop crashed") from crashed.exception()
        if self._stalled:
            raise EngineStalled(f"worker {self.worker_id}: its engine stalled; its jobs were handed back")

    async def _ensure_groups(self) -> None:
        """The lanes' consumer groups, waited for while Redis is down or refuses them (full, loading, a replica): a
        worker started before Redis can take writes serves once it can, instead of exiting. A user the ACL does not
        allow is a setup error: that one exits at once."""
        delay = 0.5
        while not self._stopping.is_set():
            try:
                await self.lanes.ensure_groups()
                return
            except USER_REFUSED:
                raise
            except (RedisError, OSError) as exc:
                log.warning("cannot create the job streams' consumer groups yet (%s); retrying in %.1fs", exc, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
                delay = min(2 * delay, 5.0)

    def stop(self) -> None:
        """Stop taking jobs; running ones get ``shutdown_grace_s`` to finish, then are handed back."""
        if not self._stopping.is_set():
            log.info("worker %s stopping: no new jobs, %d running", self.worker_id, len(self._tasks))
            self._stopping.set()

    async def _drain(self) -> None:
        if self._stalled:
            await self._give_up_stalled()
        elif self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=self.settings.shutdown_grace_s)
            if pending:
                for run in self.runner.running.values():
                    run.stop(StopReason.HANDBACK)
                await asyncio.wait(pending, timeout=30)

    async def _give_up_stalled(self) -> None:
        """No grace (the engine is stuck): every run is told to hand back; those whose engine does not return
        within a few seconds are handed back from here."""
        for run in self.runner.running.values():
            run.stop(StopReason.HANDBACK)
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=STALLED_HANDBACK_S)
        for run in list(self.runner.running.values()):
            with contextlib.suppress(RedisError, OSError):  # not given back: taken over after the lease
                await self.runner.hand_back_stalled(run)

    def _check_stall(self) -> None:
        if self._stalled or not (why := self.runner.watch.stalled(self.runner.running.values(), time.monotonic())):
            return
        log.error(
            "engine stalled (%s): handing back every job and exiting with status %d; a stuck engine thread "
            "cannot be stopped, so this process must be restarted",
            *(why, EXIT_STALLED),
        )
        self._stalled = True
        self.stop()

    async def _take_loop(self) -> None:
        while not self._stopping.is_set():
            if self.free_slots <= 0:
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            try:
                if taken := await self._take():
                    for entry in taken:
                        self._spawn(entry)
                    # Each new job sends its start script before the next take sends its reads: the job's first
                    # token waits on that script, and the next take's replies only on Redis.
                    await asyncio.sleep(0)
            except (RedisError, OSError) as exc:
                await self._on_redis_error("take", exc)

    async def _take(self) -> list[Entry]:
        """In lane order; idle entries are looked for at most every ``take_over_interval``."""
        take_over = time.monotonic() >= self._next_take_over
        if take_over:
            self._next_take_over = time.monotonic() + self._take_over_interval()
        # Not only the running entries: one taken by the last wait may still be at its start script (after a
        # freeze it is idle past the lease, and a take-over pass now would hand this worker its own job twice).
        held = list(self._tasks.values())
        taken = await self.lanes.take(self.free_slots, held, take_over, TAKE_BLOCK_MS)
        for entry in taken:
            if entry.reclaimed:
                log.info("entry %s reclaimed from a silent worker (%s)", entry.entry_id, entry.queue.stream)
        return taken

    def _take_over_interval(self) -> float:
        return max(0.2, min(self.settings.lease_s / 4, TAKE_BLOCK_MS / 1000))

    async def _renew_loop(self) -> None:
        while not self._stopping.is_set() or self.runner.running:
            await asyncio.sleep(self.settings.lease_renew_s)
            self._check_stall()
            with contextlib.suppress(RedisError, OSError):
                await self._renew_all()

    async def _renew_all(self) -> None:
        runs = list(self.runner.running.items())
        states = await self.runner.store.renew_many([(job_id, run.token) for job_id, run in runs])
        owned: list[Entry] = []
        failed: Exception | None = None
        for (_, run), state in zip(runs, states, strict=True):
            if isinstance(state, Exception):
                failed = failed or state
            elif state == Ownership.TAKEN_OVER:
                run.stop(StopReason.FENCED)
            elif state == Ownership.OWNED_BUT_CANCELLED:
                run.stop(StopReason.CANCELLED)
            else:
                owned.append(run.entry)
        if failed is not None:  # as when renewing one by one: the entries' leases wait for the next round
            raise failed
        await self.lanes.keep(owned)

    async def _heartbeat_loop(self) -> None:
        beats = 0
        while not self._drained:
            with contextlib.suppress(RedisError, OSError):
                await health.record(self.redis, self._health(), self.settings.health_ttl_s)
                if not self._stopping.is_set() and await self.redis.exists(c.worker_drain_key(self.worker_id)):
                    log.info("worker %s drain requested through Redis", self.worker_id)
                    self.stop()  # the SIGTERM path: finish or hand back the running jobs, then exit
                await self.lanes.ensure_groups()  # re-creates the groups after a Redis restart without persistence
                if beats % 30 == 0:
                    await self.lanes.forget_dead_consumers(int(self.settings.forget_consumers_after_s * 1000))
            beats += 1
            await asyncio.sleep(self.settings.heartbeat_s)

    def _health(self) -> WorkerHealth:
        return WorkerHealth(
            worker_id=self.worker_id,
            model=self.model,
            slots=self.slots,
            running=len(self._tasks),
            tokens_per_s=round(self.runner.throughput.rate(), 2),
            jobs_done=self.runner.jobs_done,
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
            await self.lanes.ensure_groups()

    def _spawn(self, entry: Entry) -> None:
        task = asyncio.create_task(self._handle(entry))
        self._tasks[task] = entry
        task.add_done_callback(self._task_done)

    async def _handle(self, entry: Entry) -> None:
        if at_end_of_id_space(entry.entry_id):
            await entry.queue.dead_letter(entry.entry_id, entry.fields, "entry ID at the end of the ID space", None)
            await entry.queue.repair_last_id(entry.entry_id)
            return
        await self.runner.handle(entry)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        entry = self._tasks.pop(task, None)
        self._slot_freed.set()
        if task.cancelled() or (exc := task.exception()) is None:
            return
        if isinstance(exc, RedisError | OSError) and entry is not None:  # Redis gone or refusing (full, read-only)
            where = f"{entry.entry_id} ({entry.queue.stream})"
            log.warning("entry %s left pending after a Redis error: %s; taken over after the lease", where, exc)
        else:
            log.error("job handler crashed: %r", exc, exc_info=exc)
