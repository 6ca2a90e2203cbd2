"""Input lines in the OpenAI Batch API format become jobs, or the typed error of a bad line.

A line: ``{"custom_id": "...", "method": "POST", "url": "/v1/chat/completions", "body": {<chat request>}}``.
The body becomes a job exactly as the gateway's ``/v1/chat/completions`` makes it (``gateway.validation``), so
a line's answer is the one the same request gets alone; images may also be local file paths, relative to the
input file. A job's id is derived from the line itself, so running the same file again finds its jobs in Redis
instead of queueing them twice.
"""

from __future__ import annotations

import base64
import hashlib
import json
import mimetypes
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from pydantic import ValidationError

from broker_worker.protocol.errors import ErrorCode, JobError, invalid
from broker_worker.protocol.images import DEFAULT_LIMITS
from broker_worker.protocol.messages import Job, Priority
from gateway.openai_request import OpenAIChatRequest, openai_job
from gateway.settings import GatewaySettings
from gateway.validation import validation_error

CHAT_URL = "/v1/chat/completions"
MAX_CUSTOM_ID_CHARS = 512


@dataclass(frozen=True)
class Request:
    """A line that became a job."""

    number: int  # 1-based line number in the input file
    custom_id: str
    job: Job


@dataclass(frozen=True)
class BadLine:
    """A line that cannot run; its output line carries ``error``."""

    number: int
    custom_id: str | None
    error: JobError


Parsed = Request | BadLine


@dataclass(frozen=True)
class Options:
    base_dir: Path  # where image paths are relative to: the input file's directory
    model: str | None = None  # replaces every body's model
    priority: Priority = "batch"
    #: The limits a gateway would apply (its settings from the environment, or its defaults); read once.
    settings: GatewaySettings = field(default_factory=GatewaySettings)


def read(path: Path, options: Options, answered: Callable[[int, str | None, bool], bool]) -> Iterator[Parsed]:
    """The input's lines that ``answered(number, custom_id, first)`` does not skip, parsed one at a time (images
    are read only when their line's turn comes). A repeated custom_id is a bad line."""
    for line in scan(path):
        if answered(line.number, line.custom_id, line.first):
            continue
        if isinstance(line.value, JobError):
            yield BadLine(line.number, None, line.value)
        elif line.custom_id is not None and not line.first:
            message = f"line {line.number}: custom_id {line.custom_id!r} is used by an earlier line"
            yield BadLine(line.number, line.custom_id, invalid(message))
        else:
            yield parse(line.value, line.number, line.custom_id, options)


@dataclass(frozen=True)
class Line:
    number: int
    value: object  # the line's JSON, or the JobError of a line that is not JSON
    custom_id: str | None
    first: bool  # the first line with this custom_id

    def job_id(self, options: Options) -> str | None:
        """The id its job has (without reading its images), or None for a line that makes no job."""
        if not isinstance(self.value, dict) or self.custom_id is None or not self.first:
            return None
        try:
            return job_id(self.custom_id, request_body(self.value, options))
        except JobError:
            return None


def scan(path: Path) -> Iterator[Line]:
    """Every non-blank line, with its custom_id and whether it is the first line to use it."""
    seen: set[str] = set()
    for number, value in numbered(path):
        custom_id = custom_id_of(value)
        first = custom_id is not None and custom_id not in seen
        if custom_id is not None:
            seen.add(custom_id)
        yield Line(number, value, custom_id, first)


def numbered(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, its JSON value or the JobError of a line that is not JSON), skipping blank lines."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                yield number, json.loads(raw.decode("utf-8"))
            except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
                yield number, invalid(f"line {number} is not JSON ({type(exc).__name__}: {str(exc)[:200]})")


def custom_id_of(value: object) -> str | None:
    """A line's usable custom_id, or None."""
    if not isinstance(value, dict):
        return None
    cid = value.get("custom_id")
    return cid if isinstance(cid, str) and 0 < len(cid) <= MAX_CUSTOM_ID_CHARS else None


