"""A hung engine (a stuck CUDA kernel, a deadlock in model code) must not hold its jobs for ever: its thread
cannot be stopped from Python, it keeps its slots, and the worker's lease renewals would keep every job it holds
from being taken over. So the worker watches what its engine makes and, when it stalls, hands every job back
(other workers resume them from the text already published) and exits with ``EXIT_STALLED`` for its supervisor
to restart it.

Either sign is a stall, after ``timeout_s`` (``--stall-timeout-s``):

- runs in progress and no text from any of them, nor any run ending (the clock starts when the worker gets busy:
  an idle engine is not stuck);
- one run that made text and then none (before its first text a run may wait its turn in a batching engine).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from broker_worker.relay import Running

#: The worker's exit status after a stall (a supervisor restarts it; 1 is a crash, 2 a usage error).
EXIT_STALLED = 3


class EngineStalled(Exception):
    """The worker stopped because its engine stalled (``StallWatch``); its jobs were handed back."""


@dataclass
class StallWatch:
    timeout_s: float
    #: How often ``stalled`` is asked; a gap far longer means the whole process was paused (SIGSTOP, swap), not
    #: its engine: everyone gets a full timeout again.
    check_every_s: float = 3.0
    #: When the engine last made text for any run, or a run ended (monotonic; ``Relay`` and ``JobRunner`` mark it).
    last_progress: float = 0.0
    _busy_since: float | None = None
    _checked: float | None = None
    _grace_until: float = 0.0

    def stalled(self, runs: Collection[Running], now: float) -> str | None:
        """Why the engine counts as stalled now, or None (always None with a timeout of 0: the watch is off)."""
        if self._checked is not None and now - self._checked > 3 * self.check_every_s:
            self._grace_until = now + self.timeout_s
        self._checked = now
        if not runs:
            self._busy_since = None
            return None
        if self._busy_since is None:
            self._busy_since = now
        if not self.timeout_s or now < self._grace_until:
            return None
        quiet = now - max(self.last_progress, self._busy_since)
        if quiet > self.timeout_s:
            return f"none of its {len(runs)} running job(s) made any text for {quiet:.0f}s"
        for run in runs:
            if run.text_at is not None and now - run.text_at > self.timeout_s:
                return f"job {run.job.id} made no text for {now - run.text_at:.0f}s after its first"
        return None
