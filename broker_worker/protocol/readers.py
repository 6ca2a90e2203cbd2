"""Who still reads a job, so that a client hanging up cancels only a job nobody else wants.

``ivl:job:{<id>}:readers`` is a sorted set: member = a reader (one request of one gateway process), score = the
reader's expiry in Redis time (unix ms). A reader joins before it streams and renews while it streams (a
process renews all its readers in one pipeline every ``READER_RENEW_S``). Leaving is one script: remove the
reader, drop expired ones, and only when none is left and the leaving reader's client went away, set the cancel
key. So two requests for one id (a client's retry, through this gateway or another) never cancel each other,
and a gateway that dies stops renewing: its readers expire after ``READER_TTL_S``. The key expires with its
last reader.

A reader whose client went away leaves ``HANGUP_GRACE_S`` later (still renewed meanwhile): a client whose
connection dropped and that retries the same id, or resumes it by id, within that time finds its job running
rather than cancelled, because its new reader joined before the old one left.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import uuid

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from broker_worker.protocol import constants as c
from broker_worker.protocol.aio import stop
from broker_worker.protocol.connections import is_cluster
from broker_worker.protocol.script_pipeline import ScriptCall

log = logging.getLogger("broker_worker.protocol.readers")

READER_TTL_S = 30.0
READER_RENEW_S = 10.0
HANGUP_GRACE_S = 1.0

_NOW_MS = "local t = redis.call('TIME')\nlocal now = t[1] * 1000 + math.floor(t[2] / 1000)\n"
#: KEYS: readers. ARGV: reader, ttl ms. Redis' clock, so gateways with skewed clocks agree.
JOIN = (
    _NOW_MS
    + """redis.call('ZADD', KEYS[1], now + ARGV[2], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1"""
)
#: KEYS: readers, cancel, job state. ARGV: reader, "1" to cancel when nobody is left, cancel TTL s. Returns readers
#: left. A job that ended meanwhile (e.g. during the hang-up grace) gets no cancel key.
LEAVE = (
    _NOW_MS
    + """redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local left = redis.call('ZCARD', KEYS[1])
if left == 0 and ARGV[2] == '1' then
  local status = redis.call('HGET', KEYS[3], 'status')
  if status ~= 'done' and status ~= 'failed' and status ~= 'cancelled' then
    redis.call('SET', KEYS[2], '1', 'EX', ARGV[3])
  end
end
return left"""
)


def job_readers_key(job_id: str) -> str:
    """Sorted set of a job's live readers (member = reader id, score = expiry in unix ms)."""
    return f"{c.KEY_PREFIX}:job:{{{job_id}}}:readers"


class Readers:
    """This process's readers: join, renew in the background, leave (cancelling an abandoned job)."""

    def __init__(
        self,
        redis: aioredis.Redis,
        ttl_s: float = READER_TTL_S,
        renew_s: float = READER_RENEW_S,
        hangup_grace_s: float = HANGUP_GRACE_S,
    ) -> None:
        self._redis = redis
        self.hangup_grace_s = hangup_grace_s
        self._ttl_ms = int(ttl_s * 1000)
        self._renew_s = renew_s
        self._prefix = uuid.uuid4().hex[:12]
        self._ids = itertools.count(1)
        self._active: dict[str, str] = {}  # reader -> job id
        self._join = redis.register_script(JOIN)
        self._leave = redis.register_script(LEAVE)
        self._renewer: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._closing = asyncio.Event()  # cuts the hang-up grace short: leave now, the process is going away

    def __len__(self) -> int:
        return len(self._active)

    def new(self, job_id: str) -> str:
        """A reader id for the job, renewed from now on until it leaves (synchronous: a request cancelled right
        after still has an id to leave with)."""
        reader = f"{self._prefix}:{next(self._ids)}"
        self._active[reader] = job_id
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.create_task(self._renew_forever())
        return reader

    async def join(self, reader: str) -> None:
        if (call := self.join_call(reader)) is not None:
            script, keys, args = call
            await script(keys=keys, args=args)

    def join_call(self, reader: str) -> ScriptCall | None:
        """``join`` as a script call, to send along with other commands on the job's keys (None: left already)."""
        job_id = self._active.get(reader)
        return None if job_id is None else (self._join, [job_readers_key(job_id)], [reader, self._ttl_ms])

    async def leave(self, reader: str, *, cancel: bool) -> bool:
        """Leave the job; with ``cancel``, cancel it when no live reader is left. True when it was cancelled."""
        job_id = self._active.pop(reader, None)
        if job_id is None:
            return False
        keys = [job_readers_key(job_id), c.job_cancel_key(job_id), c.job_state_key(job_id)]
        left = int(await self._leave(keys=keys, args=[reader, "1" if cancel else "0", c.JOB_TTL_S]))
        if cancel:
            if left:
                log.info("job %s: its client went away; %d other reader(s) still want it: not cancelled", job_id, left)
            else:
                log.info("job %s cancelled: its client went away", job_id)
        return cancel and left == 0

    def leave_later(self, reader: str, *, cancel: bool, grace: bool = True) -> None:
        """``leave`` as its own task, for finally blocks (the request's task may itself be cancelled). A cancelling
        leave waits ``hangup_grace_s`` first unless ``grace`` is off (the job was given up, not hung up on)."""
        delay = self.hangup_grace_s if cancel and grace else 0.0
        task = asyncio.get_running_loop().create_task(self._leave_logged(reader, cancel, delay))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def leave_now(self, reader: str, *, cancel: bool) -> None:
        """``leave``, a Redis error logged instead of raised (as for a leave in the background)."""
        await self._leave_logged(reader, cancel, 0.0)

    async def _leave_logged(self, reader: str, cancel: bool, delay: float) -> None:
        if delay > 0:
            with contextlib.suppress(TimeoutError):  # a retry of the same id may join meanwhile
                async with asyncio.timeout(delay):
                    await self._closing.wait()
        try:
            await self.leave(reader, cancel=cancel)
        except (RedisError, OSError) as exc:  # its entry expires after READER_TTL_S; a cancel is lost
            log.warning("reader %s could not leave (cancel=%s): %s", reader, cancel, exc)

    async def _renew_forever(self) -> None:
        while self._active:
            await asyncio.sleep(self._renew_s)
            try:
                await self.renew()
            except (RedisError, OSError) as exc:  # the next round retries; the TTL leaves room for two misses
                log.warning("could not renew %d job readers: %s", len(self._active), exc)

    async def renew(self) -> None:
        if is_cluster(self._redis):  # readers of many slots; a cluster pipeline would not reload the script
            joins = [self._join(keys=[job_readers_key(j)], args=[r, self._ttl_ms]) for r, j in self._active.items()]
            await asyncio.gather(*joins)
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for reader, job_id in list(self._active.items()):
                await self._join(keys=[job_readers_key(job_id)], args=[reader, self._ttl_ms], client=pipe)
            await pipe.execute()

    async def close(self) -> None:
        """Finish the leaves in flight now (bounded), then stop renewing."""
        self._closing.set()
        if self._background:
            await asyncio.wait(self._background, timeout=2.0)
        if self._renewer is not None:
            await stop([self._renewer])
