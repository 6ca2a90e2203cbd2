"""Logging set-up, done once by the CLIs (libraries only create loggers)."""

from __future__ import annotations

import logging
import sys

from broker_worker.protocol.redaction import redact_text

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class RedactingFormatter(logging.Formatter):
    """Masks the passwords of every URL in a formatted line, traceback included: a log line that prints a
    URL (a Redis URL with ``?password=``, a controller URL with ``user:password@``) never shows the secret,
    whoever wrote the line."""

    def format(self, record: logging.LogRecord) -> str:
        return redact_text(super().format(record))


def configure(level: str = "INFO", log_format: str = "text") -> None:
    """``log_format`` ``json``: one JSON object per line (``log_json``), the job id a field. Both redact secrets."""
    from broker_worker.log_json import JsonFormatter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else RedactingFormatter(FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler])
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
