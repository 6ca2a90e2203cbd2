"""Reading a pub/sub connection: every reply handed to one callback, in order. A connection silent for
``PING_AFTER_S`` is probed with PING, and one still silent after ``DEAD_AFTER_S`` is given up (``OSError``: the
caller reconnects)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import hiredis
from redis.exceptions import ResponseError

READ_POLL_S = 1.0
PING_AFTER_S = 15.0  # a connection silent this long is probed with PING …
DEAD_AFTER_S = 30.0  # … and replaced when still silent this long
READ_BYTES = 1 << 16


async def read_replies(conn: Any, handle: Callable[[Any], None]) -> None:
    """Read the connection until it fails, each reply to ``handle``."""
    stream = getattr(conn, "_reader", None)
    if isinstance(stream, asyncio.StreamReader):
        await _read_raw(conn, stream, handle)
    else:  # pragma: no cover - a connection class without the asyncio stream redis-py uses today
        await _read_responses(conn, handle)


async def _read_raw(conn: Any, stream: asyncio.StreamReader, handle: Callable[[Any], None]) -> None:
    """Every reply on the connection, parsed straight from its socket: each read (many messages when busy) is fed to
    one hiredis reader and every complete reply handled at once. redis-py's ``read_response`` costs a timeout
    context, several calls and a debug log string per message, which was most of the gateway's pub/sub share per
    event. Only the subscriber's reader task reads the connection (its writer only writes), and redis-py has read
    nothing past the connection's handshake, so nothing is lost or read twice."""
    reader = hiredis.Reader(encoding=conn.encoder.encoding, errors=conn.encoder.encoding_errors)
    loop = asyncio.get_running_loop()
    heard, pinged = loop.time(), False
    while True:
        reply = reader.gets()
        while reply is not False:
            if isinstance(reply, Exception):
                raise ResponseError(str(reply))
            handle(reply)
            reply = reader.gets()
        data = None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(READ_POLL_S):
                data = await stream.read(READ_BYTES)
        if data == b"":
            raise OSError("pub/sub connection closed by Redis")
        now = loop.time()
        if data is not None:
            reader.feed(data)
            heard, pinged = now, False
        elif now - heard > DEAD_AFTER_S:
            raise OSError(f"pub/sub connection silent for {DEAD_AFTER_S:.0f}s")
        elif now - heard > PING_AFTER_S and not pinged:
            await conn.send_command("PING", check_health=False)
            pinged = True


async def _read_responses(conn: Any, handle: Callable[[Any], None]) -> None:
    loop = asyncio.get_running_loop()
    heard, pinged = loop.time(), False
    while True:
        # push_request: hiredis hands pub/sub replies over as push notifications, which are skipped otherwise
        reply = await conn.read_response(timeout=READ_POLL_S, push_request=True)
        now = loop.time()
        if reply is not None:
            heard, pinged = now, False
            handle(reply)
        elif now - heard > DEAD_AFTER_S:
            raise OSError(f"pub/sub connection silent for {DEAD_AFTER_S:.0f}s")
        elif now - heard > PING_AFTER_S and not pinged:
            await conn.send_command("PING", check_health=False)
            pinged = True
