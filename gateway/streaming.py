"""The streamed responses' ASGI plumbing: body chunks go straight to the server's ``send``.

Starlette wraps ``send`` twice (its error and exception middlewares) only to note whether a response started;
once ``http.response.start`` went through them, the body chunks need neither, and each wrapper was one more
coroutine call per relayed event (bench/capacity.py measures the gateway's CPU per event). ``GatewayApp`` keeps
the server's own ``send`` in the scope for ``RelayResponse``; anything else (a test transport) gets the
wrapped one.
"""

from __future__ import annotations

from fastapi import FastAPI
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

RAW_SEND = "ivl.server_send"


class GatewayApp(FastAPI):
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope[RAW_SEND] = send
        await super().__call__(scope, receive, send)


class RelayResponse(StreamingResponse):
    """``StreamingResponse`` whose body chunks bypass the middlewares' ``send`` wrappers (start and end do not)."""

    _server_send: Send | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._server_send = scope.get(RAW_SEND)
        await super().__call__(scope, receive, send)

    async def stream_response(self, send: Send) -> None:
        body = self._server_send or send
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        async for chunk in self.body_iterator:
            if isinstance(chunk, str):
                chunk = chunk.encode(self.charset)
            await body({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
