"""Named states of a job and of one run of it. The Lua scripts in ``lua/`` spell the same values (each says
which names it mirrors); keep the two in step."""

from __future__ import annotations

from enum import Enum, IntEnum


class JobStatus(str, Enum):
    """``status`` field of ``ivl:job:{id}:state``."""

    QUEUED = "queued"  # written by a client at submit; workers treat it as new
    RUNNING = "running"
    RELEASED = "released"  # handed back on shutdown: the next start does not count an attempt
    RETRY = "retry"  # a transient failure (CUDA OOM): the next start counts an attempt
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED})


class StopReason(str, Enum):
    """Why a run stopped generating before the engine finished."""

    CANCELLED = "cancelled"  # a client set the cancel key
    FENCED = "fenced"  # another worker took the job over: publish nothing more
    HANDBACK = "handback"  # this worker is shutting down: give the job back for another worker to resume


class Ownership(IntEnum):
    """What ``lua/renew.lua`` answers about a running job."""

    TAKEN_OVER = 0
    OWNED = 1
    OWNED_BUT_CANCELLED = 2


#: What ``lua/publish.lua`` returns instead of a seq.
class PublishRefused(IntEnum):
    FENCED = -1
    CANCELLED = -2
