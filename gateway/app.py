"""The FastAPI application: routers, lifespan (Redis client, controller bridge), limits and auth."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from redis.exceptions import RedisError
from starlette.types import ASGIApp, Receive, Scope, Send

from broker_worker.protocol.client import AsyncClient
from broker_worker.protocol.connections import async_redis
from broker_worker.protocol.errors import ErrorCode, JobError, describe_problems, invalid, redis_failure
from broker_worker.protocol.replica_ack import ReplicaAck
from gateway import routes_controller, routes_openai, routes_ops, routes_worker
from gateway.auth import TokenAuth
from gateway.controller_bridge import ControllerBridge
from gateway.errors import fastchat_chunk, fastchat_error, openai_error
from gateway.metrics import Metrics
from gateway.service import GatewayService
from gateway.settings import GatewaySettings
from gateway.streaming import GatewayApp


class BodyLimit:
    """Refuse bodies over the limit with 413 before reading them (Content-Length) or while reading (chunked)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._refuse(send, int(length))
            return
        seen = 0

        async def limited_receive() -> dict[str, object]:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise _TooLarge(seen)
            return dict(message)

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge as exc:
            await self._refuse(send, exc.size)

    async def _refuse(self, send: Send, size: int) -> None:
        body = fastchat_chunk(f"request body of {size} bytes is over the limit of {self.max_bytes} bytes", 40001)
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    def __init__(self, size: int) -> None:
        self.size = size


def create_app(settings: GatewaySettings) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redis = async_redis(
            settings.redis_url,
            max_connections=settings.redis_max_connections,
            pool_timeout_s=settings.redis_pool_timeout_s,
        )
        metrics = Metrics()
        ack = ReplicaAck(settings.min_replicas_ack, settings.replica_ack_timeout_s, on_short=metrics.count_unreplicated)
        client = AsyncClient(redis, hangup_grace_s=settings.hangup_grace_s, replica_ack=ack)
        service = GatewayService(settings, client, metrics)
        app.state.service = service
        bridge_task = None
        if settings.controller_address:
            app.state.bridge = ControllerBridge(service, settings.controller_address)
            bridge_task = asyncio.create_task(app.state.bridge.run())
        yield
        if bridge_task is not None:
            bridge_task.cancel()
            with contextlib.suppress(BaseException):
                await bridge_task
            await app.state.bridge.close()
        await client.close()

    app = GatewayApp(
        title="InternVL Redis gateway",
        version="0.1.0",
        lifespan=lifespan,
        description="InternVL/FastChat worker protocol and OpenAI API in front of Redis-fed workers.",
    )
    app.include_router(routes_worker.router)
    app.include_router(routes_controller.router)
    app.include_router(routes_openai.router)
    app.include_router(routes_ops.router)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(TokenAuth, token=settings.api_token)  # outermost: nothing runs for a request without it
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _internal_error)
    return app


#: Location parts that name a member of a union (``str | list[…]``), not a field of the body.
_UNION_TAGS = {"body", "str", "constrained-str", "list[OpenAIPart]", "list[ChatMessage]"}


async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    """Bad input gets the protocol's own typed error (40001 with the cause), not FastAPI's 422 format."""
    problems = describe_problems(exc.errors(), skip=_UNION_TAGS, empty="body")
    return _typed(request, invalid(f"invalid request: {problems}"))


async def _internal_error(request: Request, exc: Exception) -> Response:
    """The last boundary: a bug still answers a typed 50001 in the request's protocol (the traceback is logged
    by the server), never a bare 500 page or a dropped connection. A Redis error is named for what it is (a full
    Redis: 42903, retry later) on every route, not only the streaming ones."""
    if isinstance(exc, RedisError | OSError):
        return _typed(request, redis_failure(exc))
    return _typed(request, JobError(ErrorCode.INTERNAL_ERROR, f"internal error: {type(exc).__name__}"))


def _typed(request: Request, err: JobError) -> Response:
    return openai_error(err) if request.url.path.startswith("/v1/") else fastchat_error(err)
