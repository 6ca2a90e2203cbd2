"""FastAPI dependencies: the shared service and the optional bearer token.

Both are ``async def``: FastAPI runs plain ``def`` dependencies in a thread pool, a thread hop per request.
"""

from __future__ import annotations

import secrets

from fastapi import HTTPException, Request

from gateway.service import GatewayService


async def get_service(request: Request) -> GatewayService:
    service: GatewayService = request.app.state.service
    return service


async def require_token(request: Request) -> None:
    token = request.app.state.service.settings.api_token
    if not token:
        return
    given = request.headers.get("authorization", "")
    if not secrets.compare_digest(given.encode(), f"Bearer {token}".encode()):
        raise HTTPException(
            status_code=401, detail="missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"}
        )
