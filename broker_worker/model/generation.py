"""One generation path for every request: a batch of rows run by one ``model.generate`` call.

A single request is a batch of one; the batcher (``batching``) groups concurrent requests with equal sampling
settings into larger batches. Either way each row streams its own deltas, and ends on its own at one of its end
tokens (EOS, the template's stop token, the job's ``stop_token_ids``), at its own ``max_new_tokens``, or when its
cancel flag is set; the row's ``Finish`` (reason and usage) is decided here and nowhere else.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from transformers.generation.stopping_criteria import StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from broker_worker.model.decoding import IncrementalDecoder
from broker_worker.model.engine import Finish, OnDelta
from broker_worker.protocol.messages import Job

if TYPE_CHECKING:
    from broker_worker.model.internvl_engine import InternVLEngine, Prepared

#: Everything ``model.generate`` applies to a whole batch: sampling, top-k, and the end token ids.
SamplingKey = tuple[bool, float, float, float, int | None, tuple[int, ...]]


@dataclass
class Row:
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

    def result(self) -> Finish:
        """The row's outcome once it is done: its ``Finish``, or the error its batch hit."""
        if self.error is not None:
            raise self.error
        assert self.finish is not None
        return self.finish


class RowStopper(StoppingCriteria):  # type: ignore[misc]
    def __init__(self, rows: list[Row]) -> None:
        self._rows = rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        flags = [r.finish is not None or r.cancel.is_set() for r in self._rows]
        return torch.tensor(flags, dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]


class RowStreamer(BaseStreamer):  # type: ignore[misc]
    """Routes each step's tokens to their rows: decode, stream, and end a row at an end token or its own limit."""

    def __init__(self, rows: list[Row], end_ids: frozenset[int]) -> None:
        self._rows = rows
        self._end_ids = end_ids
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() first passes the prompt (empty when only embeddings go in)
            self._prompt_seen = True
            return
        for row, token_id in zip(self._rows, value.reshape(-1).tolist(), strict=True):
            if row.finish is not None:
                continue
            row.tokens += 1  # the token in flight when a cancel came is still delivered, then the row ends
            if text := row.decoder.push(token_id):
                row.on_delta(text)
            if token_id in self._end_ids:
                row.end("stop")
            elif row.tokens >= row.prepared.max_new_tokens or row.cancel.is_set():
                row.end("length")

    def end(self) -> None:
        for row in self._rows:
            row.end("length")


def new_row(engine: InternVLEngine, job: Job, answer_prefix: str, cancel: threading.Event, on_delta: OnDelta) -> Row:
    """Prepare one request (bad input fails here, in the caller's thread) as a row of a batch."""
    prepared = engine.prepare(job, answer_prefix)
    return Row(job, prepared, cancel, on_delta, IncrementalDecoder(engine.loaded.tokenizer, engine.skip_ids))


def run_batch(engine: InternVLEngine, rows: list[Row]) -> None:
    """Run rows with equal sampling settings (``Row.sampling``) as one left-padded ``model.generate`` call."""
    input_ids, attention_mask = left_pad([r.prepared for r in rows], engine.pad_id())
    pixels = [r.prepared.pixel_values for r in rows if r.prepared.pixel_values is not None]
    engine.run_generate(
        rows[0].job,
        input_ids,
        attention_mask,
        torch.cat(pixels) if pixels else None,
        max(r.prepared.max_new_tokens for r in rows),
        RowStreamer(rows, engine.stop_ids(rows[0].job)),  # rows of a batch share their end token ids
        RowStopper(rows),
    )


def left_pad(prepared: list[Prepared], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(int(p.input_ids.shape[1]) for p in prepared)
    ids = torch.full((len(prepared), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prepared), width), dtype=torch.long)
    for i, p in enumerate(prepared):
        n = int(p.input_ids.shape[1])
        ids[i, width - n :] = p.input_ids[0]
        mask[i, width - n :] = p.attention_mask[0]
    return ids, mask
