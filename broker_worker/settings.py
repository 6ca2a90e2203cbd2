"""Worker settings: CLI flag > environment (``WORKER_*``, ``REDIS_URL``) > ``.env`` > default. Built once."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from broker_worker.protocol import constants as c

#: Where a worker runs its model: ``auto`` splits it over the visible GPUs.
Device = Literal["cpu", "cuda", "auto"]


class RedisSettings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("redis_url", "REDIS_URL"),
        description="redis:// or rediss:// (TLS) URL, with user:password for AUTH/ACL",
    )


class WorkerSettings(RedisSettings):
    model_config = SettingsConfigDict(env_prefix="WORKER_", env_file=".env", extra="ignore")

    model_path: Path | None = Field(default=None, description="local checkpoint directory (native -hf or remote code)")
    model_name: str | None = Field(default=None, description="name clients ask for; default: from the path")
    device: Device = Field(default="cpu", description="auto = split over the visible GPUs")
    gpus: str | None = Field(default=None, description="GPU subset for this worker, e.g. 0,1")
    vit_alpha: float = Field(default=0.5, ge=0.0, lt=1.0, description="share of GPU 0 taken by the vision model")
    load_8bit: bool = Field(default=False, description="bitsandbytes 8-bit weights (CUDA only)")
    load_4bit: bool = Field(default=False, description="bitsandbytes 4-bit weights (CUDA only)")
    torch_threads: int | None = Field(default=None, ge=1, description="CPU threads for torch (default: torch's)")
    limit_model_concurrency: int = Field(default=5, ge=1, le=256, description="jobs run at once by this worker")
    parallel_generations: int | None = Field(
        default=None, ge=1, description="generate() calls at once (default: 1 on CPU, all slots on GPU or batching)"
    )
    max_batch_size: int = Field(default=1, ge=1, le=256, description="jobs batched into one generate (1 = off)")
    stream_interval_ms: int = Field(default=c.STREAM_INTERVAL_MS, ge=0, description="coalesce deltas this long")
    publish_window_ms: float = Field(
        default=c.PUBLISH_WINDOW_MS, ge=0, description="a busy worker sends its jobs' events together this often"
    )
    publish_batch: int = Field(
        default=c.PUBLISH_BATCH, ge=0, description="… or sooner, as its event rate fills a call with this many (0: off)"
    )
    lease_s: float = Field(default=c.LEASE_S, gt=0, description="idle time after which a job is taken over")
    lease_renew_s: float = Field(default=c.LEASE_RENEW_S, gt=0, description="lease renewal period")
    heartbeat_s: float = Field(default=c.HEARTBEAT_S, gt=0, description="health key refresh period")
    health_ttl_s: float = Field(default=c.HEALTH_TTL_S, gt=0, description="health key TTL")
    forget_consumers_after_s: float = Field(
        default=c.CONSUMER_FORGET_S, gt=0, description="drop group consumers idle this long with nothing pending"
    )
    max_attempts: int = Field(default=c.MAX_ATTEMPTS, ge=1, description="deliveries before dead-letter")
    job_ttl_s: int = Field(default=c.JOB_TTL_S, ge=10, description="expiry of a job's keys after its last write")
    shutdown_grace_s: float = Field(default=c.SHUTDOWN_GRACE_S, ge=0, description="SIGTERM: time to finish jobs")
    stall_timeout_s: float = Field(
        default=c.STALL_TIMEOUT_S,
        ge=0,
        description="a hung engine (no text this long): hand back jobs, exit 3 (0: off)",
    )
    fake_engine: bool = Field(default=False, description="serve a deterministic fake model (tests, benchmarks)")
    fake_token_delay_s: float = Field(default=0.0, ge=0, description="per-token delay of the fake engine")
    log_level: str = Field(default="INFO")
    log_format: Literal["text", "json"] = Field(default="text", description="json: one JSON object per line")

    def resolved_model_name(self) -> str:
        """InternVL's worker's rule: the last path part, or ``<parent>_<last>`` for ``checkpoint-N`` directories."""
        if self.model_name:
            return self.model_name
        if self.model_path is None:
            return "fake"
        parts = str(self.model_path).rstrip("/").split("/")
        return f"{parts[-2]}_{parts[-1]}" if parts[-1].startswith("checkpoint-") and len(parts) > 1 else parts[-1]

    def gpu_list(self) -> tuple[int, ...] | None:
        if not self.gpus:
            return None
        return tuple(int(g) for g in self.gpus.split(",") if g.strip())
