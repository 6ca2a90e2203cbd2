"""``--log-format json``: workers and the gateway write one JSON object per line, the job id a field."""

from __future__ import annotations

import json

import httpx
import redis

from tests.helpers import Proc, job, submit, wait_terminal


def lines(proc: Proc) -> list[dict[str, object]]:
    text = proc.log().strip()
    assert text, f"{proc.name} wrote nothing"
    return [json.loads(line) for line in text.splitlines()]  # every line parses, or this raises


def test_worker_logs_json_with_job_id(start_worker, r: redis.Redis) -> None:  # type: ignore[no-untyped-def]
    worker = start_worker(delay=0.001, extra=["--log-format", "json"])
    submit(r, job("log-1", tokens=3))
    wait_terminal(r, "log-1")
    assert worker.stop() == 0
    records = lines(worker)
    about = [x for x in records if str(x["message"]).startswith("job log-1 ")]
    assert [str(x["message"]).split()[2] for x in about] == ["received", "started", "done"]
    assert all(x["job_id"] == "log-1" and x["level"] == "INFO" for x in about)
    assert {"ts", "level", "logger", "message"} <= set(records[0])


def test_gateway_logs_json(start_worker, start_gateway) -> None:  # type: ignore[no-untyped-def]
    start_worker(delay=0.001)
    gateway, base = start_gateway("--log-format", "json")
    assert httpx.get(base + "/health", timeout=5).status_code == 200
    gateway.stop()
    loggers = {x["logger"] for x in lines(gateway)}
    assert {"gateway", "uvicorn.error"} <= loggers  # uvicorn's own lines are JSON too
