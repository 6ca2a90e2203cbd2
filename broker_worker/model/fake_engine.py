"""A deterministic engine for the broker's mechanics: fixed text, fixed per-token delay, real cancel/resume.

Its text for a job is a function of the job alone, so a resumed job can be checked for prefix consistency.
Questions starting with a trigger make it misbehave on purpose: ``fail:`` raises a typed JobError (50001),
``oom:`` a retryable CUDA OOM, ``crash:`` a plain exception (the worker's catch-all error boundary), and ``eos:``
ends the answer early with ``finish_reason: "stop"`` as a model that emits its end-of-sequence token does.
``clock:`` makes every token the wall-clock time it was produced (``@1764000000.123456 ``, fixed width), so a
benchmark client on the same machine can tell how long each token took to reach it (bench/capacity.py).
"""

from __future__ import annotations

import threading
import time

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
        deadline = time.perf_counter()
        for token in tokens[start:]:
            if cancel.is_set():
                break
            if self.token_delay_s:
                deadline += self.token_delay_s  # fixed rate, not sleep drift
                time.sleep(max(0.0, deadline - time.perf_counter()))
            on_delta(f"@{time.time():.6f} " if clock else token)
        reason: FinishReason = "stop" if question.startswith("eos:") else "length"
        return Finish(reason, Usage(prompt_tokens=len(question), completion_tokens=len(tokens)))
