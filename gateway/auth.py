"""``--api-token``: one check in front of the whole application, so every route needs the token (the API docs,
the OpenAPI schema, the job routes, routes added later, unknown paths) and none can be left open by a router
mounted without a dependency. Only ``OPEN_PATHS`` answer without it."""

from __future__ import annotations

import secrets

from fastapi.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from broker_worker.protocol.errors import ErrorCode, JobError
from gateway.errors import json_bytes, openai_error

#: Liveness probes and Prometheus scrapes carry no token; neither path reveals a job or changes anything.
OPEN_PATHS = frozenset({"/health", "/metrics"})


class TokenAuth:
    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode() if token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._allowed(scope):
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        else:
            await refusal(scope["path"])(scope, receive, send)

    def _allowed(self, scope: Scope) -> bool:
        if self.expected is None or scope["type"] not in ("http", "websocket") or scope["path"] in OPEN_PATHS:
            return True
        return secrets.compare_digest(_authorization(scope), self.expected)


def _authorization(scope: Scope) -> bytes:
    return next((value for name, value in scope["headers"] if name == b"authorization"), b"")


def refusal(path: str) -> Response:
    """401 in the protocol of the path: an OpenAI error object under /v1/, else the worker protocol's error object
    as plain JSON (no trailing NUL: the job and docs routes are read by plain JSON clients; worker-protocol clients
    split on NUL and read the one part all the same)."""
    err = JobError(ErrorCode.INVALID_AUTH_KEY, "missing or wrong bearer token (Authorization: Bearer <token>)")
    if path.startswith("/v1/"):
        response = openai_error(err)
    else:
        body = json_bytes({"text": err.message, "error_code": int(err.code)})
        response = Response(body, status_code=401, media_type="application/json")
    response.headers["WWW-Authenticate"] = "Bearer"
    return response
