"""Engine threads' text to the event loop, one wake-up for many tokens.

Each running job's engine calls ``on_delta`` on a thread of its own, once per token. Waking the event loop for each
(``call_soon_threadsafe``: a write to the loop's wake-up pipe, one loop iteration, one callback) was a large share
of a busy worker's CPU per token. Here the text of every job of the worker goes to one queue, and the loop is
woken only when nobody is about to read that queue anyway: while the publisher (protocol/publish_batch.py) has a
call in flight or waits for its window, it ``hold``s the queue, and it ``collect``s it just before it gathers its
next call. Tokens that come meanwhile reach Redis in that call, as they would have with a wake-up each. A quiet
worker's first token wakes the loop at once, as before.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from broker_worker.model.engine import OnDelta


class Handoff:
    def __init__(self) -> None:
        self._items: deque[tuple[Callable[[str], None], str]] = deque()
        #: A collect() is scheduled or promised (``hold``): a new item need not wake the loop.
        self._due = False

    def feeder(self, sink: Callable[[str], None]) -> OnDelta:
        """An ``on_delta`` for an engine thread: each text reaches ``sink`` on the running loop, in order."""
        loop = asyncio.get_running_loop()
        items = self._items

        def feed(text: str) -> None:  # on the engine's thread
            items.append((sink, text))
            # After the append: a collect() that cleared the flag before this read takes this item too.
            if not self._due:
                self._due = True
                loop.call_soon_threadsafe(self.collect)

        return feed

    def hold(self) -> None:
        """The caller will ``collect()`` soon (on the loop): until then, text waits for it, not waking the loop."""
        self._due = True

    def collect(self) -> None:
        """Hand every queued text to its sink, now (on the loop)."""
        self._due = False  # before the reads: see feed()
        items = self._items
        while items:
            sink, text = items.popleft()
            sink(text)
