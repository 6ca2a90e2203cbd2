"""Read-only views of the queues, workers, jobs and dead letters, from the keys of docs/protocol.md. Shared by
``broker-admin`` and the Streamlit operations page (synchronous redis-py: both are plain scripts)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import redis
from pydantic import ValidationError

from broker_worker.job_run import BadEntry, parse_entry
from broker_worker.protocol import constants as c
from broker_worker.protocol.messages import DeadLetter, Job, WorkerHealth, now_ms

#: ``_kept`` in job_queue.py cuts every field of a dead letter to this many characters.
KEPT_FIELD_CHARS = 4096


@dataclass
class WorkerRow:
    worker_id: str
    host: str
    pid: int
    model: str
    device: str
    slots_used: int
    slots: int
    tokens_per_s: float
    jobs_done: int
    heartbeat_age_s: float
    uptime_s: float
    draining: bool


@dataclass
class ModelRow:
    model: str
    queued: int
    running: int
    oldest_waiting_s: float | None
    workers: int
    slots_used: int
    slots: int
    tokens_per_s: float


@dataclass
class Status:
    models: list[ModelRow]
    workers: list[WorkerRow]
    dead_letters: int
    at_ms: int


def entry_ms(entry_id: str | None) -> int | None:
    """The unix-ms part of a stream entry id (when it was added)."""
    head = (entry_id or "").split("-", 1)[0]
    return int(head) if head.isdigit() else None


def age_s(ms: int | None, now: int) -> float | None:
    return None if ms is None else round(max(0, now - ms) / 1000, 1)


def live_workers(r: redis.Redis) -> list[WorkerHealth]:
    ids: list[str] = r.zrangebyscore(c.WORKERS_INDEX, now_ms(), "+inf")  # type: ignore[assignment]
    values: list[str | None] = r.mget([c.worker_health_key(i) for i in ids]) if ids else []  # type: ignore[assignment]
    workers = []
    for raw in values:
        try:
            workers.append(WorkerHealth.model_validate_json(raw or ""))
        except ValidationError:
            continue  # expired between the two reads, or written by something else
    return workers


def worker_row(w: WorkerHealth, now: int) -> WorkerRow:
    return WorkerRow(
        w.worker_id, w.host, w.pid, w.model, w.device, w.running, w.slots, w.tokens_per_s, w.jobs_done,
        age_s(w.updated_ms, now) or 0.0, age_s(w.started_ms, now) or 0.0, w.draining,
    )  # fmt: skip


def job_stream_models(r: redis.Redis) -> list[str]:
    keys = r.scan_iter(match=c.job_stream("*"), count=1000, _type="stream")
    return sorted(c.job_stream_model(k) for k in keys)


def model_row(r: redis.Redis, model: str, workers: list[WorkerHealth], now: int) -> ModelRow:
    stream = c.job_stream(model)
    length = int(r.xlen(stream))
    running, last_delivered = 0, "0-0"
    try:
        running = int(r.xpending(stream, c.CONSUMER_GROUP)["pending"])
        groups: list[dict[str, Any]] = r.xinfo_groups(stream)
        last_delivered = next((g["last-delivered-id"] for g in groups if g["name"] == c.CONSUMER_GROUP), "0-0")
    except redis.ResponseError:
        pass  # no stream or no group yet: nothing was ever taken
    # Processed entries are deleted, so what the group has not delivered yet is the stream minus the pending.
    oldest: list[tuple[str, Any]] = r.xrange(stream, f"({last_delivered}", "+", count=1)  # type: ignore[assignment]
    mine = [w for w in workers if w.model == model]
    return ModelRow(
        model, max(0, length - running), running, age_s(entry_ms(oldest[0][0]), now) if oldest else None, len(mine),
        sum(w.running for w in mine), sum(w.slots for w in mine), round(sum(w.tokens_per_s for w in mine), 2),
    )  # fmt: skip


def status(r: redis.Redis) -> Status:
    now, workers = now_ms(), live_workers(r)
    models = sorted(set(job_stream_models(r)) | {w.model for w in workers})
    rows = [model_row(r, m, workers, now) for m in models]
    ordered = sorted(workers, key=lambda w: (w.model, w.worker_id))
    return Status(rows, [worker_row(w, now) for w in ordered], int(r.xlen(c.DEAD_LETTER_STREAM)), now)


@dataclass
class JobView:
    job_id: str
    status: str
    attempts: int
    owner: str
    worker: str
    entry: str
    queued_ms: int | None
    started_ms: int | None
    finished_ms: int | None
    events: int
    text: str
    outcome: dict[str, Any] | None = None


def job_view(r: redis.Redis, job_id: str) -> JobView | None:
    """What Redis knows of a job (state and replay), or None for an id it does not know (or that expired)."""
    state: dict[str, str] = r.hgetall(c.job_state_key(job_id))  # type: ignore[assignment]
    entries: list[tuple[str, dict[str, str]]] = r.xrange(c.job_events_key(job_id))  # type: ignore[assignment]
    if not state and not entries:
        return None
    events = [(entry_id, _json(fields.get(c.EVENT_FIELD))) for entry_id, fields in entries]
    text = "".join(str(e.get("text", "")) for _, e in events if e.get("type") == "delta")
    terminal = [(i, e) for i, e in events if e.get("type") in ("done", "failed", "cancelled")]
    outcome = terminal[-1][1] if terminal else None
    started = state.get("started_ms", "")
    return JobView(
        job_id, state.get("status") or (str(outcome["type"]) if outcome else "unknown"),
        int(state.get("attempts") or 0), state.get("owner", ""), state.get("worker", ""), state.get("entry", ""),
        entry_ms(state.get("entry")), int(started) if started.isdigit() else None,
        entry_ms(terminal[-1][0]) if terminal else None, len(events), text, outcome,
    )  # fmt: skip


def _json(raw: str | None) -> dict[str, Any]:
    try:
        value = json.loads(raw or "")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


@dataclass
class DeadView:
    id: str
    at_ms: int | None
    model: str
    entry_id: str
    job_id: str | None
    reason: str
    #: Empty when the letter holds a job that can run again; else why ``dead requeue`` refuses it.
    cannot_run: str
    fields: dict[str, str] = field(default_factory=dict)


def dead_view(dead_id: str, fields: dict[str, str]) -> DeadView:
    try:
        letter = DeadLetter.model_validate_json(fields.get("letter", ""))
    except ValidationError:
        reason = fields.get("reason", "")
        return DeadView(dead_id, entry_ms(dead_id), "", "", None, reason, "not a dead letter this version wrote", {})
    job, why = letter_job(letter.fields)
    model = job.model if job else c.job_stream_model(letter.stream)
    reason = fields.get("reason") or letter.reason
    return DeadView(dead_id, letter.at_ms, model, letter.entry_id, letter.job_id, reason, why, letter.fields)


def letter_job(fields: dict[str, str]) -> tuple[Job | None, str]:
    """The job a dead letter's copy of the entry holds, or why it holds none that can run."""
    try:
        return parse_entry(fields), ""
    except BadEntry as exc:
        raw = fields.get(c.JOB_FIELD, "")
        if len(raw) >= KEPT_FIELD_CHARS:
            return None, f"cannot run: the dead letter kept only the first {KEPT_FIELD_CHARS} characters of the job"
        return None, f"cannot run: {exc}"


