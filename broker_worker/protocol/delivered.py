"""What one reader of a job has delivered: its last seq and when, and what it needs to notice a replay record that
went back or was rewritten (a Redis failover) and a job that stopped producing (the timeouts)."""

from __future__ import annotations

import time

from broker_worker.protocol.errors import ErrorCode, JobError
from broker_worker.protocol.messages import Event


class Delivered:
    """What one reader has delivered so far, to notice a replay record that went back or was rewritten: a Redis
    failover can lose the last writes a replica had not received yet, and the job's worker then numbers its next
    events from the older seq. Text already sent must never be contradicted: such a stream ends with a typed
    error naming the job."""

    KEEP = 256  # recent events kept for comparison (duplicates arrive only within a replay read's window)

    def __init__(self, job_id: str, after_seq: int) -> None:
        self.job_id = job_id
        self.after_seq = after_seq
        self.last = after_seq
        self.at = time.monotonic()  # when the last event was delivered (the idle timeout counts from it)
        # seq -> fingerprint. Numbers, not the events: a dict of ints is not tracked by the garbage collector, and
        # hundreds of streams x KEEP pydantic events made each full collection of a gateway take 0.2-0.3 s
        # (every stream's delivery stalled meanwhile; bench/capacity.py's delay p99).
        self._recent: dict[int, int] = {}

    def add(self, event: Event) -> None:
        """``event`` is the next in order (seq ``last`` + 1): the KEEP most recent are consecutive seqs."""
        self.last = event.seq
        self.at = time.monotonic()
        self._recent[event.seq] = _fingerprint(event)
        self._recent.pop(event.seq - self.KEEP, None)

    def check_again(self, event: Event) -> None:
        """``event`` has a seq already delivered: it must be the same event."""
        known = self._recent.get(event.seq)
        if known is not None and known != _fingerprint(event):
            raise self._lost(f"seq {event.seq} came back with other content")

    def check_replay(self, events: list[Event]) -> None:
        """``events``: the replay from seq ``last`` on; it must still hold the last event delivered."""
        if self.last == self.after_seq or self.last not in self._recent:
            return
        if not events or events[0].seq != self.last:  # the record is trimmed from its front only: never here
            raise self._lost(f"seq {self.last} was delivered, Redis no longer has it")
        self.check_again(events[0])

    def _lost(self, detail: str) -> JobError:
        return JobError(
            ErrorCode.INTERNAL_ERROR,
            f"job {self.job_id} lost in a Redis failover: its replay record went back ({detail}); submit it again",
        )


def _fingerprint(event: Event) -> int:
    """Equal for equal events; for two different ones, equal only by a 64-bit hash collision."""
    return hash(event.text) if event.type == "delta" else hash(event.model_dump_json())


def check_timeouts(
    job_id: str,
    received: int,
    started: float,
    last_event_at: float,
    start_timeout_s: float | None,
    idle_timeout_s: float | None,
) -> None:
    now = time.monotonic()
    if received == 0 and start_timeout_s is not None and now - started > start_timeout_s:
        raise JobError(
            ErrorCode.CONTROLLER_WORKER_TIMEOUT,
            f"no worker started job {job_id} within {start_timeout_s:.0f}s (are workers running for this model?)",
        )
    if received > 0 and idle_timeout_s is not None and now - last_event_at > idle_timeout_s:
        raise JobError(
            ErrorCode.CONTROLLER_WORKER_TIMEOUT,
            f"job {job_id} produced nothing for {idle_timeout_s:.0f}s; its worker may be gone",
        )
