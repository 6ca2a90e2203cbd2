"""The gateway's per-event stream frames are built without re-encoding whole objects (bench/capacity.py); they must
be byte for byte what encoding the whole object gives, for any text a model can produce."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from broker_worker.protocol.messages import Delta, Done, Event, Job, Usage
from gateway.errors import fastchat_chunk
from gateway.fastchat_stream import FastChatFrames
from gateway.openai_stream import OpenAIFrames
from gateway.streaming import frame_chunks

PIECES = ["plain ", 'quote" ', "back\\slash ", "line\nbreak\r\t", "\x00\x1f\x7f ", "é中文 ", "🙂 ", "\u2028\u2029", ""]


async def _events(pieces: list[str]) -> AsyncIterator[Event]:
    for seq, piece in enumerate(pieces, start=2):
        yield Delta(seq=seq, text=piece)
    yield Done(seq=len(pieces) + 2, finish_reason="length", usage=Usage(prompt_tokens=1, completion_tokens=2))


async def _collect(stream: AsyncIterator[bytes]) -> list[bytes]:
    return [chunk async for chunk in stream if chunk]  # b"": an event the format does not show


def test_fastchat_delta_chunks_equal_whole_encoding() -> None:
    echo = 'prompt "echoed"\n'
    got = asyncio.run(_collect(frame_chunks(_events(PIECES), FastChatFrames("job-1", echo))))
    text, expected = echo, []
    for seq, piece in enumerate(PIECES, start=2):
        text += piece
        expected.append(fastchat_chunk(text, 0, job_id="job-1", seq=seq))
    assert got[: len(PIECES)] == expected


def test_fastchat_lone_surrogate_falls_back_to_escaped_encoding() -> None:
    pieces = ["ok ", "\ud800 ", "after "]
    got = asyncio.run(_collect(frame_chunks(_events(pieces), FastChatFrames("job-2"))))
    assert got[1] == fastchat_chunk("ok \ud800 ", 0, job_id="job-2", seq=3)
    assert got[2] == fastchat_chunk("ok \ud800 after ", 0, job_id="job-2", seq=4)
    assert b"\\ud800" in got[2]


def test_openai_delta_events_equal_whole_encoding() -> None:
    job = Job(id="job-3", model='m"odel', prompt=[{"role": "user", "content": "hi"}])
    got = asyncio.run(_collect(frame_chunks(_events(PIECES), OpenAIFrames(job, include_usage=False))))
    deltas = got[1 : 1 + len(PIECES)]
    for piece, frame in zip(PIECES, deltas, strict=True):
        created = json.loads(frame[6:])["created"]
        body = {
            "id": "chatcmpl-job-3",
            "object": "chat.completion.chunk",
            "created": created,
            "model": 'm"odel',
            "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}],
        }
        assert frame == b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n"
