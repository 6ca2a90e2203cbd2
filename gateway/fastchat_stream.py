"""Events to the FastChat worker protocol's wire format: cumulative ``text`` chunks, each followed by a NUL byte."""

from __future__ import annotations

import json
from json.encoder import encode_basestring as quote  # json.dumps(str, ensure_ascii=False), minus its wrappers

from broker_worker.protocol.messages import Delta, Event
from gateway.errors import fastchat_chunk


class FastChatFrames:
    """The last chunk carries ``finish_reason`` and ``usage``, or a non-zero ``error_code`` with the cause.

    Every chunk also carries ``job_id`` and ``seq``, so a client that loses the connection can resume with
    ``GET /jobs/{job_id}/stream?after={seq}``. ``echo`` (FastChat's echo: the prompt) starts every text.
    """

    def __init__(self, job_id: str, echo: str = "") -> None:
        self._job_id = job_id
        self._pieces = [echo]  # joined only for the last chunk: a delta's chunk is built from escaped pieces
        self._frame = _DeltaFrame(echo, job_id)

    def opening(self) -> bytes:
        return b""

    def delta(self, event: Delta) -> bytes:
        self._pieces.append(event.text)
        return self._frame.add(event.text, event.seq) or self._chunk(event.seq)

    def event(self, event: Event) -> bytes:
        if event.type == "delta":
            return self.delta(event)
        if event.type == "done":
            return self._chunk(event.seq, finish_reason=event.finish_reason, usage=event.usage.with_total())
        if event.type == "failed":
            return fastchat_chunk(event.message, event.error_code, job_id=self._job_id, seq=event.seq)
        if event.type == "cancelled":
            return self._chunk(event.seq, finish_reason="cancelled")
        return b""  # started: nothing to show

    def failure(self, code: int, message: str) -> bytes:
        return fastchat_chunk(message, code, job_id=self._job_id)

    def closing(self) -> bytes:
        return b""

    def _chunk(self, seq: int, **extra: object) -> bytes:
        return fastchat_chunk("".join(self._pieces), 0, job_id=self._job_id, seq=seq, **extra)


class _DeltaFrame:
    """A delta's chunk with the cumulative text escaped once per piece, not re-encoded whole every event.

    JSON escapes each character on its own, so the escaped text is the concatenation of the escaped pieces and
    the bytes equal ``fastchat_chunk(text, 0, job_id=..., seq=...)``'s. Text ``str.encode`` refuses (a lone
    surrogate) gives None: the caller falls back to ``fastchat_chunk``, which escapes it.
    """

    def __init__(self, echo: str, job_id: str) -> None:
        self._escaped = _escape(echo)
        self._tail = '", "error_code": 0, "job_id": ' + json.dumps(job_id, ensure_ascii=False) + ', "seq": '

    def add(self, piece: str, seq: int) -> bytes | None:
        self._escaped += _escape(piece)
        try:
            return ('{"text": "' + self._escaped + self._tail + str(seq) + "}\0").encode()
        except UnicodeEncodeError:
            return None


def _escape(text: str) -> str:
    """``text`` as the inside of a JSON string literal (``json.dumps(text, ensure_ascii=False)`` unquoted)."""
    return quote(text)[1:-1]
