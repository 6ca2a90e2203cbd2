"""A subscription's queue of raw pub/sub payloads, with a cheap "nothing for a while" wait.

Every relayed event passes through one of these, so the wait is built for that: ``next(quiet_s)`` arms no timer
per event (``asyncio.timeout`` around each get cancelled and re-created a timer every time, a measurable share of
the gateway's CPU per event, bench/capacity.py). One timer per inbox is armed lazily; when it fires early (events
came meanwhile) it re-arms itself for the current deadline, so a busy stream costs about one timer per
``quiet_s``, not one per event.

A consumer may also take payloads *directly* (``take_directly``): while its task waits with nothing queued, a
payload is first offered to a synchronous function on the pub/sub reader's own stack, which relays it at once;
only what it declines is queued and wakes the task. That saves each relayed event a task wake-up and the
generator layers above it (bench/capacity.py: about a sixth of the gateway's CPU per event). Order is kept: a
payload is offered only while the queue is empty and the task is idle, never while it is busy with an earlier one.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable

log = logging.getLogger("broker_worker.protocol.inbox")

#: Takes a payload synchronously; False leaves it to the queue (the consumer's task handles it).
Direct = Callable[[str], bool]


class Inbox:
    """FIFO of payloads (``str``) for one reader; one consumer task at a time."""

    __slots__ = ("_deadline", "_direct", "_items", "_quiet_s", "_timer", "_waiter")

    def __init__(self) -> None:
        self._items: deque[str] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0
        self._quiet_s = 0.0
        self._direct: Direct | None = None

    def take_directly(self, direct: Direct | None) -> None:
        """Offer payloads to ``direct`` first while the consumer waits with nothing queued (None: stop)."""
        self._direct = direct

    def put_nowait(self, item: str) -> None:
        waiter = self._waiter
        idle = waiter is not None and not waiter.done()  # the task waits and will not run before this returns
        if idle and self._direct is not None and not self._items and self._offer(item):
            return
        self._items.append(item)
        if idle and waiter is not None:
            waiter.set_result(None)

    def empty(self) -> bool:
        return not self._items

    def qsize(self) -> int:
        return len(self._items)

    def get_nowait(self) -> str:
        if not self._items:
            raise asyncio.QueueEmpty
        return self._items.popleft()

    async def get(self) -> str:
        """The next payload, however long it takes."""
        while not self._items:
            await self._wait()
        return self._items.popleft()

    async def next(self, quiet_s: float) -> str | None:
        """The next payload, or None when none came for ``quiet_s``."""
        if self._items:
            return self._items.popleft()
        loop = asyncio.get_running_loop()
        self._quiet_s = quiet_s
        self._deadline = loop.time() + quiet_s
        if self._timer is not None and self._timer.when() > self._deadline:  # a shorter wait than the last one
            self._timer.cancel()
            self._timer = None
        if self._timer is None:
            self._timer = loop.call_at(self._deadline, self._expire)
        await self._wait()
        return self._items.popleft() if self._items else None

    async def _wait(self) -> None:
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def _offer(self, item: str) -> bool:
        assert self._direct is not None
        try:
            taken = self._direct(item)
        except Exception:  # a bug there must not break the pub/sub reader: this inbox goes back to queueing
            log.exception("direct relay failed; queueing from now on")
            self._direct = None
            return False
        if taken:  # an event came: the quiet spell starts again
            self._deadline = asyncio.get_running_loop().time() + self._quiet_s
        return taken

    def _expire(self) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return  # nobody waits: the next ``next`` arms a timer again
        loop = asyncio.get_running_loop()
        if loop.time() >= self._deadline:
            waiter.set_result(None)
        else:  # events came since this timer was armed: wait for the current deadline
            self._timer = loop.call_at(self._deadline, self._expire)

    def close(self) -> None:
        """Drop the timer (the stream ended)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
