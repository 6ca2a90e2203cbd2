"""A worker's events, many jobs' at once, published in one call of ``lua/publish.lua`` per round trip.

A worker runs hundreds of jobs, each publishing an event per token. Sent one command per job on connections of
their own, every event cost Redis a socket read and write and the script's fixed cost, more than the script's
work itself (bench/capacity.py's Redis CPU per event). Here the events published while a call is in flight go
together in the next call, so a quiet worker waits no longer than before (one event, one round trip) and a busy
one sends one call per round trip. A busy worker also waits, at most ``window_s`` after its last call began,
before the next one: its jobs' tokens come spread out in time (each job's engine has its own pace), and Redis'
cost per event falls from ~34 µs (one per call) to ~9 µs (ten per call) on this repository's box. The first
event after a quiet spell never waits: the wait only paces a worker already sending more than one call per
window. The script applies each event on its own (fencing, expected seq, cancel), and
each caller gets its own result; a lost connection fails every event of its call, and their callers retry as
they would have after a call of their own (the expected seq makes a repeated event a no-op).
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import ResponseError

from broker_worker.protocol.script_pipeline import evalsha_pipeline

#: One event: its job's three keys and [token, event body, expected seq] (lua/publish.lua's per-event arguments).
Pending = tuple[list[str], list[str | int], "asyncio.Future[int]"]


class PublishBatcher:
    def __init__(
        self, redis: aioredis.Redis, script: AsyncScript, common: list[str | int], window_s: float = 0.0
    ) -> None:
        self._redis = redis
        self._script = script
        self._common = common  # the script's leading arguments: replay max length, TTL
        self._window_s = window_s
        self._last_call = -window_s  # loop time the last call began
        self._pending: list[Pending] = []
        self._sender: asyncio.Task[None] | None = None

    async def publish(self, keys: list[str], args: list[str | int]) -> int:
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending.append((keys, args, future))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send_all())
        return await future

    async def _send_all(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            if (wait := self._last_call + self._window_s - loop.time()) > 0:
                await asyncio.sleep(wait)
            self._last_call = loop.time()
            batch, self._pending = self._pending, []
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
            return list(await self._script(keys=keys, args=args))
        except ResponseError:
            if len(batch) == 1:
                raise
        # A script error (one job's key of the wrong type?) must fail that event only: each alone, pipelined.
        calls = [(self._script, event_keys, [*self._common, *event_args]) for event_keys, event_args, _ in batch]
        results = await evalsha_pipeline(self._redis, calls)
        return [result[0] if isinstance(result, list) else result for result in results]
