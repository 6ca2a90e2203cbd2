"""Registers the gateway with an existing FastChat/InternVL controller and keeps it registered.

The gateway appears as one worker whose ``model_names`` are the models with live Redis workers; its heartbeats
carry ``queue_length`` from Redis. A controller that is down or slow never blocks requests: everything here runs
in one background task that retries with backoff.
"""

from __future__ import annotations

import asyncio
import logging

import httpx
from redis.exceptions import RedisError

from broker_worker.protocol.redaction import redact
from gateway.service import GatewayService

log = logging.getLogger("gateway.controller")


class ControllerBridge:
    def __init__(self, service: GatewayService, controller: str, http: httpx.AsyncClient | None = None) -> None:
        self.service = service
        self.controller = controller.rstrip("/")
        self._shown = redact(self.controller)  # what the logs print: a user:password@ in it stays secret
        self.http = http or httpx.AsyncClient(timeout=5.0)
        self.registered = False
        self._models: list[str] = []

    async def run(self) -> None:
        backoff = 1.0
        while True:
            try:
                await self.step()
                backoff = 1.0
                await asyncio.sleep(self.service.settings.heartbeat_s)
            except (httpx.HTTPError, RedisError, OSError, ValueError) as exc:
                self.registered = False
                log.warning("controller %s unreachable (%s); retrying in %.0fs", self._shown, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.service.settings.heartbeat_s)

    async def step(self) -> None:
        status = await self.service.status()
        if not self.registered or status.model_names != self._models:
            await self.register(status.to_worker_status())
            self._models = status.model_names
        else:
            await self.heartbeat(status.queue_length)

    async def register(self, worker_status: dict[str, object]) -> None:
        response = await self.http.post(
            f"{self.controller}/register_worker",
            json={
                "worker_name": self.service.settings.public_url(),
                "check_heart_beat": True,
                "worker_status": worker_status,
            },
        )
        response.raise_for_status()
        self.registered = True
        log.info(
            "registered with controller %s as %s serving %s",
            self._shown,
            redact(self.service.settings.public_url()),
            worker_status.get("model_names"),
        )

    async def heartbeat(self, queue_length: int) -> None:
        response = await self.http.post(
            f"{self.controller}/receive_heart_beat",
            json={
                "worker_name": self.service.settings.public_url(),
                "queue_length": queue_length,
            },
        )
        response.raise_for_status()
        if not response.json().get("exist", False):
            log.info("controller %s forgot this gateway; registering again", self._shown)
            self.registered = False
            await self.step()

    async def close(self) -> None:
        await self.http.aclose()
