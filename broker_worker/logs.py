"""Logging set-up, done once by the CLIs (libraries only create loggers)."""

from __future__ import annotations

import logging
import sys


def configure(level: str = "INFO", log_format: str = "text") -> None:
    """``log_format`` ``json``: one JSON object per line (``log_json``), the job id a field."""
    from broker_worker.log_json import JsonFormatter

    handler = logging.StreamHandler(sys.stderr)
    text = logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    handler.setFormatter(JsonFormatter() if log_format == "json" else text)
    logging.basicConfig(level=level.upper(), handlers=[handler])
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
