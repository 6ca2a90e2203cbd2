"""One sharded pub/sub connection shared by every stream of a process (one per node on a Redis Cluster), with
race-free bookkeeping. Job channels are shard channels (SSUBSCRIBE, Redis >= 7.0): on a cluster a job's events
touch only the node owning its slot, where a plain PUBLISH would be broadcast to every node.

Readers open and close subscriptions synchronously (no await), so a request cancelled at any point (a client that
hangs up right after sending) can never leave a subscription behind. One task brings Redis in line with what is
wanted: SSUBSCRIBE what is wanted and not yet sent, SUNSUBSCRIBE what was sent and is no longer wanted, batched.
Another task reads. A channel is *live* once Redis answered every command sent for it on the current connection
and the last one was SSUBSCRIBE.

After any reconnect (an error, or a connection silent past a PING) nothing is subscribed on the new connection:
every wanted channel is subscribed again, retrying with backoff until Redis takes it, and each of its readers
gets ``RESYNC`` once the channel is live again, to re-read the replay (events published while the connection was
down were not delivered).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from types import TracebackType
from typing import Any, Protocol

import hiredis
import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from broker_worker.protocol.aio import stop, wait_done
from broker_worker.protocol.inbox import Inbox

log = logging.getLogger("broker_worker.protocol.pubsub")

RESYNC = "resync"  # a queue item that is not an event: re-read the replay record
CONFIRM_TIMEOUT_S = 2.0  # a missed confirmation is harmless (the replay covers it); waiting bounds the usual race
READ_POLL_S = 1.0
PING_AFTER_S = 15.0  # a connection silent this long is probed with PING …
DEAD_AFTER_S = 30.0  # … and replaced when still silent this long
BATCH = 500  # channels per SSUBSCRIBE / SUNSUBSCRIBE command (one node; on a cluster, channels of one node)
MAX_BACKOFF_S = 2.0
READ_BYTES = 1 << 16


class _Registry(Protocol):
    def remove(self, subscription: Subscription) -> None: ...

    async def wait_live(self, channel: str, timeout_s: float) -> bool: ...


class Subscription:
    """One reader's queue on one channel. ``close()`` (or leaving the ``with`` block) unregisters it at once."""

    def __init__(self, subscriber: _Registry, channel: str) -> None:
        self.channel = channel
        self.queue = Inbox()
        self._subscriber = subscriber
        self._closed = False

    async def confirmed(self, timeout_s: float = CONFIRM_TIMEOUT_S) -> bool:
        """Wait until Redis confirmed the channel; False after ``timeout_s``."""
        return await self._subscriber.wait_live(self.channel, timeout_s)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._subscriber.remove(self)
            self.queue.close()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


def drop_reader(wanted: dict[str, set[Inbox]], subscription: Subscription) -> bool:
    """Take the subscription's inbox off its channel; True when that left the channel without readers (it is then
    no longer wanted)."""
    queues = wanted.get(subscription.channel)
    if queues is None:
        return False
    queues.discard(subscription.queue)
    if queues:
        return False
    del wanted[subscription.channel]
    return True


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
                await self._read(conn)
            except (RedisError, OSError) as exc:
                log.warning("pub/sub connection lost (%s); re-subscribing %d channels", exc, len(self._wanted))
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

    async def _read(self, conn: Any) -> None:
        stream = getattr(conn, "_reader", None)
        if isinstance(stream, asyncio.StreamReader):
            await self._read_raw(conn, stream)
        else:  # pragma: no cover - a connection class without the asyncio stream redis-py uses today
            await self._read_replies(conn)

    async def _read_raw(self, conn: Any, stream: asyncio.StreamReader) -> None:
        """Every reply on the connection, parsed straight from its socket: each read (many messages when busy)
        is fed to one hiredis reader and every complete reply handled at once. redis-py's ``read_response``
        costs a timeout context, several calls and a debug log string per message, which was most of the
        gateway's pub/sub share per event. Only this task reads the connection (the writer only writes), and
        redis-py has read nothing past the connection's handshake, so nothing is lost or read twice."""
        reader = hiredis.Reader(encoding=conn.encoder.encoding, errors=conn.encoder.encoding_errors)
        loop = asyncio.get_running_loop()
        heard, pinged = loop.time(), False
        while True:
            reply = reader.gets()
            while reply is not False:
                if isinstance(reply, Exception):
                    raise ResponseError(str(reply))
                self._handle(reply)
                reply = reader.gets()
            data = None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(READ_POLL_S):
                    data = await stream.read(READ_BYTES)
            if data == b"":
                raise OSError("pub/sub connection closed by Redis")
            now = loop.time()
            if data is not None:
                reader.feed(data)
                heard, pinged = now, False
            elif now - heard > DEAD_AFTER_S:
                raise OSError(f"pub/sub connection silent for {DEAD_AFTER_S:.0f}s")
            elif now - heard > PING_AFTER_S and not pinged:
                await conn.send_command("PING", check_health=False)
                pinged = True

    async def _read_replies(self, conn: Any) -> None:
        loop = asyncio.get_running_loop()
        heard, pinged = loop.time(), False
        while True:
            # push_request: hiredis hands pub/sub replies over as push notifications, which are skipped otherwise
            reply = await conn.read_response(timeout=READ_POLL_S, push_request=True)
            now = loop.time()
            if reply is not None:
                heard, pinged = now, False
                self._handle(reply)
            elif now - heard > DEAD_AFTER_S:
                raise OSError(f"pub/sub connection silent for {DEAD_AFTER_S:.0f}s")
            elif now - heard > PING_AFTER_S and not pinged:
                await conn.send_command("PING", check_health=False)
                pinged = True

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
