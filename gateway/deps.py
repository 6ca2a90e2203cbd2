"""FastAPI dependencies: the shared service (the bearer token is checked by ``gateway.auth`` in front of the app).

Both are ``async def``: FastAPI runs plain ``def`` dependencies in a thread pool, a thread hop per request.
"""

from __future__ import annotations

from fastapi import Request

from gateway.service import GatewayService


async def get_service(request: Request) -> GatewayService:
    service: GatewayService = request.app.state.service
    return service
