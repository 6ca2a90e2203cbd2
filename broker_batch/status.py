"""How far a run of an input file is (``broker-batch status``), and cancelling what it left queued (``--cancel``).

Both work from the input file alone: every line's job id is derived from the line (``lines.job_id``), so the
jobs' states are read straight from Redis; lines already in the output file (when one is given) are skipped.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import redis.asyncio as aioredis

from broker_batch.lines import Options, scan
from broker_batch.results import Answered
from broker_worker.protocol import constants as c
from broker_worker.protocol import jobs
from broker_worker.protocol.states import JobStatus

CHUNK = 1000
#: How ``status`` names a job state (a job handed back or being retried is still running, as far as a user cares).
STATE_NAMES = {
    None: "not queued",
    JobStatus.QUEUED.value: "queued",
    JobStatus.RUNNING.value: "running",
    JobStatus.RELEASED.value: "running",
    JobStatus.RETRY.value: "running",
    JobStatus.DONE.value: "done",
    JobStatus.FAILED.value: "failed",
    JobStatus.CANCELLED.value: "cancelled",
}
OPEN = ("queued", "running")


def open_ids(path: Path, options: Options, answered: Answered, counted: Counter[str]) -> Iterator[str | None]:
    """The job id of every line not answered yet (None for a line that makes no job); counts lines in
    ``counted["lines"]``."""
    for line in scan(path):
        counted["lines"] += 1
        if not answered.has(line.number, line.custom_id, line.first):
            yield line.job_id(options)


async def states(redis: aioredis.Redis, ids: list[str]) -> list[str]:
    """Each job's state name (``STATE_NAMES``), CHUNK ids per round trip."""
    names: list[str] = []
    for start in range(0, len(ids), CHUNK):
        async with redis.pipeline(transaction=False) as pipe:
            for job_id in ids[start : start + CHUNK]:
                pipe.hget(c.job_state_key(job_id), "status")
            names += [STATE_NAMES.get(s, str(s)) for s in await pipe.execute()]
    return names


async def report(redis: aioredis.Redis, path: Path, options: Options, answered: Answered, output: str) -> str:
    counted: Counter[str] = Counter()
    ids = list(open_ids(path, options, answered, counted))
    valid = [i for i in ids if i is not None]
    counts = Counter(await states(redis, valid))
    parts = [f"{path}: {counted['lines']} lines"]
    if output:
        parts.append(f"{counted['lines'] - len(ids)} answered in {output} ({answered.errors} error lines)")
    in_redis = ", ".join(f"{n} {name}" for name, n in sorted(counts.items()))
    parts.append(f"{'not answered yet' if output else 'jobs'}: {in_redis or 'none'}")
    if len(ids) > len(valid):
        parts[-1] += f", {len(ids) - len(valid)} bad lines (error lines once run)"
    return "; ".join(parts)


async def cancel(redis: aioredis.Redis, path: Path, options: Options, answered: Answered) -> int:
    """Cancel every job of the file still queued or running; returns how many."""
    valid = [i for i in open_ids(path, options, answered, Counter()) if i is not None]
    chosen = [job_id for job_id, name in zip(valid, await states(redis, valid), strict=True) if name in OPEN]
    for job_id in chosen:
        await jobs.cancel(redis, job_id)
    return len(chosen)
