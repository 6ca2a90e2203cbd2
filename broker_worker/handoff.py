"""Engine threads' text to the event loop, one wake-up for many tokens.

Each running job's engine calls ``on_delta`` on a thread of its own, once per token. Waking the event loop for each
(``call_soon_threadsafe``: a write to the loop's wake-up pipe, one loop iteration, one callback) was a large share
of a busy worker's CPU per token. Here the text of every job of the worker goes to one queue, and the loop is
woken only when nobody is about to read that queue anyway: while the publisher (protocol/publish_batch.py) has a
call in flight or waits for its window, it ``hold``s the queue, and it ``collect``s it just before it gathers its
next call. Tokens that come meanwhile reach Redis in that call, as they would have with a wake-up each. A quiet
worker's first token wakes the loop at once, as before, and so does each job's first text on a busy worker (its
client waits for its first token; the publisher then ends its window early: ``urgent``).

The engine thread that wakes the loop then waits, at most ``yield_s``, until the call carrying its text has been
written (or the text turned out to need no call now): its engine holds the GIL while it computes, and every step
of the loop's (the wake-up, the publisher's task steps, the socket write) would otherwise wait for a forced GIL
switch, 0.2-0.7 ms each on this repository's box (the interpreter's switch interval; measured: 2-4 ms before a
first token left the worker). The engine gives up ~0.1 ms per wake-up, and a busy worker has none (its loop
collects without being woken).
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable

from broker_worker.model.engine import OnDelta

#: How long an engine thread that woke the loop waits for the call carrying its text (never longer: the loop may
#: be busy with other work).
YIELD_S = 0.002


class Handoff:
    def __init__(self, yield_s: float = YIELD_S) -> None:
        self._items: deque[tuple[Callable[[str], None], str]] = deque()
        #: A collect() is scheduled or promised (``hold``): a new item need not wake the loop.
        self._due = False
        self._yield_s = yield_s
        #: Engine threads waiting for the call their text goes in (``written``).
        self._waiting: list[threading.Event] = []

    def feeder(self, sink: Callable[[str], None]) -> OnDelta:
        """An ``on_delta`` for an engine thread: each text reaches ``sink`` on the running loop, in order."""
        loop = asyncio.get_running_loop()
        items = self._items
        first = True

        def feed(text: str) -> None:  # on the engine's thread
            nonlocal first
            items.append((sink, text))
            # After the append: a collect() that cleared the flag before this read takes this item too. A job's
            # first text never waits for the next call of a busy worker: its client waits for its first token.
            if first or not self._due:
                quiet, first = not self._due, False
                self._due = True
                written = threading.Event()
                loop.call_soon_threadsafe(self._wake, written)
                if quiet:  # a busy loop gets the GIL as it always does: the engine need not stall for it
                    written.wait(self._yield_s)  # the GIL is the loop's meanwhile

        return feed

    def hold(self) -> None:
        """The caller will ``collect()`` soon (on the loop): until then, text waits for it, not waking the loop."""
        self._due = True

    def written(self) -> None:
        """A call went out (or the caller has none to make): engine threads waiting for it go on."""
        for event in self._waiting:
            event.set()
        self._waiting.clear()

    def _wake(self, written: threading.Event) -> None:
        self.collect()
        if self._due:  # the text made a call due (``hold``): its engine thread waits until it is written
            self._waiting.append(written)
        else:  # e.g. a job that coalesces its deltas keeps the text for later
            written.set()

    def collect(self) -> None:
        """Hand every queued text to its sink, now (on the loop)."""
        self._due = False  # before the reads: see feed()
        items = self._items
        while items:
            sink, text = items.popleft()
            sink(text)
