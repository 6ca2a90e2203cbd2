"""``--log-format json``: one JSON object per line, for log shippers (Loki, Elasticsearch, CloudWatch).

The job id is a field of its own (``job_id``), as are the entry and worker ids. Log calls name them in their
message (``log.info("job %s started …", job_id)``), so the formatter takes them from the first argument of a
message that starts with ``job %s`` / ``entry %s`` / ``worker %s``; a call may also pass ``extra={"job_id": …}``.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from broker_worker.protocol.redaction import redact_text

#: Message prefix → the field its first argument fills.
ID_FIELDS = {"job %s": "job_id", "entry %s": "entry_id", "worker %s": "worker_id"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(ids(record))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return redact_text(json.dumps(line, ensure_ascii=False, default=str))  # a URL's password never shows


def ids(record: logging.LogRecord) -> dict[str, str]:
    found = {name: str(getattr(record, name)) for name in ID_FIELDS.values() if hasattr(record, name)}
    message = record.msg if isinstance(record.msg, str) else ""
    args = record.args if isinstance(record.args, tuple) else ()
    for prefix, name in ID_FIELDS.items():
        if message.startswith(prefix) and args and name not in found:
            found[name] = str(args[0])
    return found
