"""Stop strings (OpenAI's and FastChat's ``stop``): generation ends at the first one, which is never published.

Text that may still grow into a stop string is held back until later text decides. When a stop string
appears, the text before it goes out, the engine is told to stop through the flag it already checks once per
token for cancel, and the job finishes with ``stop``. Any engine that streams through ``on_delta`` and checks
``cancel.is_set()`` gets this by running its generation through ``generate_with_stops``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from broker_worker.model.engine import Finish, OnDelta
from broker_worker.protocol.messages import Job

#: An engine's own generation, given the flag to watch and where to send text.
Generation = Callable[[threading.Event, OnDelta], Finish]


class StopFlag(threading.Event):
    """Set by a stop string, and also reads as set once the job's own cancel flag is: the engine watches one flag
    while the worker's cancel stays untouched (a stop string is a normal end, not a cancel). Only ``is_set``
    follows the cancel flag, which is all the engines call."""

    def __init__(self, cancel: threading.Event) -> None:
        super().__init__()
        self._cancel = cancel

    def is_set(self) -> bool:
        return super().is_set() or self._cancel.is_set()


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest stop string in ``text`` begins, or None."""
    found = [at for at in (text.find(s) for s in stops) if at >= 0]
    return min(found) if found else None


def partial_stop(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that begins a stop string (0 when none does)."""
    for n in range(min(len(text), max(map(len, stops)) - 1), 0, -1):
        end = text[-n:]
        if any(s.startswith(end) for s in stops):
            return n
    return 0


class StopWatch:
    """Sits between an engine and ``on_delta``: passes text on, holding back what may begin a stop string."""

    def __init__(self, stops: Sequence[str], on_delta: OnDelta, cancel: threading.Event, published: str = "") -> None:
        self._stops = tuple(stops)
        self._on_delta = on_delta
        self._keep = max(map(len, self._stops)) - 1
        # Text an earlier worker already published: a stop string may begin in it and end in new text.
        self._tail = published[-self._keep :] if self._keep else ""
        self._pending = ""
        self.flag = StopFlag(cancel)
        self.hit = False

    def feed(self, text: str) -> None:
        if self.hit:
            return  # the engine's last token(s) after the stop: never published
        self._pending += text
        window = self._tail + self._pending
        at = first_stop(window, self._stops)
        if at is not None:
            self.hit = True
            self.flag.set()
            self._emit(self._pending[: max(0, at - len(self._tail))])
            self._pending = ""
            return
        held = min(len(self._pending), partial_stop(window, self._stops))
        self._emit(self._pending[: len(self._pending) - held])

    def finish(self, finish: Finish) -> Finish:
        """After the engine returned: a stop string makes the reason ``stop``; held-back text that never became
        one is published."""
        if self.hit:
            return Finish("stop", finish.usage)
        self._emit(self._pending)
        return finish

    def _emit(self, text: str) -> None:
        self._pending = self._pending[len(text) :]
        if text:
            self._on_delta(text)
            if self._keep:
                self._tail = (self._tail + text)[-self._keep :]


def generate_with_stops(
    job: Job, answer_prefix: str, cancel: threading.Event, on_delta: OnDelta, generation: Generation
) -> Finish:
    """Run ``generation`` with the job's stop strings applied to what it streams (directly when it has none)."""
    if not job.stop:
        return generation(cancel, on_delta)
    watch = StopWatch(job.stop, on_delta, cancel, answer_prefix)
    return watch.finish(generation(watch.flag, watch.feed))
