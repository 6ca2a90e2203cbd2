"""Errors as each protocol expects them: FastChat worker chunks (``json + \\0``) and OpenAI error objects."""

from __future__ import annotations

import json
from typing import Any

from fastapi.responses import Response

from broker_worker.protocol.errors import ErrorCode, JobError

_HTTP_STATUS: dict[int, int] = {
    ErrorCode.VALIDATION_TYPE_ERROR: 400,
    ErrorCode.INVALID_AUTH_KEY: 401,
    ErrorCode.INVALID_MODEL: 404,
    ErrorCode.PARAM_OUT_OF_RANGE: 400,
    ErrorCode.CONTEXT_OVERFLOW: 400,
    ErrorCode.RATE_LIMIT: 429,
    ErrorCode.ENGINE_OVERLOADED: 429,
    ErrorCode.CONTROLLER_NO_WORKER: 503,
    ErrorCode.CONTROLLER_WORKER_TIMEOUT: 504,
}


def http_status(code: int) -> int:
    return _HTTP_STATUS.get(code, 500)


def json_bytes(body: object) -> bytes:
    """UTF-8 JSON; a lone surrogate (echoed from hostile input) is escaped instead of failing the encode."""
    try:
        return json.dumps(body, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return json.dumps(body).encode()


def fastchat_chunk(text: str, error_code: int = 0, **extra: Any) -> bytes:
    return json_bytes({"text": text, "error_code": int(error_code), **extra}) + b"\0"


def fastchat_error(err: JobError, status_code: int | None = None) -> Response:
    """A FastChat worker-protocol error: one chunk, parseable by clients that split on NUL and by plain JSON readers."""
    return Response(
        fastchat_chunk(err.message, err.code),
        status_code=status_code or http_status(err.code),
        media_type="application/json",
    )


def openai_error(err: JobError) -> Response:
    body = {"error": {"message": err.message, "type": ErrorCode(err.code).name.lower(), "code": int(err.code)}}
    return Response(json_bytes(body), status_code=http_status(err.code), media_type="application/json")
