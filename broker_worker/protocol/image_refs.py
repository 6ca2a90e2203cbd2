"""Images by reference: each distinct image is stored once in Redis under a content-addressed key, and jobs carry
``"sha256:<hex>"`` in their ``image`` lists instead of the base64 itself.

InternVL's app resends every earlier image on every turn; inline, all those bytes went through one model's job
stream (one slot, one node on a cluster). By reference, a 5-turn chat writes each image once, and the key's slot
is its own hash (``ivl:img:{<hex>}``), so images spread over a cluster's nodes. ``<hex>`` is the SHA-256 of the
stored base64 text: the worker verifies it, and its decoded-tiles cache is keyed by the same hash. Inline base64
stays accepted from any client.
"""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from broker_worker.protocol import constants as c
from broker_worker.protocol.errors import ErrorCode, JobError
from broker_worker.protocol.images import content_key
from broker_worker.protocol.messages import Job
from broker_worker.protocol.replica_ack import ReplicaAck, Write, write_and_wait

REF_PREFIX = "sha256:"
#: An image key lives this long after its last use (a store or a job that read it).
IMAGE_TTL_S = c.JOB_TTL_S


def image_key(digest: str) -> str:
    """String: the image's base64 text; its own hash tag, so images spread over a cluster's slots."""
    return f"{c.KEY_PREFIX}:img:{{{digest}}}"


def is_ref(image: str) -> bool:
    return image.startswith(REF_PREFIX) and len(image) == len(REF_PREFIX) + 64


async def store_images(redis: aioredis.Redis, job: Job, ttl_s: int = IMAGE_TTL_S, ack: ReplicaAck | None = None) -> Job:
    """The job with each inline image stored once and replaced by its reference. An image Redis already has
    only gets its TTL refreshed (``EXPIRE``): InternVL's app re-sends every earlier image on every turn, and
    those bytes are not written again. A new one is written with ``SET … EX``; with ``ack`` wanted
    (``--min-replicas-ack``), followed by ``WAIT`` on its connection, and a shortfall is reported. Each image
    is handled in parallel."""
    inline = {content_key(b64): b64 for m in job.prompt for b64 in m.image if not is_ref(b64)}
    if not inline:
        return job
    known = await asyncio.gather(*(redis.expire(image_key(d), ttl_s) for d in inline))
    new = {d: b64 for (d, b64), refreshed in zip(inline.items(), known, strict=True) if not refreshed}
    if new and ack is not None and ack.wanted:
        writes: list[Write] = [(image_key(d), ("SET", image_key(d), b64, "EX", ttl_s)) for d, b64 in new.items()]
        _, acked = await write_and_wait(redis, writes, ack)
        ack.check(job.id, job.model, acked, "images")
    elif new:
        await asyncio.gather(*(redis.set(image_key(d), b64, ex=ttl_s) for d, b64 in new.items()))
    prompt = [
        m.model_copy(update={"image": [b if is_ref(b) else REF_PREFIX + content_key(b) for b in m.image]})
        if m.image
        else m
        for m in job.prompt
    ]
    return job.model_copy(update={"prompt": prompt})


async def resolve_images(redis: aioredis.Redis, job: Job, ttl_s: int = IMAGE_TTL_S) -> Job:
    """The job with every reference replaced by its image (TTL refreshed: ``GETEX``). A reference that is
    missing, expired or whose content does not hash to it is a typed error (40001) naming it."""
    refs = list(dict.fromkeys(b for m in job.prompt for b in m.image if is_ref(b)))
    if not refs:
        return job
    values = await asyncio.gather(*(redis.getex(image_key(r.removeprefix(REF_PREFIX)), ex=ttl_s) for r in refs))
    found: dict[str, str] = {}
    for ref, raw in zip(refs, values, strict=True):
        if raw is None:
            raise JobError(ErrorCode.VALIDATION_TYPE_ERROR, f"image {ref} is not in Redis (expired or never stored)")
        value = raw if isinstance(raw, str) else raw.decode("utf-8", "replace")
        if content_key(value) != ref.removeprefix(REF_PREFIX):
            raise JobError(ErrorCode.VALIDATION_TYPE_ERROR, f"image {ref}: the stored content has another hash")
        found[ref] = value
    prompt = [m.model_copy(update={"image": [found.get(b, b) for b in m.image]}) if m.image else m for m in job.prompt]
    return job.model_copy(update={"prompt": prompt})
