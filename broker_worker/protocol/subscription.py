"""A reader's handle on one job channel (``Subscription``), opened and closed synchronously on a subscriber (pubsub.py
or cluster_pubsub.py), and what its queue may hold besides events (``RESYNC``)."""

from __future__ import annotations

from types import TracebackType
from typing import Protocol

from broker_worker.protocol.inbox import Inbox

RESYNC = "resync"  # a queue item that is not an event: re-read the replay record
CONFIRM_TIMEOUT_S = 2.0  # a missed confirmation is harmless (the replay covers it); waiting bounds the usual race


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
