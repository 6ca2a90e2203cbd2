"""A deterministic engine for the broker's mechanics: fixed text, fixed per-token delay, real cancel/resume.

Its text for a job is a function of the job alone, so a resumed job can be checked for prefix consistency.
Questions starting with a trigger make it misbehave on purpose: ``fail:`` raises a typed JobError (50001),
``oom:`` a retryable CUDA OOM, ``crash:`` a plain exception (the worker's catch-all error boundary), and ``eos:``
ends the answer early with ``finish_reason: "stop"`` as a model that emits its end-of-sequence token does.
``clock:`` makes every token the wall-clock time it was produced (``@1764000000.123456 ``, fixed width), so a
benchmark client on the same machine can tell how long each token took to reach it (bench/capacity.py).
``hang:`` makes a fresh run hang for good after two tokens, deaf to cancel, as a stuck CUDA kernel would (a
resumed run answers in full: the worker's stall watch, broker_worker/stall.py, hands it to another worker).
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from dataclasses import dataclass, field

from broker_worker.model.engine import Finish, OnDelta
from broker_worker.model.stops import generate_with_stops
from broker_worker.protocol.errors import ErrorCode, JobError
from broker_worker.protocol.messages import FinishReason, Job, Usage


def question_of(job: Job) -> str:
    return next((m.text for m in reversed(job.prompt) if m.role == "user"), "")


def fake_tokens(job: Job) -> list[str]:
    """The full answer for a job, one token per item."""
    question = question_of(job)
    count = job.max_new_tokens // 2 if question.startswith("eos:") else job.max_new_tokens
    return [f"t{i}:{len(question)} " for i in range(count)]


class FakeEngine:
    def __init__(self, model_name: str = "fake", token_delay_s: float = 0.0) -> None:
        self.model_name = model_name
        self.device = "fake"  # sleeps rather than computes: it models a GPU, so jobs run in parallel
        self.context_len = 8192
        self.token_delay_s = token_delay_s
        self._steps = _Steps(token_delay_s) if token_delay_s else None

    def count_tokens(self, job: Job) -> int:
        return len(question_of(job))

    def generate(self, job: Job, answer_prefix: str, cancel: threading.Event, on_delta: OnDelta) -> Finish:
        return generate_with_stops(
            job, answer_prefix, cancel, on_delta, lambda flag, out: self._generate(job, answer_prefix, flag, out)
        )

    def _generate(self, job: Job, answer_prefix: str, cancel: threading.Event, on_delta: OnDelta) -> Finish:
        question = question_of(job)
        if question.startswith("fail:"):
            raise JobError(ErrorCode.INTERNAL_ERROR, f"fake engine asked to fail: {question}")
        if question.startswith("oom:"):
            raise JobError(ErrorCode.CUDA_OUT_OF_MEMORY, "fake engine ran out of memory", retryable=True)
        if question.startswith("crash:"):
            raise RuntimeError(f"fake engine crashed: {question}")  # untyped, as a bug in an engine would be
        tokens = fake_tokens(job)
        clock = question.startswith("clock:")
        done, start = 0, 0
        while start < len(tokens) and done + len(tokens[start]) <= len(answer_prefix):
            done += len(tokens[start])
            start += 1
        if clock:  # timestamps are longer than the plain tokens: a resumed job counts the ones it already sent
            start = answer_prefix.count(" ")
        hang = question.startswith("hang:") and not answer_prefix
        run = _Run(tokens[start : HANG_AFTER if hang else None], cancel, on_delta, clock)
        if self._steps is not None:
            self._steps.run(run)
        else:  # no delay: every token at once, on this thread
            while run.step():
                pass
        if run.error is not None:
            raise run.error
        if hang:
            threading.Event().wait()  # never set: this thread is lost, as a hung engine's is
        reason: FinishReason = "stop" if question.startswith("eos:") else "length"
        return Finish(reason, Usage(prompt_tokens=len(question), completion_tokens=len(tokens)))


#: Tokens a fresh ``hang:`` run makes before it hangs.
HANG_AFTER = 2
#: Tokens due within this much of each other are made in one step (as a batched engine makes them together).
STEP_QUANTUM_S = 0.001


@dataclass(eq=False)
class _Run:
    """One job's tokens, made one per step."""

    tokens: list[str]
    cancel: threading.Event
    on_delta: OnDelta
    clock: bool
    made: int = 0
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def step(self) -> bool:
        """Make the next token; False when the run is over (all made, cancelled, or ``on_delta`` raised)."""
        if self._goes_on():
            try:
                self.on_delta(f"@{time.time():.6f} " if self.clock else self.tokens[self.made])
                self.made += 1
            except BaseException as exc:  # raised again on the job's own thread
                self.error = exc
        if self.error is None and self._goes_on():
            return True
        self.done.set()
        return False

    def _goes_on(self) -> bool:
        return self.made < len(self.tokens) and not self.cancel.is_set()


class _Steps:
    """One thread makes every running job's tokens, each when it is due (a fixed rate from the job's start): as a
    batched GPU engine makes one token per job per step, rather than one sleeping thread per job, whose wake-ups
    and GIL hand-offs were most of a worker's CPU at a thousand jobs (bench/capacity.py). ``generate`` still
    blocks on the job's own thread until its run is over, as the ``Engine`` interface has it."""

    def __init__(self, token_delay_s: float) -> None:
        self._delay_s = token_delay_s
        self._due: list[tuple[float, int, _Run]] = []  # a heap: when each run's next token is due
        self._order = itertools.count()  # ties: first come first served
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    def run(self, run: _Run) -> None:
        """Until the run is over (its ``error``, if any, is the caller's to raise)."""
        if run.tokens:
            with self._changed:
                self._push(time.perf_counter() + self._delay_s, run)
                if self._thread is None:
                    self._thread = threading.Thread(target=self._loop, name="fake-engine-steps", daemon=True)
                    self._thread.start()
                self._changed.notify()
            run.done.wait()

    def _push(self, due: float, run: _Run) -> None:
        heapq.heappush(self._due, (due, next(self._order), run))

    def _loop(self) -> None:
        while True:
            for due, run in self._take_due():
                if run.step():
                    with self._changed:
                        self._push(due + self._delay_s, run)  # fixed rate, not sleep drift

    def _take_due(self) -> list[tuple[float, _Run]]:
        """The runs whose next token is due (within a quantum), waiting until there is one."""
        with self._changed:
            while True:
                wait = self._due[0][0] - time.perf_counter() if self._due else None
                if wait is not None and wait <= STEP_QUANTUM_S:
                    break
                self._changed.wait(wait)
            horizon = time.perf_counter() + STEP_QUANTUM_S
            taken = []
            while self._due and self._due[0][0] <= horizon:
                due, _, run = heapq.heappop(self._due)
                taken.append((due, run))
            return taken
