"""The output file: OpenAI Batch API output lines, appended as jobs end, and read back to resume a run.

A line: ``{"id": "batch_req_<job id>", "custom_id": ..., "response": {"status_code": 200, "request_id": <job
id>, "body": <chat.completion>}, "error": null}``; a failed request has ``"response": null`` and ``"error":
{"code": <FastChat error code>, "type": ..., "message": ...}``. A bad input line's error line also carries
``"input_line"`` (its custom_id may be missing or a repeat), and is matched to its input by that number.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from broker_batch.lines import BadLine, Request
from broker_worker.protocol.errors import ErrorCode
from broker_worker.protocol.messages import Failed, Usage


@dataclass
class Answered:
    """What an output file already holds."""

    custom_ids: set[str] = field(default_factory=set)
    input_lines: set[int] = field(default_factory=set)
    rows: int = 0
    errors: int = 0

    def add(self, row: dict[str, Any]) -> None:
        self.rows += 1
        self.errors += bool(row.get("error"))
        if isinstance(row.get("input_line"), int):
            self.input_lines.add(row["input_line"])
        elif isinstance(row.get("custom_id"), str):
            self.custom_ids.add(row["custom_id"])

    def has(self, number: int, custom_id: str | None, first: bool) -> bool:
        """Whether input line ``number`` is answered; ``first``: the first line with its custom_id (a repeat is
        answered only by its own error line)."""
        return number in self.input_lines or (first and custom_id is not None and custom_id in self.custom_ids)


class ResultFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.answered = Answered()
        self._file: TextIO | None = None

    def read(self) -> Answered:
        """What the file holds now, in whole lines (a line torn by a kill is not counted); changes nothing."""
        answered = Answered()
        for text in self._complete().decode("utf-8", "replace").splitlines():
            row = _row(text)
            if row is not None:
                answered.add(row)
        return answered

    def open(self) -> Answered:
        """Read what a previous run wrote, cut off a line torn by a kill, and open the file for appending."""
        complete = self._complete()
        if self.path.exists() and self.path.stat().st_size > len(complete):
            os.truncate(self.path, len(complete))
        self.answered = self.read()
        self._file = self.path.open("a", encoding="utf-8")
        return self.answered

    def _complete(self) -> bytes:
        if not self.path.exists():
            return b""
        data = self.path.read_bytes()
        return data[: data.rfind(b"\n") + 1]

    def write(self, row: dict[str, Any]) -> None:
        """One line in one write, flushed: a reader (or a re-run after kill -9) sees whole lines only."""
        assert self._file is not None, "open() first"
        self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._file.flush()
        self.answered.add(row)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _row(text: str) -> dict[str, Any] | None:
    try:
        row = json.loads(text)
    except ValueError:
        return None
    return row if isinstance(row, dict) else None


def answer_row(request: Request, text: str, finish_reason: str, usage: Usage) -> dict[str, Any]:
    """A done job, as the gateway's ``/v1/chat/completions`` answers it."""
    job = request.job
    body = {
        "id": f"chatcmpl-{job.id}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": job.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}],
        "usage": usage.with_total(),
    }
    response = {"status_code": 200, "request_id": job.id, "body": body}
    return {"id": f"batch_req_{job.id}", "custom_id": request.custom_id, "response": response, "error": None}


def failed_row(request: Request, event: Failed | None) -> dict[str, Any]:
    """A job that failed (``event``) or was cancelled (None)."""
    error: dict[str, object]
    if event is None:
        error = {"code": None, "type": "cancelled", "message": f"job {request.job.id} was cancelled"}
    else:
        error = {"code": event.error_code, "type": _type(event.error_code), "message": event.message}
    return {"id": f"batch_req_{request.job.id}", "custom_id": request.custom_id, "response": None, "error": error}


def bad_line_row(bad: BadLine) -> dict[str, Any]:
    error = {"code": int(bad.error.code), "type": _type(bad.error.code), "message": bad.error.message}
    row: dict[str, Any] = {"id": f"batch_req_line_{bad.number}", "custom_id": bad.custom_id, "response": None}
    return row | {"error": error, "input_line": bad.number}


def _type(code: int) -> str:
    try:
        return ErrorCode(code).name.lower()
    except ValueError:
        return "error"
