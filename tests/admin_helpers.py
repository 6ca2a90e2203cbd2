"""Running ``broker-admin`` (as ``python -m broker_worker.admin``: the console script is the same ``main``, and the
module form works before the package is reinstalled) and making dead letters the way production makes them."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from tests.helpers import ROOT, Proc, submit, wait_for

DEAD = "ivl:dead"


@dataclass
class Result:
    rc: int
    out: str
    err: str

    @property
    def json(self) -> Any:
        return json.loads(self.out)


def admin(url: str, *args: str, timeout: float = 60) -> Result:
    cmd = [sys.executable, "-m", "broker_worker.admin", "--redis-url", url, *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    return Result(done.returncode, done.stdout, done.stderr)


def status_of(r: redis.Redis, job_id: str) -> str | None:
    value: str | None = r.hget(f"ivl:job:{{{job_id}}}:state", "status")  # type: ignore[assignment]
    return value


def letters(r: redis.Redis) -> list[tuple[str, dict[str, Any]]]:
    return [(i, json.loads(f["letter"])) for i, f in r.xrange(DEAD)]  # type: ignore[union-attr]


def letter_for(r: redis.Redis, job_id: str) -> str | None:
    """The ivl:dead id of the newest letter about ``job_id``."""
    return next((i for i, letter in reversed(letters(r)) if letter.get("job_id") == job_id), None)


def dead_letter_by_kill(
    r: redis.Redis, start_worker: Callable[..., Proc], job: dict[str, Any], tokens_delay: float = 0.2
) -> tuple[str, Proc]:
    """Production's way to a dead letter: the job's worker is kill -9'd mid-job; the worker that takes it over
    runs with ``--max-attempts 1``, so the second delivery is refused and dead-lettered. Returns the letter's id
    in ivl:dead and the second worker (alive, serving the same model)."""
    first = start_worker(model=job["model"], delay=tokens_delay)
    submit(r, job)
    wait_for(lambda: status_of(r, job["id"]) == "running", 30, f"job {job['id']} to start")
    first.popen.kill()
    first.popen.wait()
    second = start_worker(model=job["model"], delay=tokens_delay, extra=["--max-attempts", "1"])
    dead_id: str = wait_for(lambda: letter_for(r, job["id"]), 30, f"job {job['id']} to be dead-lettered")
    return dead_id, second
