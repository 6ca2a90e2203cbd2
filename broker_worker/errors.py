"""Error codes (FastChat's ``ErrorCode`` numbers) and the typed exception that carries one."""

from __future__ import annotations

from enum import IntEnum


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
