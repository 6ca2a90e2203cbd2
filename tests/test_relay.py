"""broker_worker/relay.py's parts that need no Redis."""

from __future__ import annotations

from broker_worker.relay import Throughput


def test_throughput_is_the_last_minutes_rate_and_stays_small() -> None:
    """The health key's tokens/s: the last minute only, and ``add`` (once per published event) keeps per-second
    counts, not one stamp per event (a list of stamps popped from its front cost O(events) per event)."""
    rate = Throughput()
    for i in range(60 * 1000):  # a minute at 1,000 events/s
        rate.add(1, 1000 + i / 1000)
    assert abs(rate.rate() - 1000) < 5
    for i in range(61 * 10):  # then a minute and a second at 10 events/s: the busy minute is forgotten
        rate.add(1, 1060 + i / 10)
    assert abs(rate.rate() - 10) < 0.5
    assert len(rate._seconds) <= 61
