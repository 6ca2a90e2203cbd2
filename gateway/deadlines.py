"""Deadlines for reading a request, at the HTTP protocol level.

uvicorn times out idle keep-alive connections but not a request being read (and the ASGI app is only called once
the head is complete): a client that dribbles its headers or its body a byte at a time holds a connection, its
buffers and a task forever (slowloris). ``deadline_protocol`` gives every request ``header_timeout_s`` from its
first byte (or from the connection's opening) to complete its head, then ``body_timeout_s`` to complete its body;
past either the gateway answers 408 (unless a response was already started) and closes the connection.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from broker_worker.protocol.errors import ErrorCode
from gateway.errors import fastchat_chunk

log = logging.getLogger("gateway.http")


class DeadlineProtocol(HttpToolsProtocol):
    header_timeout_s = 10.0
    body_timeout_s = 30.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._deadline: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm(self.header_timeout_s, "headers")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._deadline is None:  # a later request on a keep-alive connection: its clock starts now
            self._arm(self.header_timeout_s, "headers")

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._arm(self.body_timeout_s, "body")

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self, seconds: float, part: str) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expired, seconds, part)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self, seconds: float, part: str) -> None:
        self._deadline = None
        if self.transport.is_closing() or self.transport.get_protocol() is not self:  # closed, or upgraded
            return
        cycle: Any = self.cycle
        if part == "headers" or not (cycle is not None and cycle.response_started):
            self.transport.write(_timeout_response(f"request {part} not received within {seconds:g}s"))
        log.info("closed a connection whose request %s took over %gs", part, seconds)
        self.transport.close()


def _timeout_response(message: str) -> bytes:
    body = fastchat_chunk(message, ErrorCode.VALIDATION_TYPE_ERROR)
    head = (
        b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        + f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
    )
    return head + body


def deadline_protocol(header_timeout_s: float, body_timeout_s: float) -> type[DeadlineProtocol]:
    """The protocol class to give ``uvicorn.Config(http=…)``, with these deadlines."""
    return type(
        "GatewayHttpProtocol",
        (DeadlineProtocol,),
        {"header_timeout_s": header_timeout_s, "body_timeout_s": body_timeout_s},
    )
