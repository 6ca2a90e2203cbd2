"""Priority lanes: the order in which a worker takes a model's jobs from its two streams.

A model's jobs are queued on ``ivl:jobs:<model>`` (interactive: everything the gateway queues) or
``ivl:jobs:<model>:batch`` (``broker-batch``), each stream with its own consumer group. With free slots, a
worker takes, and stops at the first step that gives it anything:

1. interactive entries idle past the lease (a dead or frozen worker's, or handed back), when a take-over pass is
   due;
2. new interactive entries (not right after a wait that read them all: step 5 sees any newer one at once);
3. batch entries idle past the lease, when a take-over pass is due;
4. new batch entries;
5. otherwise it waits on the interactive stream, so an interactive arrival is seen at once; a batch arrival is
   seen at the next pass, at most one wait later (one read of both streams would be cross-slot on a Redis Cluster:
   the two streams' names hash to different slots).

So a batch job is taken only when no interactive job of the model waits: an interactive request waits at most
for a slot to free up, never behind the batch backlog. Steps 1-4 do not block. Both lanes keep every guarantee
(take-over, resume, dead letters, idempotency): each step goes through the lane's own ``JobQueue``, and each
``Entry`` goes back to its own queue for every later transition.
"""

from __future__ import annotations

from collections.abc import Iterable

import redis.asyncio as aioredis

from broker_worker.job_queue import Entry, JobQueue, wait_new
from broker_worker.protocol import constants as c


class Lanes:
    def __init__(self, redis: aioredis.Redis, model: str, consumer: str, lease_s: float) -> None:
        #: Highest priority first.
        self.queues = [JobQueue(redis, model, consumer, lease_s, lane) for lane in c.LANES]
        #: The last wait read the first lane's new entries to the end (it returned fewer than asked for).
        self._first_read_out = False

    @property
    def streams(self) -> list[str]:
        return [queue.stream for queue in self.queues]

    async def ensure_groups(self) -> None:
        for queue in self.queues:
            await queue.ensure_group()

    async def take(self, count: int, held: Iterable[Entry], take_over: bool, block_ms: int) -> list[Entry]:
        """Up to ``count`` entries in lane order (see the module's docstring). ``held`` are the entries this worker
        has taken and not let go of: a take-over pass claims them back without returning them."""
        own = list(held)
        read_out, self._first_read_out = self._first_read_out, False
        for index, queue in enumerate(self.queues):
            if take_over:
                skip = {entry.entry_id for entry in own if entry.queue is queue}
                if taken := await queue.take_over(count, skip):
                    return taken
            # Right after a wait that read the first lane to its end, reading it again would find only what came
            # in since (the wait below finds that at once): one round trip less per job arrival, while the
            # arrival's job starts.
            if not (index == 0 and read_out) and (new := await queue.take_new(count)):
                return new
        taken = await wait_new(self.queues[:1], count, block_ms)
        self._first_read_out = len(taken) < count
        return taken

    async def keep(self, running: Iterable[Entry]) -> None:
        """Renew the lease of the entries this worker runs, each on its own stream."""
        own = list(running)
        for queue in self.queues:
            await queue.keep([entry.entry_id for entry in own if entry.queue is queue])

    async def forget_dead_consumers(self, idle_ms: int) -> None:
        for queue in self.queues:
            await queue.forget_dead_consumers(idle_ms)
