"""The streamed responses: a job's events, framed by a wire format (FastChat's or OpenAI's), to the client.

Most of a stream is deltas, and each used to wake the request's task and climb several generator layers before
its bytes reached the socket. Once a stream's first delta has gone the ordinary way (through the service's
metrics), ``RelayResponse`` attaches a sink to the stream's ``Tap``: the deltas that arrive next in order are
framed and handed to the server's ``send`` on the pub/sub reader's own stack (protocol/inbox.py, protocol/tap.py;
bench/capacity.py measured about a sixth of the gateway's CPU per event saved). Everything else (the first
events, gaps, replays, the last event, errors) still comes through the stream's iterator, in order.

The server's ``send`` is a coroutine that suspends only when the client reads too slowly (flow control). A direct
send that suspends is finished by a task of its own, and every later chunk waits for it, so the order stays.
Starlette wraps ``send`` twice (its error and exception middlewares) only to note whether a response started;
body chunks use the server's own ``send``, which ``GatewayApp`` keeps in the scope (a test transport gets the
wrapped one, and no direct path).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from typing import Any, Protocol, cast

from fastapi import FastAPI
from redis.exceptions import RedisError
from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from broker_worker.protocol.errors import JobError, redis_failure
from broker_worker.protocol.messages import Delta, Event
from broker_worker.protocol.tap import Tap

RAW_SEND = "ivl.server_send"


class Frames(Protocol):
    """A wire format: the bytes for each event of one job's stream (b"" for one it does not show)."""

    def opening(self) -> bytes: ...

    def delta(self, event: Delta) -> bytes: ...

    def event(self, event: Event) -> bytes: ...

    def failure(self, code: int, message: str) -> bytes: ...

    def closing(self) -> bytes: ...


class GatewayApp(FastAPI):
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope[RAW_SEND] = send
        await super().__call__(scope, receive, send)


async def frame_chunks(
    events: AsyncIterator[Event], frames: Frames, after_delta: Callable[[], None] = lambda: None
) -> AsyncIterator[bytes]:
    """The stream's events as ``frames`` bytes; an error ends the stream with the format's error frame."""
    yield frames.opening()
    try:
        async for event in events:
            yield frames.event(event)
            if event.type == "delta":
                after_delta()
    except JobError as exc:
        yield frames.failure(exc.code, exc.message)
    except (RedisError, OSError) as exc:
        failure = redis_failure(exc)
        yield frames.failure(failure.code, failure.message)
    yield frames.closing()


class RelayResponse(StreamingResponse):
    """A job's stream; with a ``tap``, its in-order deltas after the first are written directly (see above)."""

    def __init__(
        self,
        events: AsyncIterator[Event],
        frames: Frames,
        tap: Tap | None = None,
        *,
        media_type: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self._chunks = frame_chunks(events, frames, self._attach)
        super().__init__(self._chunks, media_type=media_type, headers=headers)
        self._frames = frames
        self._tap = tap
        self._server_send: Send | None = None
        self._behind: asyncio.Task[None] | None = None  # a direct send that waits for the client to read

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._server_send = scope.get(RAW_SEND)
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self._tap is not None:
                self._tap.sink = None
            if self._behind is not None:
                self._behind.cancel()

    async def stream_response(self, send: Send) -> None:
        body = self._server_send or send
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        async for chunk in self._chunks:
            await self._catch_up()
            if chunk:
                await body(_body(chunk))
        await self._catch_up()
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _attach(self) -> None:
        # Driven step by step below: only a server whose send is a coroutine function (uvicorn's) qualifies.
        if self._tap is not None and inspect.iscoroutinefunction(self._server_send):
            self._tap.sink = self._write_now

    def _write_now(self, delta: Delta) -> bool:
        """The pub/sub reader's path: frame and send the delta now; False (queued) behind a send still waiting."""
        if self._behind is not None:
            return False
        assert self._server_send is not None
        sending = cast(Coroutine[Any, Any, None], self._server_send(_body(self._frames.delta(delta))))
        try:
            waits_for = sending.send(None)
        except StopIteration:
            return True
        self._behind = asyncio.ensure_future(_finish(sending, waits_for))
        return True

    async def _catch_up(self) -> None:
        if self._behind is not None:
            await self._behind
            self._behind = None


def _body(chunk: bytes) -> Message:
    return {"type": "http.response.body", "body": chunk, "more_body": True}


async def _finish(coroutine: Coroutine[Any, Any, Any], waits_for: Any) -> None:
    """Run to its end a coroutine that was started outside any task and suspended on ``waits_for`` (the future it
    awaits, or None for a bare yield): what a task does, one step at a time."""
    while True:
        try:
            if waits_for is None:
                await asyncio.sleep(0)
            else:
                waits_for._asyncio_future_blocking = False  # as a task does with the future a step handed it
                await waits_for
        except BaseException as exc:  # cancelled: the coroutine gets to unwind too
            with contextlib.suppress(StopIteration):
                waits_for = coroutine.throw(exc)
                continue
            return
        try:
            waits_for = coroutine.send(None)
        except StopIteration:
            return
