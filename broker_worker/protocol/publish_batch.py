"""A worker's events, many jobs' at once, published in one call of ``lua/publish.lua`` per round trip.

A worker runs hundreds of jobs, each publishing an event per token. Sent one command per job on connections of
their own, every event cost Redis a socket read and write and the script's fixed cost, more than the script's
work itself (bench/capacity.py's Redis CPU per event). Here the events published while a call is in flight go
together in the next call, so a quiet worker waits no longer than before (one event, one round trip) and a busy
one sends one call per round trip. A busy worker also waits, at most ``window_s`` after its last call began,
before the next one: its jobs' tokens come spread out in time (each job's engine has its own pace), and Redis'
cost per event falls from ~34 µs (one per call) to ~9 µs (ten per call) on this repository's box. With
``target`` (events per call) the wait adapts to the worker's event rate: it lasts what ``target`` events take at
that rate, at most ``window_s``; so a busy worker's calls carry about ``target`` events, and one with few
events per second waits ``window_s``, not more. The first event after a quiet spell never waits: the wait only
paces a worker already sending more than one call per window. The script applies each event on its own
(fencing, expected seq, cancel), and
each caller gets its own result; a lost connection fails every event of its call, and their callers retry as
they would have after a call of their own (the expected seq makes a repeated event a no-op).

A ``Collector`` (the worker's broker_worker/handoff.py) is told when a call is due soon: from the moment a call
begins until the next one is gathered, events need not wake the loop one by one; the batcher collects them all
just before it gathers its next call.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from broker_worker.protocol.script_pipeline import evalsha_pipeline

#: One event: its job's three keys and [token, event body, expected seq] (lua/publish.lua's per-event arguments).
Pending = tuple[list[str], list[str | int], "asyncio.Future[int]"]


class Collector(Protocol):
    def hold(self) -> None:
        """A call is due soon: what its events come from may wait for ``collect`` instead of waking the loop."""

    def collect(self) -> None:
        """Deliver what waited, now: the events it makes are published (in this loop iteration's callbacks)."""

    def written(self) -> None:
        """A call was written to Redis, or the batcher went idle with none to write."""


class PublishBatcher:
    def __init__(
        self,
        redis: aioredis.Redis,
        script: AsyncScript,
        common: list[str | int],
        window_s: float = 0.0,
        collector: Collector | None = None,
        target: int = 0,
    ) -> None:
        self._redis = redis
        self._collector = collector
        self._script = script
        self._common = common  # the script's leading arguments: replay max length, TTL
        self._window_s = window_s
        self._target = target
        self._rate = 0.0  # events per second while busy (a moving average over calls); 0: not known yet
        self._last_call = -window_s  # loop time the last call began
        self._pending: list[Pending] = []
        self._sender: asyncio.Task[None] | None = None
        #: Resolved to end the window early: an urgent event (a run's first delta) is pending.
        self._hurry: asyncio.Future[None] | None = None
        self._urgent = False  # an urgent event waits for the next call: it waits out no window
        #: This batcher's own connection, kept between calls (one call at a time): redis-py's pool takes locks,
        #: a readiness check and observability hooks on every get and release (~10 % of a busy worker's loop).
        self._conn: Any = None

    def submit(self, keys: list[str], args: list[str | int], urgent: bool = False) -> asyncio.Future[int]:
        """One event's result (its seq, or a refusal) as a future: to await, or to take in a done callback (no
        task step). An ``urgent`` event (a run's first delta: its client waits for its first token) ends the
        window now: it goes in the next call with whatever else is pending."""
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending.append((keys, args, future))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send_all())
            if self._collector is not None:
                self._collector.hold()  # the new sender collects before its call
        elif urgent:
            self._urgent = True
            if self._hurry is not None and not self._hurry.done():
                self._hurry.set_result(None)
            if self._collector is not None:
                self._collector.hold()
        return future

    async def _send_all(self) -> None:
        while True:
            try:
                while await self._gather():
                    await self._send(self._pending)
            finally:
                if self._collector is not None:  # never leave events waiting for a call that will not come
                    self._collector.collect()
                    self._collector.written()
            # That collect may have submitted events while this task was still running (so ``submit`` started
            # no sender): they go with this one. Once it returns, with no await in between, ``submit`` starts one.
            if not self._pending:
                return

    async def _gather(self) -> bool:
        """Wait out the window (a busy worker), collect what waited for this call; whether there is any."""
        loop = asyncio.get_running_loop()
        if (wait := self._last_call + self.window_s - loop.time()) > 0 and not self._urgent:
            await self._wait_window(wait)
        if self._collector is not None:
            self._collector.collect()
            await asyncio.sleep(0)  # the callbacks it scheduled run first: their events join this call
        return bool(self._pending)

    async def _wait_window(self, wait: float) -> None:
        """Sleep ``wait`` seconds, less when an urgent event comes meanwhile."""
        hurry = self._hurry = asyncio.get_running_loop().create_future()
        timer = asyncio.get_running_loop().call_later(wait, _resolve, hurry)
        try:
            await hurry
        finally:
            timer.cancel()
            self._hurry = None

    @property
    def window_s(self) -> float:
        """How long after a call began a busy worker waits before the next one."""
        if self._target and self._rate > 0:
            return min(self._window_s, self._target / self._rate)
        return self._window_s

    def _measure(self, events: int, now: float) -> None:
        """The event rate, from calls that follow each other within twice the longest window (a busy worker)."""
        span = now - self._last_call
        if 0 < span <= 2 * self._window_s:
            rate = events / span
            self._rate = rate if self._rate == 0 else 0.75 * self._rate + 0.25 * rate

    async def _send(self, batch: list[Pending]) -> None:
        now = asyncio.get_running_loop().time()
        self._measure(len(batch), now)
        self._last_call = now
        self._pending, self._urgent = [], False
        if self._collector is not None:
            self._collector.hold()  # until the next _gather()
        try:
            results = await self._call(batch)
        except asyncio.CancelledError:
            for _, _, future in batch:
                future.cancel()
            raise
        except Exception as exc:  # e.g. the connection failed: every event of the call failed with it
            results = [exc] * len(batch)
        for (_, _, future), result in zip(batch, results, strict=True):
            if future.done():  # its caller was cancelled meanwhile
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(int(result))

    async def _call(self, batch: list[Pending]) -> list[Any]:
        keys = [key for event_keys, _, _ in batch for key in event_keys]
        args = [*self._common, *(arg for _, event_args, _ in batch for arg in event_args)]
        try:
            return list(await self._evalsha(keys, args))
        except ResponseError:
            if len(batch) == 1:
                raise
        # A script error (one job's key of the wrong type?) must fail that event only: each alone, pipelined.
        calls = [(self._script, event_keys, [*self._common, *event_args]) for event_keys, event_args, _ in batch]
        results = await evalsha_pipeline(self._redis, calls)
        return [result[0] if isinstance(result, list) else result for result in results]

    async def _evalsha(self, keys: list[str], args: list[str | int]) -> Any:
        """The script's call, packed here: redis-py's ``pack_command`` copies its growing buffer once per argument
        (six per event), ~6 µs per event at 20 events a call. A script Redis lost (a restart) is loaded again.
        The connection is kept between calls; one that Redis (its ``timeout``) or a proxy closed while the worker
        was quiet fails at once, and the call goes again at once on a new one (not after the relay's backoff:
        that was the next first token's delay). Resending is safe: the script applies each event once."""
        kept = self._conn is not None
        try:
            return await self._evalsha_once(keys, args)
        except RedisConnectionError:
            if not kept:
                raise
            return await self._evalsha_once(keys, args)

    async def _evalsha_once(self, keys: list[str], args: list[str | int]) -> Any:
        if self._conn is None:
            self._conn = await self._redis.connection_pool.get_connection()  # type: ignore[no-untyped-call]
        conn = self._conn
        try:
            for attempt in range(2):
                command: list[str | int] = ["EVALSHA", self._script.sha, len(keys), *keys, *args]
                await conn.send_packed_command(_resp(command, conn.encoder.encoding, conn.encoder.encoding_errors))
                if self._collector is not None:
                    self._collector.written()
                try:
                    return await conn.read_response()
                except NoScriptError:
                    if attempt:
                        raise
                    self._script.sha = await self._redis.script_load(self._script.script)
        except ResponseError:
            raise  # the reply was read whole: the connection is fine
        except BaseException:
            self._conn = None  # a reply may still be on its way: never reuse the connection
            await conn.disconnect(nowait=True)
            await self._redis.connection_pool.release(conn)
            raise


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _resp(parts: list[str | int], encoding: str, errors: str) -> bytes:
    """One command in the Redis protocol, joined once."""
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        data = b"%d" % part if isinstance(part, int) else part.encode(encoding, errors)
        out += (b"$%d\r\n" % len(data), data, b"\r\n")
    return b"".join(out)
