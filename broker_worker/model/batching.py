"""Batched generation: concurrent jobs with the same sampling settings share one ``model.generate`` call.

``BatchingEngine`` keeps the ``Engine`` interface: each job's ``generate()`` (on its own executor thread)
prepares its prompt, queues itself and blocks until *its* row is finished, streaming its own deltas meanwhile.
One batching thread takes the waiting requests, groups those whose sampling settings match (transformers
samples a whole batch with one temperature / top_p / top_k / repetition penalty and one set of end token
ids), left-pads them and runs them together. Each row stops on its own (EOS, its own ``max_new_tokens``, its
cancel flag or stop string) through a per-row stopping criterion; a finished row's job returns at once while
the rest of the batch goes on. Jobs that arrive while a batch runs wait for the next one (static batching).
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.generation.stopping_criteria import StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from broker_worker.model.decoding import IncrementalDecoder
from broker_worker.model.engine import Finish, OnDelta
from broker_worker.model.internvl_engine import InternVLEngine, Prepared
from broker_worker.model.stops import generate_with_stops
from broker_worker.protocol.errors import JobError
from broker_worker.protocol.messages import Job

log = logging.getLogger("broker_worker.model.batching")
# Everything ``model.generate`` applies to a whole batch: sampling, top-k, and the end token ids.
SamplingKey = tuple[bool, float, float, float, int | None, tuple[int, ...]]


@dataclass
class _Row:
    job: Job
    prepared: Prepared
    cancel: threading.Event
    on_delta: OnDelta
    decoder: IncrementalDecoder
    done: threading.Event = field(default_factory=threading.Event)
    finish: Finish | None = None
    error: BaseException | None = None
    tokens: int = 0

    @property
    def sampling(self) -> SamplingKey:
        j = self.job
        sampled = j.temperature > 0
        return (
            sampled,
            j.temperature if sampled else 0.0,
            j.top_p,
            j.repetition_penalty,
            j.top_k if sampled else None,
            tuple(sorted(set(j.stop_token_ids))),
        )

    def end(self, reason: str) -> None:
        if self.finish is None:
            if text := self.decoder.flush():
                self.on_delta(text)
            self.finish = Finish("stop" if reason == "stop" else "length", self.prepared.usage(self.tokens))
            self.done.set()


class _RowStopper(StoppingCriteria):  # type: ignore[misc]
    def __init__(self, rows: list[_Row]) -> None:
        self._rows = rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        flags = [r.finish is not None or r.cancel.is_set() for r in self._rows]
        return torch.tensor(flags, dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]


class _RowStreamer(BaseStreamer):  # type: ignore[misc]
    """Routes each step's tokens to their rows: decode, stream, and end a row at EOS or its own limit."""

    def __init__(self, rows: list[_Row], eos_ids: frozenset[int]) -> None:
        self._rows = rows
        self._eos = eos_ids
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        for row, token_id in zip(self._rows, value.reshape(-1).tolist(), strict=True):
            if row.finish is not None:
                continue
            if row.cancel.is_set():
                row.end("length")
                continue
            row.tokens += 1
            if text := row.decoder.push(token_id):
                row.on_delta(text)
            if token_id in self._eos:
                row.end("stop")
            elif row.tokens >= row.prepared.max_new_tokens:
                row.end("length")

    def end(self) -> None:
        for row in self._rows:
            row.end("length")


class BatchingEngine:
    def __init__(self, engine: InternVLEngine, max_batch: int) -> None:
        self.inner = engine
        self.model_name = engine.model_name
        self.device = engine.device
        self.context_len = engine.context_len
        self.max_batch = max_batch
        self._queue: queue.Queue[_Row] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="batcher", daemon=True)
        self._thread.start()

    def count_tokens(self, job: Job) -> int:
        return self.inner.count_tokens(job)

    def generate(self, job: Job, answer_prefix: str, cancel: threading.Event, on_delta: OnDelta) -> Finish:
        return generate_with_stops(
            job, answer_prefix, cancel, on_delta, lambda flag, out: self._generate(job, answer_prefix, flag, out)
        )

    def _generate(self, job: Job, answer_prefix: str, cancel: threading.Event, on_delta: OnDelta) -> Finish:
        prepared = self.inner.prepare(job, answer_prefix)  # bad input fails here, in the job's own thread
        decoder = IncrementalDecoder(self.inner.loaded.tokenizer, self.inner.skip_ids)
        row = _Row(job, prepared, cancel, on_delta, decoder)
        self._queue.put(row)
        row.done.wait()
        if row.error is not None:
            raise row.error
        assert row.finish is not None
        return row.finish

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

    def _next_batch(self) -> list[_Row]:
        """The oldest waiting request and every waiting one with the same sampling settings, up to max_batch."""
        first = self._queue.get()
        batch: list[_Row] = [first]
        others: list[_Row] = []
        while True:
            try:
                row = self._queue.get_nowait()
            except queue.Empty:
                break
            (batch if row.sampling == first.sampling and len(batch) < self.max_batch else others).append(row)
        for row in others:  # back in the queue, in order, for the next batch
            self._queue.put(row)
        return batch

    def _fail(self, batch: list[_Row], exc: BaseException) -> None:
        for row in batch:
            if row.finish is None:
                row.error = exc
                row.done.set()

    def _run(self, rows: list[_Row]) -> None:
        engine = self.inner
        input_ids, attention_mask = self._left_pad([r.prepared for r in rows], engine.pad_id())
        pixels = [r.prepared.pixel_values for r in rows if r.prepared.pixel_values is not None]
        engine.run_generate(
            rows[0].job,
            input_ids,
            attention_mask,
            torch.cat(pixels) if pixels else None,
            max(r.prepared.max_new_tokens for r in rows),
            _RowStreamer(rows, engine.stop_ids(rows[0].job)),  # rows of a batch share their stop token ids
            _RowStopper(rows),
        )

    @staticmethod
    def _left_pad(prepared: list[Prepared], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(int(p.input_ids.shape[1]) for p in prepared)
        ids = torch.full((len(prepared), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(prepared), width), dtype=torch.long)
        for i, p in enumerate(prepared):
            n = int(p.input_ids.shape[1])
            ids[i, width - n :] = p.input_ids[0]
            mask[i, width - n :] = p.attention_mask[0]
        return ids, mask