def parse(value: object, number: int, custom_id: str | None, options: Options) -> Parsed:
    try:
        if custom_id is None or not isinstance(value, dict):
            raise invalid(f"line {number}: custom_id must be a string of 1 to {MAX_CUSTOM_ID_CHARS} characters")
        return Request(number, custom_id, to_job(custom_id, request_body(value, options), options))
    except JobError as exc:
        return BadLine(number, custom_id, exc)


def request_body(line: dict[str, Any], options: Options) -> dict[str, Any]:
    """The line's chat request (``--model`` applied), once its method and url are the ones served."""
    method, url, body = line.get("method", "POST"), line.get("url"), line.get("body")
    if method != "POST":
        raise invalid(f"method {str(method)[:100]!r}: only POST is supported")
    if url != CHAT_URL:
        raise invalid(f"url {str(url)[:200]!r}: only {CHAT_URL} is supported")
    if not isinstance(body, dict):
        raise invalid("body must be a JSON object (the chat completion request)")
    return {**body, "model": options.model} if options.model else body


def to_job(custom_id: str, body: dict[str, Any], options: Options) -> Job:
    resolved = {**body, "messages": with_image_files(body.get("messages"), options.base_dir)}
    try:
        request = OpenAIChatRequest.model_validate(resolved)
    except ValidationError as exc:
        raise validation_error(exc) from exc
    job = openai_job(request, options.settings)
    # Batch jobs wait as long as the batch does: no start deadline (the gateway's is for a waiting client).
    return job.model_copy(update={"id": job_id(custom_id, body), "deadline_ms": None, "priority": options.priority})


def job_id(custom_id: str, body: dict[str, Any]) -> str:
    """The same line (custom_id and request, with the effective model) always gets the same id."""
    canonical = json.dumps({"custom_id": custom_id, "body": body}, sort_keys=True, ensure_ascii=False)
    return "batch-" + hashlib.sha256(canonical.encode()).hexdigest()[:32]


def with_image_files(messages: object, base_dir: Path) -> object:
    """``messages`` with every ``image_url`` that is a local file path (or ``file://`` URL) read into a data: URL;
    anything that is not a list of messages is left for validation to refuse."""
    if not isinstance(messages, list):
        return messages
    out = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            message = {**message, "content": [_with_file(part, base_dir) for part in content]}
        out.append(message)
    return out


def _with_file(part: object, base_dir: Path) -> object:
    if not isinstance(part, dict) or not isinstance(part.get("image_url"), dict):
        return part
    image = part["image_url"]
    url = image.get("url")
    if not isinstance(url, str) or url.startswith("data:"):
        return part
    return {**part, "image_url": {**image, "url": file_data_url(url, base_dir)}}


def file_data_url(url: str, base_dir: Path) -> str:
    """A local image file as a data: URL; only regular files are read (never a device or a fifo)."""
    shown, parts = url[:200], urlsplit(url)
    if parts.scheme not in ("", "file") and url.startswith(f"{parts.scheme}://"):  # "c:/x", "a:b.png": paths
        raise invalid(f"image_url {shown!r}: remote images are not fetched; give a data: URL or a file path")
    path = Path(unquote(parts.path)) if parts.scheme == "file" else Path(url)
    path = path if path.is_absolute() else base_dir / path
    try:
        if not path.is_file():
            raise invalid(f"image file {shown!r} not found (looked for {path})")
        size = path.stat().st_size
        if size > DEFAULT_LIMITS.max_bytes:
            raise invalid(f"image file {shown!r} is {size} bytes; the limit is {DEFAULT_LIMITS.max_bytes}")
        data = path.read_bytes()
    except (OSError, ValueError) as exc:  # unreadable, or a path Python refuses (a NUL byte in it)
        raise JobError(ErrorCode.VALIDATION_TYPE_ERROR, f"image file {shown!r}: {exc}") from exc
    mime = mimetypes.guess_type(path.name)[0] or "image/png"
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"
