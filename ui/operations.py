"""Operations page of the Streamlit app: live workers, queue depth and tokens/s over the last minutes, dead
letters with their reason and a requeue button, recent failures by error code.

It reads Redis directly (``REDIS_URL``) through the code behind ``broker-admin``, so the page and the CLI always
agree, no gateway endpoint is needed, and it still works while the gateway is down. The charts are sampled by
the page itself (every refresh, kept for ``HISTORY_S`` in this Streamlit process): they start when the page is
first opened; Grafana (docker compose --profile monitoring) keeps the long history.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

import redis
import streamlit as st

from broker_worker import admin_ops as ops
from broker_worker import admin_read as read
from broker_worker.protocol.connections import sync_redis
from broker_worker.protocol.messages import now_ms
from broker_worker.protocol.redaction import redact

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
REFRESH_S = float(os.environ.get("OPS_REFRESH_S", "2"))
HISTORY_S = 600
DEAD_SHOWN = 20
MESSAGE_S = 30.0


@dataclass
class Sample:
    at: float
    depth: dict[str, int]
    tokens_per_s: dict[str, float]


@dataclass
class History:
    """Queue depth and tokens/s per model over the last ``HISTORY_S``, shared by every session of this server."""

    samples: deque[Sample] = field(default_factory=deque)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, status: read.Status) -> None:
        now = time.time()
        with self.lock:
            if self.samples and now - self.samples[-1].at < 1.0:
                return  # several open pages refresh at once: one sample a second is enough
            depth = {m.model: m.queued + m.running for m in status.models}
            self.samples.append(Sample(now, depth, {m.model: m.tokens_per_s for m in status.models}))
            while self.samples and now - self.samples[0].at > HISTORY_S:
                self.samples.popleft()

    def series(self, what: str) -> dict[str, list[Any]]:
        """Columns for st.line_chart: seconds ago, then one column per model."""
        with self.lock:
            samples = list(self.samples)
        models = sorted({m for s in samples for m in getattr(s, what)})
        now = time.time()
        data: dict[str, list[Any]] = {"seconds ago": [round(s.at - now, 1) for s in samples]}
        for model in models:
            data[model] = [getattr(s, what).get(model, 0) for s in samples]
        return data


@st.cache_resource  # type: ignore[untyped-decorator]  # streamlit's decorators are untyped
def history() -> History:
    return History()


@st.cache_resource  # type: ignore[untyped-decorator]
def client() -> redis.Redis:
    return sync_redis(REDIS_URL, socket_timeout=5)


@st.cache_data(ttl=15)  # type: ignore[untyped-decorator]  # a bounded SCAN: not on every refresh
def failures() -> tuple[dict[int, int], list[dict[str, Any]]]:
    found = read.recent_failures(client())
    return read.failures_by_code(found), [asdict(f) for f in found[:20]]


def requeue(dead_id: str) -> None:
    result = ops.requeue(client(), dead_id)
    st.session_state.ops_message = ("success" if result.ok else "error", result.message, time.monotonic())


def literal(text: str) -> str:
    """Markdown that shows ``text`` as it is (a reason quotes whatever arrived on the stream)."""
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|<>~$])", r"\\\1", text)


def seconds(value: float | None) -> str:
    return "none" if value is None else f"{value:.1f} s"  # not "-": a table cell is Markdown (a list item)


def show_models(status: read.Status) -> None:
    rows = [
        {"model": m.model, "queued": m.queued, "running": m.running, "oldest wait": seconds(m.oldest_waiting_s),
         "workers": m.workers, "slots": f"{m.slots_used}/{m.slots}", "tokens/s": f"{m.tokens_per_s:.1f}"}
        for m in status.models
    ]  # fmt: skip
    st.subheader("Queues")
    if rows:
        st.table(rows)
    else:
        st.info("No job stream and no live worker yet.")


def show_workers(status: read.Status) -> None:
    rows = [
        {"worker": w.worker_id, "host": w.host, "model": w.model, "device": w.device,
         "slots": f"{w.slots_used}/{w.slots}", "tokens/s": f"{w.tokens_per_s:.1f}", "jobs done": w.jobs_done,
         "last heartbeat": seconds(w.heartbeat_age_s) + " ago", "state": "draining" if w.draining else "serving"}
        for w in status.workers
    ]  # fmt: skip
    st.subheader(f"Live workers ({len(rows)})")
    if rows:
        st.table(rows)
    else:
        st.warning("No live worker: nothing will take jobs.")


def show_charts() -> None:
    left, right = st.columns(2)
    with left:
        st.caption("Queue depth (queued + running) per model")
        st.line_chart(history().series("depth"), x="seconds ago", height=220)
    with right:
        st.caption("Tokens/s per model (sum of its workers)")
        st.line_chart(history().series("tokens_per_s"), x="seconds ago", height=220)


def show_dead(total: int) -> None:
    letters = read.dead_letters(client(), DEAD_SHOWN)
    st.subheader(f"Dead letters ({total})")
    message = st.session_state.get("ops_message")
    if message and time.monotonic() - message[2] < MESSAGE_S:  # the page refreshes: keep it long enough to read
        (st.success if message[0] == "success" else st.error)(message[1])
    if not letters:
        st.caption("None.")
    for d in letters:
        cols = st.columns([2, 2, 2, 5, 2], vertical_alignment="center")
        cols[0].markdown(f"`{d.id}`  \n{seconds(read.age_s(d.at_ms, now_ms()))} ago")
        cols[1].markdown(f"model `{d.model or '-'}`")
        cols[2].markdown(f"job `{d.job_id or '-'}`")
        why = "" if d.cannot_run in ("", f"cannot run: {d.reason}") else f"  \n_{literal(d.cannot_run)}_"
        cols[3].markdown(f"**Reason:** {literal(d.reason)}{why}")
        help_text = d.cannot_run or f"run job {d.job_id} again under its id"
        cols[4].button(
            "Requeue",
            key=f"requeue-{d.id}",
            disabled=bool(d.cannot_run),
            on_click=requeue,
            args=(d.id,),
            help=help_text,
        )


def show_failures() -> None:
    counts, recent = failures()
    st.subheader("Recent failures by error code")
    if not counts:
        st.caption("No failed job in Redis (job keys expire an hour after their last write).")
        return
    st.bar_chart({"error code": [str(k) for k in counts], "failed jobs": list(counts.values())}, x="error code")
    st.table([{"job": f["job_id"], "code": f["error_code"], "message": f["message"][:120]} for f in recent])


@st.fragment(run_every=REFRESH_S)  # type: ignore[untyped-decorator]  # reruns itself: no page reload
def live() -> None:
    try:
        status = read.status(client())
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        st.error(f"Redis at {redact(REDIS_URL)} is unreachable: {exc}")
        return
    history().add(status)
    st.caption(f"Redis {redact(REDIS_URL)} · refreshed {time.strftime('%H:%M:%S')} every {REFRESH_S:g} s")
    show_models(status)
    show_workers(status)
    show_charts()
    show_dead(status.dead_letters)
    show_failures()


def render() -> None:
    st.set_page_config(page_title="InternVL operations", page_icon="🛠️", layout="wide")
    st.title("Operations")
    live()
