"""Readable tables for ``broker-admin`` (``--json`` prints the same data as JSON)."""

from __future__ import annotations

import time
from collections.abc import Sequence

from broker_worker.admin_read import DeadView, Failure, JobView, Status


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells)


def when(ms: int | None) -> str:
    if ms is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) + f".{ms % 1000:03d}"


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


def print_status(status: Status) -> None:
    model_rows = [
        (m.model, m.queued, m.running, seconds(m.oldest_waiting_s), m.workers, f"{m.slots_used}/{m.slots}",
         f"{m.tokens_per_s:.1f}")
        for m in status.models
    ]  # fmt: skip
    print(table(["MODEL", "QUEUED", "RUNNING", "OLDEST WAIT", "WORKERS", "SLOTS", "TOKENS/S"], model_rows))
    print()
    worker_rows = [
        (w.worker_id + (" (draining)" if w.draining else ""), w.host, w.model, w.device, f"{w.slots_used}/{w.slots}",
         f"{w.tokens_per_s:.1f}", w.jobs_done, seconds(w.heartbeat_age_s))
        for w in status.workers
    ]  # fmt: skip
    print(table(["WORKER", "HOST", "MODEL", "DEVICE", "SLOTS", "TOKENS/S", "DONE", "HEARTBEAT"], worker_rows))
    print(f"\ndead letters: {status.dead_letters}")


def print_job(view: JobView) -> None:
    rows = [
        ("status", view.status),
        ("attempts", view.attempts),
        ("owner", view.owner or "-"),
        ("worker", view.worker or "-"),
        ("entry", view.entry or "-"),
        ("queued", when(view.queued_ms)),
        ("started", when(view.started_ms)),
        ("finished", when(view.finished_ms)),
        ("events", view.events),
    ]
    print(table(["JOB", view.job_id], rows))
    if view.outcome is not None:
        details = {k: v for k, v in view.outcome.items() if k not in ("seq", "type")}
        print(f"outcome   {view.outcome.get('type')} {details}")
    print(f"text      {view.text!r}")


def print_dead(letters: list[DeadView], fields: bool = False) -> None:
    rows = [(d.id, when(d.at_ms), d.model, d.entry_id, d.job_id, "no" if d.cannot_run else "yes", d.reason[:80])
            for d in letters]  # fmt: skip
    print(table(["ID", "AT", "MODEL", "ENTRY", "JOB", "RUNNABLE", "REASON"], rows))
    for d in letters if fields else []:
        print(f"\nreason: {d.reason}")
        if d.cannot_run:
            print(d.cannot_run)
        for key, value in d.fields.items():
            print(f"{key}: {value[:2000]}")


def print_failures(counts: dict[int, int], recent: list[Failure]) -> None:
    print(table(["ERROR CODE", "FAILED JOBS"], sorted(counts.items())))
    print()
    print(
        table(
            ["JOB", "AT", "CODE", "MESSAGE"], [(f.job_id, when(f.at_ms), f.error_code, f.message[:90]) for f in recent]
        )
    )
