"""One sharded pub/sub connection shared by every stream of a process (one per node on a Redis Cluster), with
race-free bookkeeping. Job channels are shard channels (SSUBSCRIBE, Redis >= 7.0): on a cluster a job's events
touch only the node owning its slot, where a plain PUBLISH would be broadcast to every node.

Readers open and close subscriptions synchronously (no await), so a request cancelled at any point (a client that
hangs up right after sending) can never leave a subscription behind. One task brings Redis in line with what is
wanted: SSUBSCRIBE what is wanted and not yet sent, SUNSUBSCRIBE what was sent and is no longer wanted, batched.
Another task reads (pubsub_replies.py). A channel is *live* once Redis answered every command sent for it on the
current connection and the last one was SSUBSCRIBE.

After any reconnect (an error, or a connection silent past a PING) nothing is subscribed on the new connection:
every wanted channel is subscribed again, retrying with backoff until Redis takes it, and each of its readers
gets ``RESYNC`` once the channel is live again, to re-read the replay (events published while the connection was
down were not delivered).

A reader's handle, ``Subscription``, is in subscription.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from broker_worker.protocol.aio import stop, wait_done
from broker_worker.protocol.inbox import Inbox
from broker_worker.protocol.pubsub_replies import read_replies
from broker_worker.protocol.subscription import RESYNC, Subscription, drop_reader

log = logging.getLogger("broker_worker.protocol.pubsub")

BATCH = 500  # channels per SSUBSCRIBE / SUNSUBSCRIBE command (one node; on a cluster, channels of one node)
MAX_BACKOFF_S = 2.0


class Subscriber:
    def __init__(self, redis: aioredis.Redis | None) -> None:
        self._pool = redis.connection_pool if redis is not None else None
        self._wanted: dict[str, set[Inbox]] = {}
        self._sent: set[str] = set()  # channels whose last command on this connection was SUBSCRIBE
        self._inflight: dict[str, int] = {}  # commands sent on this connection and not answered yet
        self._live: set[str] = set()
        self._resync: set[str] = set()  # wanted when the connection was replaced: tell readers once live
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        self._conn: Any = None
        self._connected = asyncio.Event()
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        #: Connections made after the first one (a test can tell that a fault really hit).
        self.reconnects = 0

    @property
    def channels(self) -> int:
        """Channels some reader of this process wants (what /metrics reports)."""
        return len(self._wanted)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def settled(self) -> bool:
        """Redis has answered every command and subscribes exactly the wanted channels (as far as it said)."""
        return not self._inflight and self._sent == set(self._wanted) and self._live == self._sent

    def open(self, channel: str) -> Subscription:
        subscription = Subscription(self, channel)
        self._wanted.setdefault(channel, set()).add(subscription.queue)
        self._changed.set()
        self._start()
        return subscription

    def remove(self, subscription: Subscription) -> None:
        if drop_reader(self._wanted, subscription):
            self._resync.discard(subscription.channel)
            self._changed.set()

    async def wait_live(self, channel: str, timeout_s: float) -> bool:
        if channel in self._live:
            return True
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(channel, set()).add(waiter)
        try:
            return await wait_done(waiter, timeout_s)
        finally:
            waiters = self._waiters.get(channel, set())
            waiters.discard(waiter)
            if not waiters:
                self._waiters.pop(channel, None)

    def _start(self) -> None:
        if not self._tasks:
            self._tasks = [asyncio.create_task(self._read_forever()), asyncio.create_task(self._write_forever())]

    # The writer: Redis in line with _wanted.

    async def _write_forever(self) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            await self._connected.wait()
            conn = self._conn
            try:
                await self._sync(conn)
            except (RedisError, OSError) as exc:
                log.warning("pub/sub: SSUBSCRIBE/SUNSUBSCRIBE failed (%s); reconnecting", exc)
                await self._drop(conn)

    async def _sync(self, conn: Any) -> None:
        adds = [channel for channel in self._wanted if channel not in self._sent]
        drops = [channel for channel in self._sent if channel not in self._wanted]
        for command, channels in (("SSUBSCRIBE", adds), ("SUNSUBSCRIBE", drops)):
            for batch in self._batches(channels):
                if not conn.is_connected:  # never let send_command reconnect silently: the reader owns that
                    raise OSError("pub/sub connection closed")
                self._note_sent(command, batch)
                try:
                    await conn.send_command(command, *batch, check_health=False)
                except (AttributeError, RuntimeError) as exc:  # closed under the write (no writer; uvloop)
                    raise OSError(f"pub/sub connection closed: {exc}") from exc

    def _batches(self, channels: list[str]) -> Iterator[list[str]]:
        for start in range(0, len(channels), BATCH):
            yield channels[start : start + BATCH]

    def _note_sent(self, command: str, channels: list[str]) -> None:
        for channel in channels:
            self._inflight[channel] = self._inflight.get(channel, 0) + 1
            self._live.discard(channel)
            if command == "SSUBSCRIBE":
                self._sent.add(channel)
            else:
                self._sent.discard(channel)

    # The reader: replies, messages, and the connection's life.

    async def _read_forever(self) -> None:
        backoff = 0.1
        while True:
            try:
                conn = await self._connect()
                backoff = 0.1
                await read_replies(conn, self._handle)
            except (RedisError, OSError) as exc:
                if self._wanted:
                    log.warning("pub/sub connection lost (%s); re-subscribing %d channels", exc, len(self._wanted))
                else:  # an idle connection that Redis (its `timeout`) or a proxy closed: no stream was affected
                    log.info("idle pub/sub connection closed (%s); reconnecting", exc)
            except Exception:  # a bug here must not end every stream's live delivery for good
                log.exception("pub/sub reader failed; reconnecting")
            await self._drop(self._conn)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_S)
            await self._before_reconnect()
            while not self._wanted:  # every channel moved to another node: nothing to connect for  # noqa: ASYNC110
                await asyncio.sleep(MAX_BACKOFF_S)

    async def _before_reconnect(self) -> None:
        """A hook for the cluster: move channels whose slot another node now serves."""

    async def _new_connection(self) -> Any:
        assert self._pool is not None
        return await self._pool.get_connection()  # type: ignore[no-untyped-call]

    async def _connect(self) -> Any:
        if self._conn is None:
            self._conn = await self._new_connection()
        else:
            await self._conn.connect()
            self.reconnects += 1
            self._resync |= set(self._wanted)
        # A fresh connection has no subscriptions: everything wanted is sent again by the writer.
        self._sent.clear()
        self._inflight.clear()
        self._live.clear()
        self._connected.set()
        self._changed.set()
        return self._conn

    def _handle(self, reply: Any) -> None:
        if not isinstance(reply, list) or len(reply) < 2:
            return
        kind, channel = reply[0], reply[1]
        if kind == "smessage":
            for queue in self._wanted.get(channel, ()):
                queue.put_nowait(reply[2])
        elif kind == "sunsubscribe" and not self._inflight.get(channel) and channel in self._sent:
            # Unasked: the slot moved to another node (resharding, or this node became a replica). Reconnect,
            # which finds the channel's node again and has its readers re-read the replay.
            raise OSError(f"Redis dropped shard channel {channel} (its slot moved)")
        elif kind in ("ssubscribe", "sunsubscribe"):
            self._answered(channel)

    def _answered(self, channel: str) -> None:
        left = self._inflight.get(channel, 0) - 1
        if left > 0:
            self._inflight[channel] = left
            return
        self._inflight.pop(channel, None)
        if channel not in self._sent:
            return
        self._live.add(channel)
        for waiter in self._waiters.pop(channel, set()):
            if not waiter.done():
                waiter.set_result(None)
        if channel in self._resync:
            self._resync.discard(channel)
            for queue in self._wanted.get(channel, ()):
                queue.put_nowait(RESYNC)

    async def _drop(self, conn: Any) -> None:
        """Stop using the connection; the reader reconnects it (and the writer waits for that)."""
        self._connected.clear()
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.disconnect(nowait=True)

    async def close(self) -> None:
        tasks, self._tasks = self._tasks, []
        await stop(tasks)
        if self._conn is not None:
            await self._drop(self._conn)
            if self._pool is not None:
                with contextlib.suppress(Exception):
                    await self._pool.release(self._conn)
            self._conn = None
