"""Batch jobs: ``broker-batch`` throughput against the same requests sent one by one through the gateway, and the
queue wait of interactive requests with and without a batch backlog (priority lanes). Fake-engine workers, so
the figures are the serving path's, not a model's."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import redis

from bench.measures import stack
from tests.helpers import ROOT, spawn, wait_for

BATCH_LINES = 2000
ONE_BY_ONE_LINES = 300  # a sample: the rate is per line, and 2,000 sequential requests would take minutes
WAIT_REQUESTS = 20
BACKLOG = 300


def body(k: int, tokens: int) -> dict[str, Any]:
    return {"model": "fake", "messages": [{"role": "user", "content": f"Question {k}?"}], "max_tokens": tokens}


def write_batch(path: Path, lines: int, tokens: int) -> None:
    request = {"method": "POST", "url": "/v1/chat/completions"}
    path.write_text(
        "".join(json.dumps({"custom_id": f"l{k}", "body": body(k, tokens)} | request) + "\n" for k in range(lines))
    )


def batch_command(path: Path, url: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "broker_batch",
        "run",
        str(path),
        "--output",
        f"{path}.out",
        "--redis-url",
        url,
        *extra,
    ]


def throughput(workdir: Path) -> dict[str, Any]:
    """2,000 lines through ``broker-batch`` vs the same requests one at a time through ``/v1/chat/completions``."""
    workers = [{"delay": 0.002, "slots": 16}, {"delay": 0.002, "slots": 16}]
    with stack(workdir, workers) as (server, base, _):
        source = workdir / "throughput.jsonl"
        write_batch(source, BATCH_LINES, 8)
        started = time.perf_counter()
        subprocess.run(batch_command(source, server.url), check=True, capture_output=True, timeout=600, cwd=ROOT)
        batch_s = time.perf_counter() - started
        assert Path(f"{source}.out").read_text().count("\n") == BATCH_LINES
        started = time.perf_counter()
        with httpx.Client(timeout=60) as client:
            for k in range(ONE_BY_ONE_LINES):
                client.post(base + "/v1/chat/completions", json=body(k, 8)).raise_for_status()
        single_s = time.perf_counter() - started
    batch_rate, single_rate = BATCH_LINES / batch_s, ONE_BY_ONE_LINES / single_s
    return {
        "batch_speedup_vs_one_by_one": round(batch_rate / single_rate, 2),
        "batch_throughput": {
            "lines": BATCH_LINES,
            "broker_batch_lines_per_s": round(batch_rate, 1),
            "one_by_one_gateway_lines_per_s": round(single_rate, 1),
            "one_by_one_sample": ONE_BY_ONE_LINES,
            "workers": "2 fake-engine workers x 16 slots, 8 tokens x 2 ms a job",
        },
    }


def ms(entry_id: str) -> int:
    return int(entry_id.split("-")[0])


def queue_wait_ms(r: redis.Redis, job_id: str) -> int:
    """Stream entry added (its id) to the job's ``started`` event (its id), both in Redis milliseconds."""
    entry = r.hget(f"ivl:job:{{{job_id}}}:state", "entry") or "0-0"
    started = next(i for i, f in r.xrange(f"ivl:job:{{{job_id}}}:events") if '"type":"started"' in f["e"])
    return ms(started) - ms(entry)


def interactive_waits(r: redis.Redis, base: str, tag: str) -> list[int]:
    waits = []
    for k in range(WAIT_REQUESTS):
        payload = {"model": "fake", "prompt": [{"role": "user", "content": f"{tag} {k}"}], "max_new_tokens": 10}
        with httpx.stream("POST", base + "/worker_generate_stream", json=payload, timeout=120) as response:
            response.read()
            job_id = response.headers["X-Job-Id"]
        waits.append(queue_wait_ms(r, job_id))
    return waits


def batch_job_ms(r: redis.Redis) -> float:
    """Median run time (started to done) of the batch jobs, from their events."""
    spans = []
    for key in r.scan_iter("ivl:job:{batch-*}:events", count=1000):
        ids = {json.loads(f["e"])["type"]: i for i, f in r.xrange(key)}
        if "started" in ids and "done" in ids:
            spans.append(ms(ids["done"]) - ms(ids["started"]))
    return statistics.median(spans)


def lanes(workdir: Path) -> dict[str, Any]:
    """Interactive queue wait on a 2-slot worker (0.1 s jobs): idle, behind 300 waiting batch jobs, and what the
    same request waits when queued on the batch lane behind them (one FIFO queue, as before lanes)."""
    with stack(workdir, [{"delay": 0.01, "slots": 2}]) as (server, base, procs):
        r = server.client()
        idle = interactive_waits(r, base, "idle")
        source = workdir / "backlog.jsonl"
        write_batch(source, BACKLOG, 10)
        submitter = spawn("batch", batch_command(source, server.url, "--max-in-flight", str(BACKLOG)), workdir)
        procs.append(submitter)
        wait_for(lambda: r.xlen("ivl:jobs:fake:batch") >= BACKLOG - 10, 60, "the batch backlog")
        behind = interactive_waits(r, base, "behind")
        backlog_left = r.xlen("ivl:jobs:fake:batch")
        fifo = {"id": "fifo-probe", "model": "fake", "max_new_tokens": 10, "prompt": [{"role": "user", "content": "?"}]}
        r.xadd("ivl:jobs:fake:batch", {"job": json.dumps(fifo)})
        assert submitter.popen.wait(300) == 0
        wait_for(lambda: r.hget("ivl:job:{fifo-probe}:state", "status") == "done", 120, "the probe behind the batch")
        fifo_ms, job_ms = queue_wait_ms(r, "fifo-probe"), batch_job_ms(r)
    return {
        "interactive_wait_behind_backlog_over_job_ms": round(max(behind) / job_ms, 2),
        "interactive_queue_wait_ms": {
            "idle_p50": statistics.median(idle),
            "idle_max": max(idle),
            "behind_backlog_p50": statistics.median(behind),
            "behind_backlog_max": max(behind),
            "batch_job_ms_p50": job_ms,
            "same_request_on_the_batch_lane_ms": fifo_ms,
            "batch_jobs_waiting_at_that_point": backlog_left,
            "slots": 2,
        },
    }
