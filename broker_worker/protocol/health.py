"""Worker health: a TTL'd key per worker plus an index, read by the gateway and by ``broker-worker check``."""

from __future__ import annotations

import redis.asyncio as aioredis

from broker_worker.protocol import constants as c
from broker_worker.protocol.connections import is_cluster
from broker_worker.protocol.messages import WorkerHealth, now_ms


async def record(redis: aioredis.Redis, health: WorkerHealth, ttl_s: float) -> None:
    now = now_ms()
    async with redis.pipeline(transaction=False) as pipe:
        pipe.set(c.worker_health_key(health.worker_id), health.model_dump_json(), px=int(ttl_s * 1000))
        pipe.zadd(c.WORKERS_INDEX, {health.worker_id: now + int(ttl_s * 1000)})
        pipe.zremrangebyscore(c.WORKERS_INDEX, 0, now)
        pipe.expire(c.WORKERS_INDEX, int(ttl_s * 3) + 1)
        await pipe.execute()


async def remove(redis: aioredis.Redis, worker_id: str) -> None:
    async with redis.pipeline(transaction=False) as pipe:
        pipe.delete(c.worker_health_key(worker_id))
        pipe.zrem(c.WORKERS_INDEX, worker_id)
        await pipe.execute()


async def live_workers(redis: aioredis.Redis) -> list[WorkerHealth]:
    now = now_ms()
    ids: list[str] = list(await redis.zrangebyscore(c.WORKERS_INDEX, now, "+inf"))  # type: ignore[arg-type]
    if not ids:
        return []
    keys = [c.worker_health_key(i) for i in ids]
    # On a cluster each health key lives in its own slot: one MGET per node instead of one for all
    values = await (redis.mget_nonatomic(keys) if is_cluster(redis) else redis.mget(keys))  # type: ignore[attr-defined]
    return [WorkerHealth.model_validate_json(v) for v in values if v]


async def queue_length(redis: aioredis.Redis, model: str, lane: str = c.INTERACTIVE) -> int:
    """Jobs of one lane waiting or running for a model: processed entries are deleted, so the stream length is
    the queue. The interactive lane's is what a new interactive request waits behind: it goes ahead of every
    waiting batch job, so batch jobs count only as far as they hold slots."""
    return (await queue_lengths(redis, [model], lane))[model]


async def queue_lengths(redis: aioredis.Redis, models: list[str], lane: str = c.INTERACTIVE) -> dict[str, int]:
    """``queue_length`` of several models in one round trip."""
    async with redis.pipeline(transaction=False) as pipe:
        for model in models:
            pipe.xlen(c.job_stream(model, lane))
        lengths = await pipe.execute()
    return {model: int(n) for model, n in zip(models, lengths, strict=True)}
