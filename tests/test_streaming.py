"""gateway/streaming.py: a stream's deltas written directly from the pub/sub reader's stack keep their order and
are never lost or doubled, also when the server's ``send`` waits for a slow client (flow control)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from starlette.types import Message

from broker_worker.protocol.messages import Delta, Done, Event, Usage
from broker_worker.protocol.tap import Tap
from gateway.fastchat_stream import FastChatFrames
from gateway.streaming import RAW_SEND, RelayResponse, frame_chunks


class Server:
    """An ASGI server's ``send`` as uvicorn's: a coroutine that waits, before writing, while the client is slow."""

    def __init__(self) -> None:
        self.writable = asyncio.Event()
        self.writable.set()
        self.body: list[bytes] = []

    async def send(self, message: Message) -> None:
        await self.writable.wait()
        if message["type"] == "http.response.body" and message["body"]:
            self.body.append(message["body"])


async def _from(queue: asyncio.Queue[Event]) -> AsyncIterator[Event]:
    while True:
        event = await queue.get()
        yield event
        if event.type == "done":
            return


async def _never() -> Message:
    await asyncio.Event().wait()
    return {}


async def _until(condition: Any) -> None:
    async with asyncio.timeout(10):
        while not condition():  # noqa: ASYNC110 - polls plain state the code under test sets
            await asyncio.sleep(0.001)


def _delta(seq: int) -> Delta:
    return Delta(seq=seq, text=f"piece{seq} ")


async def _expected(events: list[Event]) -> list[bytes]:
    async def replay() -> AsyncIterator[Event]:
        for event in events:
            yield event

    return [chunk async for chunk in frame_chunks(replay(), FastChatFrames("job")) if chunk]


async def test_direct_deltas_wait_behind_a_paused_send_and_keep_their_order() -> None:
    server, tap, queue = Server(), Tap(), asyncio.Queue[Event]()
    response = RelayResponse(_from(queue), FastChatFrames("job"), tap, media_type="application/octet-stream")
    scope = {"type": "http", "asgi": {"spec_version": "2.4"}, RAW_SEND: server.send}
    running = asyncio.create_task(response(scope, _never, server.send))
    queue.put_nowait(_delta(1))  # the first delta goes the ordinary way; then the sink is attached
    await _until(lambda: tap.sink is not None)
    assert tap.sink is not None
    assert tap.sink(_delta(2)) is True  # written at once, on this stack
    assert len(server.body) == 2
    server.writable.clear()  # the client stops reading
    assert tap.sink(_delta(3)) is True  # its send waits for the client, in a task of its own
    assert tap.sink(_delta(4)) is False  # declined: it would overtake 3; the stream's loop gets it
    queue.put_nowait(_delta(4))
    await asyncio.sleep(0.05)
    assert len(server.body) == 2  # nothing written while the client does not read
    server.writable.set()
    queue.put_nowait(Done(seq=5, finish_reason="length", usage=Usage(prompt_tokens=1, completion_tokens=4)))
    await running
    done = Done(seq=5, finish_reason="length", usage=Usage(prompt_tokens=1, completion_tokens=4))
    assert server.body == await _expected([_delta(1), _delta(2), _delta(3), _delta(4), done])
    assert tap.sink is None  # detached when the response ended


async def test_without_the_servers_own_send_nothing_is_written_directly() -> None:
    server, tap, queue = Server(), Tap(), asyncio.Queue[Event]()
    response = RelayResponse(_from(queue), FastChatFrames("job"), tap, media_type="application/octet-stream")
    running = asyncio.create_task(response({"type": "http", "asgi": {"spec_version": "2.4"}}, _never, server.send))
    queue.put_nowait(_delta(1))
    await _until(lambda: len(server.body) == 1)
    assert tap.sink is None  # e.g. a test transport: every event goes through the stream's loop
    queue.put_nowait(Done(seq=2, finish_reason="length", usage=Usage(prompt_tokens=1, completion_tokens=1)))
    await running
