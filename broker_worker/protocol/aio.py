"""Small asyncio helpers shared by the client-side modules."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable


async def stop(tasks: Iterable[asyncio.Task[None]], resend_s: float = 0.5) -> None:
    """Cancel the tasks and wait until they have ended. On Python 3.11 ``asyncio.wait_for`` (which redis-py
    uses around socket writes) can swallow a cancellation that lands as the write completes, so the cancel is
    sent again until each task is really done."""
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=resend_s)


async def wait_done(future: asyncio.Future[None], timeout_s: float) -> bool:
    """Whether the future completed within ``timeout_s``; unlike ``asyncio.wait_for`` on 3.11, a cancellation of
    the caller is never swallowed."""
    done, _ = await asyncio.wait({future}, timeout=timeout_s)
    return bool(done)
