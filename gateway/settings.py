"""Gateway settings: CLI flag > environment (``GATEWAY_*``, ``REDIS_URL``) > ``.env`` > default."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from broker_worker.settings import RedisSettings


class GatewaySettings(RedisSettings):
    model_config = SettingsConfigDict(env_prefix="GATEWAY_", env_file=".env", extra="ignore")

    host: str = Field(default="127.0.0.1", description="address to listen on")
    port: int = Field(default=8000, ge=1, le=65535, description="port to listen on")
    worker_address: str | None = Field(
        default=None, description="this gateway's public URL, given to the controller (default http://host:port)"
    )
    controller_address: str | None = Field(default=None, description="FastChat/InternVL controller to register with")
    heartbeat_s: float = Field(default=15.0, gt=0, description="controller heartbeat period (expiry: 30 s InternVL)")
    api_token: str | None = Field(default=None, description="require 'Authorization: Bearer <token>'")
    max_body_bytes: int = Field(default=64 * 1024 * 1024, ge=1024, description="largest request body")
    max_images: int = Field(default=16, ge=0, description="images per request")
    max_image_pixels: int = Field(default=50_000_000, ge=1, description="pixels per image")
    max_new_tokens: int = Field(default=4096, ge=1, description="largest max_new_tokens / max_tokens")
    max_queue: int = Field(default=256, ge=1, description="queued + running jobs per model before 42903")
    admit_grace_s: float = Field(
        default=30.0,
        ge=0,
        description="a model served this recently is still admitted while no worker is listed (a Redis stall "
        "lapses every worker's health key at once); 0: refuse at once",
    )
    hangup_grace_s: float = Field(
        default=1.0,
        ge=0,
        description="a job whose client hung up is cancelled this much later, unless a retry or resume of its id "
        "(through any gateway) reads it by then; 0: at once",
    )
    start_timeout_s: float = Field(default=120.0, gt=0, description="a job no worker starts in this time fails")
    idle_timeout_s: float = Field(default=120.0, gt=0, description="a started job silent this long fails")
    redis_max_connections: int = Field(
        default=64, ge=2, description="Redis connections of this gateway; requests wait for a free one"
    )
    redis_pool_timeout_s: float = Field(
        default=20.0, gt=0, description="a request waiting this long for a Redis connection fails (50001)"
    )
    min_replicas_ack: int = Field(
        default=0,
        ge=0,
        description="after queueing a job, WAIT for this many replicas to have it (0: do not wait)",
    )
    replica_ack_timeout_s: float = Field(
        default=1.0, gt=0, description="--min-replicas-ack: how long to wait; a job not acknowledged is still queued"
    )
    header_timeout_s: float = Field(
        default=10.0, gt=0, description="a connection must send a request's headers within this time (408, closed)"
    )
    body_timeout_s: float = Field(
        default=30.0, gt=0, description="a request's whole body must arrive within this time after its headers (408)"
    )
    log_level: str = Field(default="info")
    log_format: Literal["text", "json"] = Field(default="text", description="json: one JSON object per line")

    def public_url(self) -> str:
        return (self.worker_address or f"http://{self.host}:{self.port}").rstrip("/")
