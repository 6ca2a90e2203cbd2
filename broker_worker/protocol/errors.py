"""Error codes (FastChat's ``ErrorCode`` numbers) and the typed exception that carries one."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from enum import IntEnum
from typing import Any

from redis import exceptions as rx


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


#: Redis refusing the client's user (wrong password, a permission its ACL lacks): a setup error, which no retry mends.
USER_REFUSED = (rx.NoPermissionError, rx.AuthenticationError, rx.AuthorizationError)


def redis_failure(exc: BaseException, during: str = "") -> JobError:
    """What a Redis error means to a client, with a code to act on: a full Redis is a refusal to retry later
    (42903, as a full queue), not an outage; a replica, a server loading its data, or a user the ACL does not
    allow are named as such. ``during``: what was being done (" while streaming job x")."""
    said = str(exc)
    if isinstance(exc, rx.OutOfMemoryError):
        message = f"Redis is full (its maxmemory is reached){during}: retry later; its operator must free memory"
        return JobError(ErrorCode.ENGINE_OVERLOADED, f"{message} ({said})", retryable=True)
    if isinstance(exc, rx.BusyLoadingError):
        return JobError(ErrorCode.INTERNAL_ERROR, f"Redis is loading its data set{during}; retry in a moment")
    if isinstance(exc, rx.ReadOnlyError):
        why = "the server is a read-only replica (a failover in progress?)"
        return JobError(ErrorCode.INTERNAL_ERROR, f"Redis refused a write{during}: {why} ({said})")
    if isinstance(exc, USER_REFUSED):
        return JobError(ErrorCode.INTERNAL_ERROR, f"Redis refused the gateway's user{during}: {said}")
    if isinstance(exc, rx.ResponseError):
        return JobError(ErrorCode.INTERNAL_ERROR, f"Redis refused a command{during}: {said}")
    return JobError(ErrorCode.INTERNAL_ERROR, f"Redis is unreachable{during}: {said}")
