"""The stall watch (broker_worker/stall.py): when a worker's engine counts as hung, and when it does not."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from broker_worker.relay import Running
from broker_worker.stall import StallWatch


@dataclass
class _Job:
    id: str


@dataclass
class _Run:
    job: _Job
    text_at: float | None = None


def runs(*items: _Run) -> list[Running]:
    return cast(list[Running], list(items))


def test_an_idle_engine_is_never_stalled_and_a_busy_one_gets_a_full_timeout() -> None:
    watch = StallWatch(10.0, check_every_s=60.0)  # checks this far apart are no pause
    assert watch.stalled(runs(), 1000.0) is None  # idle for ever: not stuck
    waiting = _Run(_Job("a"))
    assert watch.stalled(runs(waiting), 1000.0) is None  # the clock starts now, not at the last text
    assert watch.stalled(runs(waiting), 1010.0) is None
    assert watch.stalled(runs(waiting), 1010.5) == "none of its 1 running job(s) made any text for 10s"


def test_text_or_an_ended_run_is_progress() -> None:
    watch = StallWatch(10.0, check_every_s=60.0)
    a, b = _Run(_Job("a")), _Run(_Job("b"))
    assert watch.stalled(runs(a, b), 0.0) is None
    watch.last_progress = 9.0  # b made text (a waits its turn in a batching engine: no text yet)
    b.text_at = 9.0
    assert watch.stalled(runs(a, b), 18.0) is None
    watch.last_progress = 18.0  # a run ended
    assert watch.stalled(runs(a, b), 19.5) == "job b made no text for 10s after its first"


def test_a_timeout_of_zero_turns_the_watch_off() -> None:
    watch = StallWatch(0.0)
    stuck: Any = _Run(_Job("a"), text_at=0.0)
    assert watch.stalled(runs(stuck), 0.0) is None
    assert watch.stalled(runs(stuck), 10**6) is None


def test_a_paused_process_is_not_a_stalled_engine() -> None:
    """SIGSTOP or swap froze the whole worker (its checks stopped too): nobody made anything, and that is no hang."""
    watch = StallWatch(10.0, check_every_s=3.0)
    run = _Run(_Job("a"), text_at=0.0)
    watch.last_progress = 0.0
    assert watch.stalled(runs(run), 3.0) is None
    assert watch.stalled(runs(run), 600.0) is None  # the first check after the pause: a fresh timeout
    assert watch.stalled(runs(run), 609.0) is None
    assert watch.stalled(runs(run), 611.0) == "none of its 1 running job(s) made any text for 608s"
