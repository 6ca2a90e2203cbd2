"""One lane's job stream of a model as one worker sees it. Every transition of a stream entry has one method
here: take new entries, take over idle ones, keep (renew) the ones it runs, finish, hand back, dead-letter.

A model has one stream per priority lane (``constants.LANES``), each with its own consumer group; a worker holds
one ``JobQueue`` per lane, and in which order it takes from them is ``lanes.Lanes``'s business. Every ``Entry``
remembers the queue it came from, so its later transitions (finish, hand back, dead-letter) hit its own stream.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from broker_worker.protocol import constants as c
from broker_worker.protocol.jobs import StreamReply
from broker_worker.protocol.messages import DeadLetter
from broker_worker.protocol.script_pipeline import lua

log = logging.getLogger("broker_worker.worker")
#: An entry whose ID has this millisecond part leaves no room for XADD '*' after it (see lua/repair_ids.lua).
LAST_ID_MS = 2**64 - 1
#: XAUTOCLAIM calls per take-over pass; each examines up to 10 x COUNT pending entries and the cursor is kept
#: between passes, so a long pending list is walked over a few passes instead of rescanned from its start.
RECLAIM_CALLS_PER_PASS = 10
#: Idle time given to a handed-back entry: far past any lease, so the next take-over pass of any worker takes it.
HANDBACK_IDLE_MS = 10**9


@dataclass(frozen=True, eq=False)
class Entry:
    entry_id: str
    fields: dict[str, Any]
    reclaimed: bool
    #: The lane's queue this entry was taken from: every later transition of it goes through this one.
    queue: JobQueue


class JobQueue:
    def __init__(
        self, redis: aioredis.Redis, model: str, consumer: str, lease_s: float, lane: str = c.INTERACTIVE
    ) -> None:
        self.redis = redis
        self.lane = lane
        self.stream = c.job_stream(model, lane)
        self.consumer = consumer
        self.lease_ms = int(lease_s * 1000)
        self._cursor = "0-0"
        self._repair = redis.register_script(lua("repair_ids"))
        self._finish = redis.register_script(lua("finish"))

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.stream, c.CONSUMER_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def take_new(self, count: int) -> list[Entry]:
        """Up to ``count`` entries no worker has seen, without waiting (see ``wait_new``)."""
        response: StreamReply = await self.redis.xreadgroup(  # type: ignore[assignment]
            c.CONSUMER_GROUP, self.consumer, {self.stream: ">"}, count=count
        )
        return self.entries(response)

    def entries(self, response: StreamReply) -> list[Entry]:
        """The new entries of this queue's stream in an XREADGROUP reply (which may name several streams)."""
        return [Entry(i, f or {}, False, self) for s, entries in response or [] if s == self.stream for i, f in entries]

    async def take_over(self, count: int, skip: set[str]) -> list[Entry]:
        """Up to ``count`` entries idle past the lease (their worker died, froze or handed them back).

        Entries in ``skip`` are this worker's own running ones (idle only because it was frozen): they are
        claimed back (which renews them) but not returned. Entries deleted from the stream while pending are
        dead-lettered: whoever deleted them took the job away."""
        taken: list[Entry] = []
        for _ in range(RECLAIM_CALLS_PER_PASS):
            reply = await self.redis.xautoclaim(
                self.stream, c.CONSUMER_GROUP, self.consumer, self.lease_ms, start_id=self._cursor, count=count
            )
            self._cursor, claimed = reply[0], reply[1]
            for entry_id in reply[2] if len(reply) > 2 else []:
                await self.dead_letter(entry_id, {}, "entry deleted from the job stream while pending", None)
            taken += [Entry(i, f or {}, True, self) for i, f in claimed if i not in skip and f is not None]
            if len(taken) >= count or self._cursor == "0-0":
                break
        return taken

    async def keep(self, entry_ids: list[str]) -> None:
        """Renew the lease of entries this worker runs (their idle time restarts)."""
        if entry_ids:
            owned: list[Any] = list(entry_ids)
            await self.redis.xclaim(self.stream, c.CONSUMER_GROUP, self.consumer, 0, owned, justid=True)

    async def finish(self, entry_id: str) -> None:
        """The entry is done with (ran, refused, or a duplicate): acknowledge and delete it (lua/finish.lua)."""
        await self._finish(keys=[self.stream], args=[c.CONSUMER_GROUP, entry_id])

    async def hand_back(self, entry_id: str) -> None:
        """Make the entry the next thing any worker takes over, ahead of entries nobody has started: it stays
        pending, with an idle time past every lease, and keeps its place in the stream."""
        await self.redis.xclaim(
            self.stream, c.CONSUMER_GROUP, self.consumer, 0, [entry_id], idle=HANDBACK_IDLE_MS, justid=True
        )

    async def dead_letter(self, entry_id: str, fields: dict[str, Any], reason: str, job_id: str | None) -> None:
        letter = DeadLetter(stream=self.stream, entry_id=entry_id, job_id=job_id, reason=reason, fields=_kept(fields))
        await self.redis.xadd(
            c.DEAD_LETTER_STREAM,
            {"letter": letter.model_dump_json(), "reason": reason[:500]},
            maxlen=c.DEAD_LETTER_MAXLEN,
            approximate=True,
        )

    async def repair_last_id(self, entry_id: str) -> None:
        last = await self._repair(keys=[self.stream], args=[entry_id, c.CONSUMER_GROUP])
        log.warning("entry %s was at the end of the ID space: removed, stream and group reset to %s", entry_id, last)

    async def forget_dead_consumers(self, idle_ms: int) -> None:
        """Every worker process joins the group under a new name; drop the names of long-gone ones that hold no
        entries, so the group does not grow with every restart (a dead consumer's pending entries are taken over
        first; only then is it empty)."""
        for consumer in await self.redis.xinfo_consumers(self.stream, c.CONSUMER_GROUP):
            if consumer["name"] != self.consumer and consumer["pending"] == 0 and consumer["idle"] > idle_ms:
                await self.redis.xgroup_delconsumer(self.stream, c.CONSUMER_GROUP, consumer["name"])
                log.info("forgot consumer %s (idle %.0fs, nothing pending)", consumer["name"], consumer["idle"] / 1000)


async def wait_new(queues: list[JobQueue], count: int, block_ms: int) -> list[Entry]:
    """Wait up to ``block_ms`` for new entries on any of the queues (of one consumer), in one XREADGROUP.

    Redis answers for each stream that has entries, up to ``count`` each; what is over ``count`` in all (the
    later queues' first) is handed back, so the next take-over pass of any worker takes it."""
    first = queues[0]
    response: StreamReply = await first.redis.xreadgroup(  # type: ignore[assignment]
        c.CONSUMER_GROUP, first.consumer, {q.stream: ">" for q in queues}, count=count, block=block_ms
    )
    taken = [entry for queue in queues for entry in queue.entries(response)]
    for entry in taken[count:]:
        await entry.queue.hand_back(entry.entry_id)
    return taken[:count]


def at_end_of_id_space(entry_id: str) -> bool:
    return entry_id.split("-", 1)[0] == str(LAST_ID_MS)


def _kept(fields: dict[str, Any]) -> dict[str, str]:
    """A bounded, printable copy of an entry's fields (undecodable bytes shown escaped)."""
    return {_printable(k)[:200]: _printable(v)[:4096] for k, v in list(fields.items())[:20]}


def _printable(value: object) -> str:
    return str(value).encode("utf-8", "backslashreplace").decode("utf-8")
