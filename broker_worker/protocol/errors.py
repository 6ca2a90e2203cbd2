"""Error codes (FastChat's ``ErrorCode`` numbers) and the typed exception that carries one."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from enum import IntEnum
from typing import Any


class ErrorCode(IntEnum):
    OK = 0
    VALIDATION_TYPE_ERROR = 40001
    INVALID_AUTH_KEY = 40101
    INVALID_MODEL = 40301
    PARAM_OUT_OF_RANGE = 40302
    CONTEXT_OVERFLOW = 40303
    RATE_LIMIT = 42901
    ENGINE_OVERLOADED = 42903
    INTERNAL_ERROR = 50001
    CUDA_OUT_OF_MEMORY = 50002
    CONTROLLER_NO_WORKER = 50005
    CONTROLLER_WORKER_TIMEOUT = 50006


class JobError(Exception):
    """A failure with a code a client can act on; ``str(err)`` is the real cause, shown to the user."""

    def __init__(self, code: ErrorCode, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable

    def __repr__(self) -> str:
        return f"JobError({self.code.name}, {self.message!r})"


def invalid(message: str) -> JobError:
    return JobError(ErrorCode.VALIDATION_TYPE_ERROR, message)


def describe_problems(errors: Iterable[Mapping[str, Any]], *, skip: Collection[object] = (), empty: str = "") -> str:
    """``loc: msg; …`` for the first five problems pydantic found; ``skip`` drops location parts (FastAPI's
    ``body``), ``empty`` names a problem with no location left."""
    parts = []
    for error in list(errors)[:5]:
        where = ".".join(str(p) for p in error.get("loc", ()) if p not in skip) or empty
        parts.append(f"{where}: {error.get('msg', '')}")
    return "; ".join(parts)
