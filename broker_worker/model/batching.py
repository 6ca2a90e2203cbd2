"""Batched generation: concurrent jobs with the same sampling settings share one ``model.generate`` call.

``BatchingEngine`` keeps the ``Engine`` interface: each job's ``generate()`` (on its own executor thread)
prepares its prompt, queues itself and blocks until *its* row is finished, streaming its own deltas meanwhile.
One batching thread takes the waiting requests, groups those whose sampling settings match (transformers
samples a whole batch with one temperature / top_p / top_k / repetition penalty and one set of end token
ids) and runs them with ``generation.run_batch``, the path a single request takes as a batch of one. A
finished row's job returns at once while the rest of the batch goes on. Jobs that arrive while a batch runs
wait for the next one (static batching).
"""

from __future__ import annotations

import logging
import queue
import threading

from broker_worker.model.engine import Finish, OnDelta
from broker_worker.model.generation import Row, new_row, run_batch
from broker_worker.model.internvl_engine import InternVLEngine
from broker_worker.model.stops import generate_with_stops
from broker_worker.protocol.errors import JobError
from broker_worker.protocol.messages import Job

log = logging.getLogger("broker_worker.model.batching")


class BatchingEngine:
    def __init__(self, engine: InternVLEngine, max_batch: int) -> None:
        self.inner = engine
        self.model_name = engine.model_name
        self.device = engine.device
        self.context_len = engine.context_len
        self.max_batch = max_batch
        self._queue: queue.Queue[Row] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="batcher", daemon=True)
        self._thread.start()

    def count_tokens(self, job: Job) -> int:
        return self.inner.count_tokens(job)

    def generate(self, job: Job, answer_prefix: str, cancel: threading.Event, on_delta: OnDelta) -> Finish:
        return generate_with_stops(
            job, answer_prefix, cancel, on_delta, lambda flag, out: self._generate(job, answer_prefix, flag, out)
        )

    def _generate(self, job: Job, answer_prefix: str, cancel: threading.Event, on_delta: OnDelta) -> Finish:
        row = new_row(self.inner, job, answer_prefix, cancel, on_delta)
        self._queue.put(row)
        row.done.wait()
        return row.result()

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            try:
                self._run(batch)
            except JobError as exc:  # CUDA OOM: every row is retried
                self._fail(batch, exc)
            except Exception as exc:  # every row learns what went wrong; the batcher keeps going
                log.exception("batched generation failed")
                self._fail(batch, exc)

    def _next_batch(self) -> list[Row]:
        """The oldest waiting request and every waiting one with the same sampling settings, up to max_batch."""
        first = self._queue.get()
        batch: list[Row] = [first]
        others: list[Row] = []
        while True:
            try:
                row = self._queue.get_nowait()
            except queue.Empty:
                break
            (batch if row.sampling == first.sampling and len(batch) < self.max_batch else others).append(row)
        for row in others:  # back in the queue, in order, for the next batch
            self._queue.put(row)
        return batch

    def _fail(self, batch: list[Row], exc: BaseException) -> None:
        for row in batch:
            if row.finish is None:
                row.error = exc
                row.done.set()

    def _run(self, rows: list[Row]) -> None:
        run_batch(self.inner, rows)
