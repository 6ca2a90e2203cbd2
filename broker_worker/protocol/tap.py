"""A stream's next deltas handed to a synchronous sink as the pub/sub reader receives them.

The gateway writes each relayed delta to its client from the pub/sub reader's stack, without waking the request's
task (protocol/inbox.py says why). The stream's own loop (``AsyncClient._events``) still owns everything else: the
first events, gaps, duplicates, terminal events, replay reads, timeouts; the sink is offered only the delta that
comes next in order, and that delta counts as delivered only once the sink took it. A sink that declines (say
its client does not read fast enough) leaves the delta to the loop, which yields it as usual.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from broker_worker.protocol.inbox import Direct
from broker_worker.protocol.messages import Delta, parse_event

if TYPE_CHECKING:
    from broker_worker.protocol.delivered import Delivered

#: Relays one delta now; False when it cannot (the delta then goes through the stream's iterator).
Sink = Callable[[Delta], bool]


class Tap:
    """Where a stream's consumer attaches its sink, once it is ready to write (None: everything is yielded)."""

    __slots__ = ("sink",)

    def __init__(self) -> None:
        self.sink: Sink | None = None


def next_deltas(tap: Tap, delivered: Delivered) -> Direct:
    """The inbox's direct consumer for one stream: the delta right after the last one delivered, to the sink."""

    def take(raw: str) -> bool:
        sink = tap.sink
        if sink is None:
            return False
        try:
            event = parse_event(raw)
        except ValueError:  # not an event (e.g. a resync marker) or a malformed one: the loop deals with it
            return False
        if event.type != "delta" or event.seq != delivered.last + 1 or not sink(event):
            return False
        delivered.add(event)
        return True

    return take
