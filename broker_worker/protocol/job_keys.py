"""A job's own Redis keys, together: they share the hash tag ``{job_id}``, so one Lua script may touch them all."""

from __future__ import annotations

from dataclasses import dataclass

from broker_worker.protocol import constants as c


@dataclass(frozen=True)
class JobKeys:
    state: str
    events: str
    channel: str
    cancel: str

    @classmethod
    def of(cls, job_id: str) -> JobKeys:
        return cls(c.job_state_key(job_id), c.job_events_key(job_id), c.job_channel(job_id), c.job_cancel_key(job_id))
