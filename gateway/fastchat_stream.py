"""Events to the FastChat worker protocol's wire format: cumulative ``text`` chunks, each followed by a NUL byte."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from json.encoder import encode_basestring as quote  # json.dumps(str, ensure_ascii=False), minus its wrappers

from redis.exceptions import RedisError

from broker_worker.protocol.errors import ErrorCode, JobError
from broker_worker.protocol.messages import Event
from gateway.errors import fastchat_chunk


async def fastchat_chunks(events: AsyncIterator[Event], job_id: str, echo: str = "") -> AsyncIterator[bytes]:
    """The last chunk carries ``finish_reason`` and ``usage``, or a non-zero ``error_code`` with the cause.

    Every chunk also carries ``job_id`` and ``seq``, so a client that loses the connection can resume with
    ``GET /jobs/{job_id}/stream?after={seq}``. ``echo`` (FastChat's echo: the prompt) starts every text.
    """
    text = echo
    frame = _DeltaFrame(echo, job_id)
    try:
        async for event in events:
            if event.type == "delta":
                text += event.text
                yield frame.add(event.text, event.seq) or fastchat_chunk(text, 0, job_id=job_id, seq=event.seq)
            elif event.type == "done":
                yield fastchat_chunk(
                    text,
                    0,
                    job_id=job_id,
                    seq=event.seq,
                    finish_reason=event.finish_reason,
                    usage=event.usage.with_total(),
                )
            elif event.type == "failed":
                yield fastchat_chunk(event.message, event.error_code, job_id=job_id, seq=event.seq)
            elif event.type == "cancelled":
                yield fastchat_chunk(text, 0, job_id=job_id, seq=event.seq, finish_reason="cancelled")
    except JobError as exc:
        yield fastchat_chunk(exc.message, exc.code, job_id=job_id)
    except (RedisError, OSError) as exc:
        yield fastchat_chunk(f"Redis unavailable: {exc}", ErrorCode.INTERNAL_ERROR, job_id=job_id)


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
