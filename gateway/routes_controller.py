"""The controller calls Streamlit makes, served from Redis so no controller process is needed."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends

from gateway.deps import get_service
from gateway.service import GatewayService

router = APIRouter(tags=["controller protocol"])
Service = Annotated[GatewayService, Depends(get_service)]


@router.post("/refresh_all_workers")
async def refresh_all_workers(service: Service) -> dict[str, object]:
    return {"models": (await service.status()).model_names}


@router.post("/list_models")
async def list_models(service: Service) -> dict[str, object]:
    return {"models": (await service.status()).model_names}


@router.post("/list_multimodal_models")
async def list_multimodal_models(service: Service) -> dict[str, object]:
    return {"models": (await service.status()).model_names}


@router.post("/get_worker_address")
async def get_worker_address(service: Service, body: Annotated[dict[str, Any], Body()]) -> dict[str, str]:
    served = (await service.status()).model_names
    return {"address": service.settings.public_url() if body.get("model") in served else ""}
