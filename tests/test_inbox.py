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
