"""protocol/inbox.py: a subscription's payload queue whose quiet-spell wait arms no timer per payload."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from broker_worker.protocol.inbox import Inbox


async def test_payloads_come_in_order_and_a_quiet_spell_gives_none() -> None:
    inbox = Inbox()
    assert await inbox.next(0.01) is None
    inbox.put_nowait("a")
    inbox.put_nowait("b")
    assert [await inbox.next(5), await inbox.next(5)] == ["a", "b"]
    waiting = asyncio.create_task(inbox.next(5))
    await asyncio.sleep(0)
    inbox.put_nowait("c")  # wakes the waiting reader with it
    assert await waiting == "c"
    assert await inbox.next(0.01) is None  # the timer armed for the long waits does not delay a short one
    inbox.close()


async def test_a_busy_inbox_arms_one_timer_not_one_per_payload(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()
    armed: list[Any] = []
    call_at = loop.call_at

    def counting_call_at(when: float, callback: Any, *args: Any) -> asyncio.TimerHandle:
        armed.append(when)
        return call_at(when, callback, *args)

    monkeypatch.setattr(loop, "call_at", counting_call_at)
    inbox = Inbox()
    for k in range(200):
        waiting = asyncio.create_task(inbox.next(30))
        await asyncio.sleep(0)
        inbox.put_nowait(str(k))
        assert await waiting == str(k)
    assert len(armed) == 1, f"{len(armed)} timers for 200 payloads"
    inbox.close()


async def test_a_waiting_consumer_takes_payloads_directly_and_only_then() -> None:
    taken: list[str] = []
    inbox = Inbox()
    inbox.take_directly(lambda item: item.startswith("d") and not taken.append(item))
    inbox.put_nowait("d0")  # nobody waits: queued, whatever the direct consumer would say
    assert taken == [] and inbox.qsize() == 1
    assert await inbox.next(5) == "d0"
    waiting = asyncio.create_task(inbox.next(5))
    await asyncio.sleep(0)
    inbox.put_nowait("d1")  # taken on the caller's stack: the waiting task is not woken
    inbox.put_nowait("x2")  # declined: queued, and it wakes the task
    inbox.put_nowait("d3")  # behind a queued payload: queued too, so the order holds
    assert taken == ["d1"]
    assert [await waiting, await inbox.next(5)] == ["x2", "d3"]
    inbox.close()


async def test_a_direct_consumer_that_raises_is_dropped_and_nothing_is_lost() -> None:
    def broken(item: str) -> bool:
        raise RuntimeError("bug")

    inbox = Inbox()
    inbox.take_directly(broken)
    waiting = asyncio.create_task(inbox.next(5))
    await asyncio.sleep(0)
    inbox.put_nowait("a")
    assert await waiting == "a"
    waiting = asyncio.create_task(inbox.next(5))
    await asyncio.sleep(0)
    inbox.put_nowait("b")  # the broken consumer is not asked again
    assert await waiting == "b"
    inbox.close()


async def test_payloads_taken_directly_keep_the_quiet_spell_from_ending() -> None:
    inbox = Inbox()
    inbox.take_directly(lambda item: True)
    waiting = asyncio.create_task(inbox.next(2.0))
    for _ in range(8):  # 4 s of payloads, each taken directly: never 2 s without one
        await asyncio.sleep(0.5)
        assert not waiting.done()
        inbox.put_nowait("x")
    assert await waiting is None  # 2 s after the last one
    inbox.close()