def dead_letters(r: redis.Redis, limit: int = 50) -> list[DeadView]:
    """The newest ``limit`` dead letters, newest first."""
    entries: list[tuple[str, dict[str, str]]] = r.xrevrange(c.DEAD_LETTER_STREAM, count=limit)  # type: ignore[assignment]
    return [dead_view(i, f) for i, f in entries]


def find_dead(r: redis.Redis, ref: str, scan: int = c.DEAD_LETTER_MAXLEN) -> DeadView | None:
    """A dead letter by its id in ``ivl:dead``, else the newest one for that original entry id or job id."""
    exact: list[tuple[str, dict[str, str]]] = r.xrange(c.DEAD_LETTER_STREAM, ref, ref) if entry_ms(ref) else []  # type: ignore[assignment]
    if exact:
        return dead_view(*exact[0])
    return next((d for d in dead_letters(r, scan) if ref in (d.entry_id, d.job_id)), None)


@dataclass
class Failure:
    job_id: str
    error_code: int
    message: str
    at_ms: int | None


def recent_failures(r: redis.Redis, max_keys: int = 5000) -> list[Failure]:
    """Failed jobs still in Redis (job keys expire an hour after their last write), newest first. Looks at up to
    ``max_keys`` job state keys, so the cost of a look stays bounded on a busy Redis."""
    keys: list[str] = []
    for key in r.scan_iter(match=c.job_state_key("*"), count=1000, _type="hash"):
        keys.append(key)
        if len(keys) >= max_keys:
            break
    with r.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.hget(key, "status")
        statuses = pipe.execute()
    failed = [k.split("{", 1)[1].rsplit("}", 1)[0] for k, s in zip(keys, statuses, strict=True) if s == "failed"]
    with r.pipeline(transaction=False) as pipe:
        for job_id in failed:
            pipe.xrevrange(c.job_events_key(job_id), count=1)
        lasts = pipe.execute()
    out = []
    for job_id, last in zip(failed, lasts, strict=True):
        event = _json(last[0][1].get(c.EVENT_FIELD)) if last else {}
        code = event.get("error_code", 0)
        out.append(Failure(job_id, int(code) if isinstance(code, int) else 0, str(event.get("message", "")),
                           entry_ms(last[0][0]) if last else None))  # fmt: skip
    return sorted(out, key=lambda f: f.at_ms or 0, reverse=True)


def failures_by_code(failures: list[Failure]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for f in failures:
        counts[f.error_code] = counts.get(f.error_code, 0) + 1
    return dict(sorted(counts.items()))
