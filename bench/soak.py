"""``python -m bench.soak [--minutes 10]``: mixed traffic against a real stack while it is made to fail.

A redis-server (DEBUG enabled), fake-engine workers with a 3 s lease and gateways. Client tasks stream
(``/worker_generate_stream`` and SSE), hang up mid-stream or right after sending, retry with the same job_id,
re-submit finished ids, cancel, and XADD garbage entries; meanwhile a worker is kill -9'd, frozen past its lease
or SIGTERMed, or Redis stalls (``DEBUG SLEEP``). At the end: every answer and every job's replay record is the
fake engine's text (a prefix of it for a cancelled or failed job), no request hung, no subscription and no key
without expiry is left, the garbage is dead-lettered, every process not stopped on purpose is up. The figures go
to bench/results.json under "soak"; the exit code is 1 when a check fails. Not part of ``make test``: it takes
minutes and its faults are random.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import socket
import struct
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis
import redis.asyncio as aioredis

from broker_worker.model.fake_engine import fake_tokens
from broker_worker.protocol import constants as c
from broker_worker.protocol.errors import ErrorCode
from broker_worker.protocol.messages import ChatMessage, Job
from tests.helpers import Proc, RedisServer, served_models, spawn, spawn_gateway, wait_for, worker_args

MODEL = "fake"
CHUNKS_PATH = "/worker_generate_stream"
RESULTS = Path(__file__).resolve().parent / "results.json"
LEASE_S = 3.0  # worker_args renews every lease/4 = 0.75 s: take-overs happen within the run
TYPED_CODES = {int(code) for code in ErrorCode if code}
FINISHED = ("stop", "length")
TERMINAL = ("done", "failed", "cancelled")
#: The only keys the protocol keeps without an expiry (docs/protocol.md).
PERMANENT_KEYS = {*(c.job_stream(MODEL, lane) for lane in c.LANES), c.DEAD_LETTER_STREAM}  # a stream per lane
Chunk = dict[str, Any]


@dataclass(frozen=True)
class Settings:
    minutes: float
    workers: int
    slots: int
    clients: int
    gateways: int
    token_delay_s: float
    max_tokens: int
    bound_s: float
    settle_s: float
    fault_gap_s: tuple[float, float]
    logs: Path


@dataclass
class Tally:
    """What the run saw: the answer each job must have, outcomes per scenario, faults, problems by kind."""

    expected: dict[str, str] = field(default_factory=dict)  # job id -> the fake engine's whole answer
    scenario_of: dict[str, str] = field(default_factory=dict)  # job id -> the scenario that sent it
    by_scenario: dict[str, Counter[str]] = field(default_factory=dict)
    faults: Counter[str] = field(default_factory=Counter)
    garbage: dict[str, str] = field(default_factory=dict)  # stream entry id -> kind of garbage
    problems: dict[str, list[str]] = field(default_factory=dict)
    timeline: list[str] = field(default_factory=list)  # the faults, when, and on what
    dead: set[int] = field(default_factory=set)  # pids of processes that exited unasked, reported once

    def count(self, scenario: str, outcome: str) -> None:
        self.by_scenario.setdefault(scenario, Counter())[outcome] += 1

    def outcomes(self) -> Counter[str]:
        return sum(self.by_scenario.values(), Counter())

    def problem(self, kind: str, text: str) -> None:
        seen = self.problems.setdefault(kind, [])
        seen.append(text)
        if len(seen) <= 5:  # the rest are in the report
            print(f"[soak] PROBLEM {kind}: {text}", flush=True)

    def name(self, job_id: str) -> str:
        return f"{self.scenario_of.get(job_id, '?')} {job_id}"

    def expect(self, job_id: str, scenario: str, answer: str) -> None:
        self.expected[job_id] = answer
        self.scenario_of[job_id] = scenario


@dataclass
class Stack:
    settings: Settings
    server: RedisServer
    workers: list[Proc] = field(default_factory=list)
    retired: list[Proc] = field(default_factory=list)  # stopped on purpose
    gateways: list[Proc] = field(default_factory=list)
    bases: list[str] = field(default_factory=list)

    def add_worker(self) -> Proc:
        s = self.settings
        args = worker_args(self.server.url, delay=s.token_delay_s, lease_s=LEASE_S, slots=s.slots)
        proc = spawn("worker", args, s.logs)
        self.workers.append(proc)
        return proc

    def retire(self, proc: Proc) -> None:
        self.workers.remove(proc)
        self.retired.append(proc)

    def stop(self) -> None:
        for proc in [*self.gateways, *self.workers, *self.retired]:
            proc.stop(10)
        self.server.kill()


def start_stack(settings: Settings) -> Stack:
    server = RedisServer(settings.logs, extra=["--enable-debug-command", "yes"]).start()
    stack = Stack(settings, server)
    try:
        for _ in range(settings.workers):
            stack.add_worker()
        r = server.client()
        wait_for(lambda: len(r.zrange(c.WORKERS_INDEX, 0, -1)) >= settings.workers, 120, "workers")
        for _ in range(settings.gateways):
            timeouts = ["--start-timeout-s", "60", "--idle-timeout-s", "60"]
            proc, base = spawn_gateway(server.url, settings.logs, "--log-level", "info", *timeouts)
            stack.gateways.append(proc)
            stack.bases.append(base)
            wait_for(lambda base=base: served_models(base) == [MODEL], 60, "gateway")  # type: ignore[misc]
    except BaseException:
        stack.stop()
        raise
    return stack


def expected_text(question: str, tokens: int) -> str:
    job = Job(model=MODEL, prompt=[ChatMessage(role="user", content=question)], max_new_tokens=tokens)
    return "".join(fake_tokens(job))


@dataclass
class Trace:
    """The job a request is about, once known (for the report of a hung request)."""

    scenario: str
    job_id: str = "?"


@dataclass
class Ctx:
    settings: Settings
    stack: Stack
    http: httpx.AsyncClient
    side: aioredis.Redis  # bytes in, bytes out: garbage entries
    tally: Tally
    rng: random.Random
    serial: int = 0

    def base(self) -> str:
        return self.rng.choice(self.stack.bases)

    def question(self) -> tuple[str, int]:
        self.serial += 1
        return f"question {self.serial} " + "x" * self.rng.randint(0, 60), self.rng.randint(5, self.settings.max_tokens)

    def new_job(self, trace: Trace) -> tuple[str, dict[str, Any]]:
        question, tokens = self.question()
        trace.job_id = job_id = f"soak-{self.serial}"
        self.tally.expect(job_id, trace.scenario, expected_text(question, tokens))
        prompt = [{"role": "user", "content": question}]
        return job_id, {"model": MODEL, "prompt": prompt, "max_new_tokens": tokens, "job_id": job_id}

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return self.http.stream("POST", self.base() + path, json=body)


# --- reading and judging answers -------------------------------------------------------------------------------


class ChunkReader:
    """FastChat chunks (JSON + NUL) off a response, one at a time; a refusal is one such chunk too."""

    def __init__(self, response: httpx.Response) -> None:
        self._bytes = response.aiter_bytes()
        self._buffer = b""
        self._ready: deque[Chunk] = deque()

    async def next(self) -> Chunk | None:
        while not self._ready:
            try:
                data = await anext(self._bytes)
            except StopAsyncIteration:
                rest, self._buffer = self._buffer.strip(), b""
                return json.loads(rest) if rest else None
            *complete, self._buffer = (self._buffer + data).split(b"\0")
            self._ready.extend(json.loads(raw) for raw in complete)
        return self._ready.popleft()


def is_last(chunk: Chunk) -> bool:
    return bool(chunk.get("error_code")) or chunk.get("finish_reason") is not None


async def read_chunks(reader: ChunkReader, limit: int | None = None) -> list[Chunk]:
    """Chunks up to the terminal one, the end of the body, or ``limit`` chunks."""
    chunks: list[Chunk] = []
    while limit is None or len(chunks) < limit:
        chunk = await reader.next()
        if chunk is None:
            break
        chunks.append(chunk)
        if is_last(chunk):
            break
    return chunks


def chunks_text(tally: Tally, job_id: str, chunks: list[Chunk]) -> str | None:
    """The cumulative text; None (and a problem) when a chunk is not the previous text plus more of the answer."""
    expected, text = tally.expected[job_id], ""
    for chunk in chunks:
        if chunk.get("error_code"):
            break
        if not chunk["text"].startswith(text) or not expected.startswith(chunk["text"]):
            tally.problem(
                "wrong-text", f"{tally.name(job_id)}: chunk seq {chunk.get('seq')} text ...{chunk['text'][-30:]!r}"
            )
            return None
        text = chunk["text"]
    return text


def classify(tally: Tally, job_id: str, end: tuple[int, str | None], text: str, cancel_ok: bool) -> str:
    """done / cancelled / error:<code> for a well-formed end; wrong-text or broken (and a problem) otherwise."""
    code, finish = end
    expected = tally.expected.get(job_id, "")
    if code:
        if code in TYPED_CODES:
            return f"error:{code}"
        tally.problem("broken", f"{tally.name(job_id)}: untyped error code {code}")
        return "broken"
    if finish in FINISHED or finish == "cancelled":
        if (text != expected) if finish in FINISHED else not expected.startswith(text):
            tally.problem("wrong-text", f"{tally.name(job_id)}: {finish}, {len(text)} chars, expected {len(expected)}")
            return "wrong-text"
        if finish == "cancelled" and not cancel_ok:
            tally.problem(
                "unexpected-cancel", f"{tally.name(job_id)}: cancelled, its client neither cancelled nor left"
            )
        return "done" if finish in FINISHED else "cancelled"
    tally.problem("broken", f"{tally.name(job_id)}: the stream ended without a terminal chunk ({len(text)} chars)")
    return "broken"


def judge_chunks(tally: Tally, job_id: str, chunks: list[Chunk], cancel_ok: bool) -> str:
    text = chunks_text(tally, job_id, chunks)
    if text is None:
        return "wrong-text"
    last = chunks[-1] if chunks else {}
    return classify(tally, job_id, (int(last.get("error_code", 0)), last.get("finish_reason")), text, cancel_ok)


# --- traffic ----------------------------------------------------------------------------------------------------


async def stream(ctx: Ctx, trace: Trace) -> str:
    job_id, body = ctx.new_job(trace)
    async with ctx.post(CHUNKS_PATH, body) as response:
        chunks = await read_chunks(ChunkReader(response))
    return judge_chunks(ctx.tally, job_id, chunks, cancel_ok=False)


async def hangup_mid(ctx: Ctx, trace: Trace) -> str:
    job_id, body = ctx.new_job(trace)
    async with ctx.post(CHUNKS_PATH, body) as response:
        chunks = await read_chunks(ChunkReader(response), limit=ctx.rng.randint(1, 3))
    if chunks and is_last(chunks[-1]):
        return judge_chunks(ctx.tally, job_id, chunks, cancel_ok=False)
    return "hangup" if chunks_text(ctx.tally, job_id, chunks) is not None else "wrong-text"


async def hangup_now(ctx: Ctx, trace: Trace) -> str:
    """Send the request and reset the connection at once, before any answer."""
    _, body = ctx.new_job(trace)
    host, port = ctx.base().removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    head = f"POST {CHUNKS_PATH} HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {len(payload)}\r\n\r\n"
    _, writer = await asyncio.open_connection(host, int(port))
    writer.write(head.encode() + payload)
    await writer.drain()
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()
    with suppress(OSError):
        await writer.wait_closed()
    return "hangup"


async def retry(ctx: Ctx, trace: Trace) -> str:
    """Re-send the same job_id, then let the stale first connection go: the retry must get the whole answer."""
    job_id, body = ctx.new_job(trace)
    async with ctx.post(CHUNKS_PATH, body) as stale:
        # Keep the reader: a dropped one's byte iterator is finalised by asyncio, which closes the connection,
        # so the stale request would hang up before the retry is even sent (and rightly cancel the job).
        stale_reader = ChunkReader(stale)
        await read_chunks(stale_reader, limit=ctx.rng.randint(1, 3))
        async with ctx.post(CHUNKS_PATH, body) as again:
            reader = ChunkReader(again)
            chunks = await read_chunks(reader, limit=1)
            await stale.aclose()
            del stale_reader
            if chunks and not is_last(chunks[-1]):
                chunks += await read_chunks(reader)
    return judge_chunks(ctx.tally, job_id, chunks, cancel_ok=False)


async def resubmit(ctx: Ctx, trace: Trace) -> str:
    """A finished id sent again answers the same text from the replay record, without running again."""
    job_id, body = ctx.new_job(trace)
    async with ctx.post(CHUNKS_PATH, body) as response:
        outcome = judge_chunks(ctx.tally, job_id, await read_chunks(ChunkReader(response)), cancel_ok=False)
    if outcome != "done":
        return outcome
    async with ctx.post(CHUNKS_PATH, body) as response:
        return judge_chunks(ctx.tally, job_id, await read_chunks(ChunkReader(response)), cancel_ok=False)


async def cancel(ctx: Ctx, trace: Trace) -> str:
    job_id, body = ctx.new_job(trace)
    async with ctx.post(CHUNKS_PATH, body) as response:
        reader = ChunkReader(response)
        chunks = await read_chunks(reader, limit=ctx.rng.randint(1, 4))
        if chunks and not is_last(chunks[-1]):
            answer = await ctx.http.post(f"{ctx.base()}/jobs/{job_id}/cancel")
            if answer.status_code != 200:
                ctx.tally.problem("cancel-endpoint", f"{job_id}: HTTP {answer.status_code} {answer.text[:120]!r}")
            chunks += await read_chunks(reader)
    return judge_chunks(ctx.tally, job_id, chunks, cancel_ok=True)


async def sse(ctx: Ctx, trace: Trace) -> str:
    question, tokens = ctx.question()
    payload = {"model": MODEL, "messages": [{"role": "user", "content": question}], "max_tokens": tokens}
    async with ctx.post("/v1/chat/completions", payload | {"stream": True}) as response:
        if response.status_code != 200:
            error = json.loads(await response.aread()).get("error", {})
            return classify(ctx.tally, trace.job_id, (int(error.get("code", -1)), None), "", cancel_ok=False)
        code, finish, text = 0, None, ""
        async for data in sse_data(response):
            if "error" in data:
                code = int(data["error"].get("code", -1))
                continue
            if trace.job_id == "?":
                trace.job_id = data["id"].removeprefix("chatcmpl-")
                ctx.tally.expect(trace.job_id, trace.scenario, expected_text(question, tokens))
            choice = data["choices"][0]
            text += choice["delta"].get("content") or ""
            finish = choice["finish_reason"] or finish
    return classify(ctx.tally, trace.job_id, (code, finish), text, cancel_ok=False)


async def sse_data(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    async for line in response.aiter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line.removeprefix("data: "))


GARBAGE: dict[str, dict[str, bytes]] = {
    "not-json": {"job": b"{this is not json"},
    "non-utf8": {"job": b'{"id": "\xff\xfe", "model": "fake", "prompt": [{"role": "user", "content": "\xc3"}]}'},
    "deep-json": {"job": b"[" * 100_000 + b"]" * 100_000},
    "wrong-fields": {"task": b'{"id": "x"}'},
    "wrong-types": {"job": json.dumps({"id": 7, "model": MODEL, "prompt": "nope", "max_new_tokens": "x"}).encode()},
    "not-an-object": {"job": b"42"},
}


async def garbage(ctx: Ctx, trace: Trace) -> str:
    kind = ctx.rng.choice(sorted(GARBAGE))
    entry_id = await ctx.side.xadd(c.job_stream(MODEL), GARBAGE[kind])  # type: ignore[arg-type]
    ctx.tally.garbage[entry_id.decode() if isinstance(entry_id, bytes) else entry_id] = kind
    await asyncio.sleep(1.0)  # pace: one entry, not a flood, per turn of this client
    return "garbage"


Scenario = Callable[[Ctx, Trace], Awaitable[str]]
SCENARIOS: dict[str, tuple[Scenario, int]] = {
    "stream": (stream, 30),
    "sse": (sse, 18),
    "hangup_mid": (hangup_mid, 10),
    "hangup_now": (hangup_now, 6),
    "retry": (retry, 10),
    "resubmit": (resubmit, 6),
    "cancel": (cancel, 12),
    "garbage": (garbage, 4),
}


async def bounded(ctx: Ctx, name: str) -> str:
    """One request within the bound: a request that has not ended by then is hung."""
    trace = Trace(name)
    try:
        async with asyncio.timeout(ctx.settings.bound_s):
            return await SCENARIOS[name][0](ctx, trace)
    except TimeoutError:
        ctx.tally.problem("hung", f"{name} {trace.job_id}: no terminal chunk within {ctx.settings.bound_s} s")
        return "hung"
    except (httpx.HTTPError, OSError, ValueError, KeyError) as exc:
        ctx.tally.problem("broken", f"{name} {trace.job_id}: {type(exc).__name__}: {exc}")
        return "broken"


async def client_loop(ctx: Ctx, deadline: float) -> None:
    names = list(SCENARIOS)
    weights = [SCENARIOS[n][1] for n in names]
    while time.monotonic() < deadline:
        name = ctx.rng.choices(names, weights)[0]
        ctx.tally.count(name, await bounded(ctx, name))


# --- faults -----------------------------------------------------------------------------------------------------


def stopped(proc: Proc) -> bool:
    """Whether the kernel shows the process stopped (state T): the freeze really happened."""
    stat = Path(f"/proc/{proc.popen.pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] == "T"


async def kill9(ctx: Ctx, proc: Proc) -> str | None:
    proc.popen.kill()
    await asyncio.to_thread(proc.popen.wait)
    ctx.stack.retire(proc)
    ctx.stack.add_worker()
    return f"worker {proc.popen.pid}" if proc.popen.returncode == -signal.SIGKILL else None


async def freeze(ctx: Ctx, proc: Proc) -> str | None:
    """SIGSTOP past the lease (its jobs are taken over), then SIGCONT: it must publish nothing stale."""
    seconds = LEASE_S + ctx.rng.uniform(1.0, 5.0)
    proc.signal(signal.SIGSTOP)
    try:
        hit = await asyncio.to_thread(wait_for, lambda: stopped(proc), 5, "SIGSTOP to take effect")
        await asyncio.sleep(seconds)
    finally:
        proc.signal(signal.SIGCONT)
    return f"worker {proc.popen.pid} for {seconds:.1f} s" if hit else None


async def term(ctx: Ctx, proc: Proc) -> str | None:
    """SIGTERM: the worker hands its jobs back and exits by itself (grace 1 s); a replacement starts at once."""
    proc.signal(signal.SIGTERM)
    ctx.stack.retire(proc)
    ctx.stack.add_worker()
    try:
        await asyncio.wait_for(asyncio.to_thread(proc.popen.wait), 60)
    except TimeoutError:
        ctx.tally.problem("process", f"worker pid {proc.popen.pid} still up 60 s after SIGTERM ({proc.log_path})")
        proc.popen.kill()
    else:
        if proc.popen.returncode != 0:
            ctx.tally.problem("process", f"SIGTERMed worker exited {proc.popen.returncode} ({proc.log_path})")
    return f"worker {proc.popen.pid}"


def debug_sleep(url: str, seconds: int) -> float:
    side = redis.Redis.from_url(url, socket_timeout=seconds + 30)
    try:
        started = time.monotonic()
        side.execute_command("DEBUG", "SLEEP", seconds)  # type: ignore[no-untyped-call]
        return time.monotonic() - started
    finally:
        side.close()


async def stall(ctx: Ctx, proc: Proc) -> str | None:
    seconds = ctx.rng.randint(1, 12)
    took = await asyncio.to_thread(debug_sleep, ctx.stack.server.url, seconds)
    return f"{seconds} s (answered after {took:.1f} s)" if took >= seconds else None


#: Each injects one fault (``proc``: a live worker it may use) and says what it did, or None if it did not hit.
FAULTS: dict[str, Callable[[Ctx, Proc], Awaitable[str | None]]] = {
    "kill9": kill9,
    "sigstop_past_lease": freeze,
    "sigterm": term,
    "redis_debug_sleep": stall,
}


def check_processes(ctx: Ctx) -> None:
    for proc in [*ctx.stack.workers, *ctx.stack.gateways]:
        if not proc.alive and proc.popen.pid not in ctx.tally.dead:
            ctx.tally.dead.add(proc.popen.pid)
            ctx.tally.problem("process", f"{proc.name} exited {proc.popen.returncode} unasked ({proc.log_path})")


async def fault_loop(ctx: Ctx, started: float, deadline: float) -> None:
    """Every kind in turn, in a shuffled order per round, at random gaps: each kind happens in a short run too."""
    kinds: list[str] = []
    while True:
        await asyncio.sleep(ctx.rng.uniform(*ctx.settings.fault_gap_s))
        if time.monotonic() >= deadline:
            return
        check_processes(ctx)
        kinds = kinds or ctx.rng.sample(sorted(FAULTS), len(FAULTS))
        kind = kinds.pop()
        at = time.monotonic() - started
        done = await FAULTS[kind](ctx, ctx.rng.choice([p for p in ctx.stack.workers if p.alive] or ctx.stack.workers))
        if done is None:
            ctx.tally.problem("fault", f"{kind} did not take effect")
            continue
        ctx.tally.faults[kind] += 1
        ctx.tally.timeline.append(f"{at:.0f} s {kind} {done}")
        print(f"[soak] fault at {at:.0f} s: {kind} {done}", flush=True)


async def progress_loop(ctx: Ctx, deadline: float) -> None:
    while time.monotonic() < deadline:
        await asyncio.sleep(30)
        print(f"[soak] {dict(ctx.tally.outcomes())} faults {dict(ctx.tally.faults)}", flush=True)


# --- checks at the end ------------------------------------------------------------------------------------------


def batched(items: list[str], size: int = 500) -> list[list[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def job_statuses(r: redis.Redis, ids: list[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for batch in batched(ids):
        pipe = r.pipeline(transaction=False)
        for job_id in batch:
            pipe.hget(c.job_state_key(job_id), "status")
        out.update(zip(batch, pipe.execute(), strict=True))
    return out


def settled(r: redis.Redis, ids: list[str]) -> bool:
    open_jobs = [j for j, s in job_statuses(r, ids).items() if s is not None and s not in TERMINAL]
    return not open_jobs and r.xlen(c.job_stream(MODEL)) == 0 and not r.pubsub_channels()


def replays(r: redis.Redis, ids: list[str]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for batch in batched(ids):
        pipe = r.pipeline(transaction=False)
        for job_id in batch:
            pipe.xrange(c.job_events_key(job_id))
        for job_id, entries in zip(batch, pipe.execute(), strict=True):
            out[job_id] = [json.loads(fields[c.EVENT_FIELD]) for _, fields in entries]
    return out


def replay_problems(job_id: str, events: list[dict[str, Any]], expected: str) -> list[str]:
    """Seqs 1..n without a gap, one terminal event and it is last, deltas joining to (a prefix of) the answer."""
    problems = []
    seqs = [e["seq"] for e in events]
    if seqs != list(range(1, len(events) + 1)):
        problems.append(f"{job_id}: replay seqs not contiguous from 1: {seqs[:12]}…")
    ends = [e["type"] for e in events if e["type"] in TERMINAL]
    if len(ends) != 1 or events[-1]["type"] not in TERMINAL:
        problems.append(f"{job_id}: terminal events {ends}, last {events[-1]['type']}")
    text = "".join(e["text"] for e in events if e["type"] == "delta")
    done = events[-1]["type"] == "done"
    if (text != expected) if done else not expected.startswith(text):
        at = next((i for i, (a, b) in enumerate(zip(text, expected, strict=False)) if a != b), len(text))
        problems.append(f"{job_id}: replay text ({len(text)} chars) differs from the answer ({len(expected)}) at {at}")
    return problems


def job_end(status: str | None, events: list[dict[str, Any]]) -> str:
    """How a job ended, for the figures: the terminal event (failed with its code), or why there is none."""
    if not events:
        return "never queued" if status is None else f"no event ({status})"
    last = events[-1]
    return str(last["type"]) + (f":{last['error_code']}" if last["type"] == "failed" else "")


def check_replays(ctx: Ctx, r: redis.Redis) -> dict[str, Any]:
    ends: dict[str, Counter[str]] = {}
    taken_over = resumed_jobs = 0
    statuses = job_statuses(r, list(ctx.tally.expected))
    for job_id, events in replays(r, list(ctx.tally.expected)).items():
        end = job_end(statuses[job_id], events)
        ends.setdefault(ctx.tally.scenario_of[job_id], Counter())[end] += 1
        if end.startswith("no event"):
            ctx.tally.problem("unfinished", f"{ctx.tally.name(job_id)}: {end} after the settle time")
        if not events:
            continue
        for text in replay_problems(job_id, events, ctx.tally.expected[job_id]):
            ctx.tally.problem("replay", f"{ctx.tally.scenario_of[job_id]} {text}")
        starts = sum(e["type"] == "started" for e in events)
        taken_over += max(0, starts - 1)
        resumed_jobs += any(e["type"] == "started" and e.get("resumed") for e in events)
    return {
        "jobs": len(ctx.tally.expected),
        "ends": dict(sum(ends.values(), Counter())),
        "ends_by_scenario": {k: dict(v) for k, v in sorted(ends.items())},
        "take_overs": taken_over,
        "resumed_jobs": resumed_jobs,
    }


def subscriptions_left(ctx: Ctx, r: redis.Redis) -> dict[str, Any]:
    """Channels still subscribed (PUBSUB CHANNELS, NUMSUB), by the scenario of their job."""
    channels = [str(name) for name in r.pubsub_channels()]
    numsub = dict(r.pubsub_numsub(*channels)) if channels else {}
    by_scenario: Counter[str] = Counter()
    for channel in channels:
        job_id = channel.partition("{")[2].partition("}")[0]
        by_scenario[ctx.tally.scenario_of.get(job_id, "?")] += 1
    return {"count": len(channels), "by_scenario": dict(by_scenario), "numsub": dict(sorted(numsub.items())[:20])}


def keys_without_expiry(r: redis.Redis) -> list[str]:
    keys = [k for k in r.scan_iter(count=1000) if k not in PERMANENT_KEYS]
    leaks = []
    for batch in batched(keys):
        pipe = r.pipeline(transaction=False)
        for key in batch:
            pipe.ttl(key)
        leaks += [k for k, ttl in zip(batch, pipe.execute(), strict=True) if ttl == -1]
    return leaks


def check_garbage(ctx: Ctx) -> dict[str, Any]:
    raw = redis.Redis.from_url(ctx.stack.server.url, socket_timeout=30)
    try:
        entries: list[tuple[bytes, dict[bytes, bytes]]] = raw.xrange(c.DEAD_LETTER_STREAM)  # type: ignore[assignment]
        letters = [json.loads(fields[b"letter"]) for _, fields in entries]
    finally:
        raw.close()
    lettered = {letter["entry_id"] for letter in letters}
    missing = {entry: kind for entry, kind in ctx.tally.garbage.items() if entry not in lettered}
    for entry, kind in missing.items():
        ctx.tally.problem("garbage", f"{kind} entry {entry} is not in {c.DEAD_LETTER_STREAM}")
    reasons = Counter(letter["reason"].split(":")[0][:60] for letter in letters)
    return {"entries": dict(Counter(ctx.tally.garbage.values())), "dead_letters": dict(reasons)}


def log_tracebacks(stack: Stack) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for proc in [*stack.workers, *stack.retired, *stack.gateways]:
        counts[proc.name] += proc.log().count("Traceback")
    return dict(counts)


async def settle(ctx: Ctx, r: redis.Redis) -> float:
    """Wait (bounded) for every job to end, the queue to drain and the gateways to drop their subscriptions."""
    started = time.monotonic()
    ids = list(ctx.tally.expected)
    while time.monotonic() - started < ctx.settings.settle_s:
        if await asyncio.to_thread(settled, r, ids):
            break
        await asyncio.sleep(0.5)
    return round(time.monotonic() - started, 1)


async def final_checks(ctx: Ctx, traffic_s: float) -> dict[str, Any]:
    r = ctx.stack.server.client()
    settle_s = await settle(ctx, r)
    check_processes(ctx)
    replay = check_replays(ctx, r)
    subscriptions = subscriptions_left(ctx, r)
    leaks = keys_without_expiry(r)
    stream = c.job_stream(MODEL)
    queue = {"length": r.xlen(stream), "pending": r.xpending(stream, c.CONSUMER_GROUP)["pending"]}
    figures: dict[str, Any] = {
        "traffic_s": round(traffic_s, 1),
        "settle_s": settle_s,
        "requests": sum(ctx.tally.outcomes().values()),
        "outcomes": dict(ctx.tally.outcomes()),
        "by_scenario": {k: dict(v) for k, v in sorted(ctx.tally.by_scenario.items())},
        "faults": dict(ctx.tally.faults),
        "fault_timeline": ctx.tally.timeline,
        "replay": replay,
        "garbage": check_garbage(ctx),
        "leaked_subscriptions": subscriptions,
        "keys_without_expiry": leaks[:50],
        "queue_at_end": queue,
        "workers_up": f"{sum(p.alive for p in ctx.stack.workers)}/{len(ctx.stack.workers)}",
        "gateways_up": f"{sum(p.alive for p in ctx.stack.gateways)}/{len(ctx.stack.gateways)}",
        "workers_stopped_on_purpose": len(ctx.stack.retired),
        "log_tracebacks": log_tracebacks(ctx.stack),
    }
    figures["checks"] = checks(ctx, figures)
    figures["ok"] = all(figures["checks"].values())
    figures["problems"] = {k: v[:20] for k, v in ctx.tally.problems.items()}
    return figures


def checks(ctx: Ctx, figures: dict[str, Any]) -> dict[str, bool]:
    problems = {k: len(v) for k, v in ctx.tally.problems.items()}
    return {
        "text_exact (answers and replays)": problems.get("wrong-text", 0) + problems.get("replay", 0) == 0,
        "no_hung_requests": problems.get("hung", 0) == 0,
        "terminal_chunk_or_typed_error": problems.get("broken", 0) == 0,
        "no_unexpected_cancel": problems.get("unexpected-cancel", 0) == 0,
        "cancel_endpoint_ok": problems.get("cancel-endpoint", 0) == 0,
        "every_job_ended": problems.get("unfinished", 0) == 0,
        "queue_drained": figures["queue_at_end"] == {"length": 0, "pending": 0},
        "no_leaked_subscriptions": figures["leaked_subscriptions"]["count"] == 0,
        "no_keys_without_expiry": not figures["keys_without_expiry"],
        "garbage_dead_lettered": problems.get("garbage", 0) == 0,
        "processes_up": problems.get("process", 0) == 0,
        "every_fault_kind_hit": problems.get("fault", 0) == 0 and set(ctx.tally.faults) == set(FAULTS),
    }


# --- the run ----------------------------------------------------------------------------------------------------


async def soak(settings: Settings, stack: Stack) -> dict[str, Any]:
    side = aioredis.Redis.from_url(stack.server.url, socket_timeout=60)
    timeout = httpx.Timeout(10.0, read=None)  # the bound, not httpx, decides when a stream is hung
    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=None)) as http:
        ctx = Ctx(settings, stack, http, side, Tally(), random.Random())
        started = time.monotonic()
        deadline = started + settings.minutes * 60
        clients = [client_loop(ctx, deadline) for _ in range(settings.clients)]
        await asyncio.gather(fault_loop(ctx, started, deadline), progress_loop(ctx, deadline), *clients)
        figures = await final_checks(ctx, time.monotonic() - started)
    await side.aclose()
    return figures


def write_results(figures: dict[str, Any]) -> None:
    """Read, update, write: the other benchmarks' keys stay."""
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results["soak"] = figures
    RESULTS.write_text(json.dumps(results, indent=2, sort_keys=True))


def print_report(figures: dict[str, Any], settings: Settings) -> None:
    for key in ("requests", "outcomes", "faults", "replay", "garbage", "leaked_subscriptions", "keys_without_expiry"):
        print(f"{key:22} {json.dumps(figures[key], sort_keys=True)}")
    print(f"{'queue_at_end':22} {figures['queue_at_end']}  settle {figures['settle_s']} s")
    print(f"{'processes up':22} workers {figures['workers_up']}, gateways {figures['gateways_up']}")
    for kind, texts in figures["problems"].items():
        print(f"problems {kind} ({len(texts)} shown):", *texts[:8], sep="\n  ")
    for name, ok in figures["checks"].items():
        print(f"{'ok ' if ok else 'FAIL'} {name}")
    print(f"RESULT soak {'ok' if figures['ok'] else 'FAILED'}; logs in {settings.logs}; wrote {RESULTS} (soak)")


def parse_settings(argv: list[str] | None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--slots", type=int, default=8, help="jobs at once per worker")
    parser.add_argument("--clients", type=int, default=30, help="concurrent client tasks")
    parser.add_argument("--gateways", type=int, default=2)
    parser.add_argument("--token-delay-s", type=float, default=0.05, help="the fake engine's time per token")
    parser.add_argument("--max-tokens", type=int, default=120, help="max_new_tokens is drawn from 5..this")
    parser.add_argument("--bound-s", type=float, default=150.0, help="a request not ended by then is hung")
    parser.add_argument("--settle-s", type=float, default=90.0, help="time for jobs and subscriptions to end")
    parser.add_argument("--logs", type=Path, default=None, help="directory for the logs (default: a new temp dir)")
    args = parser.parse_args(argv)
    logs = args.logs or Path(tempfile.mkdtemp(prefix="soak-"))
    logs.mkdir(parents=True, exist_ok=True)
    return Settings(
        args.minutes, args.workers, args.slots, args.clients, args.gateways, args.token_delay_s, args.max_tokens,
        args.bound_s, args.settle_s, (6.0, 15.0), logs,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(argv)
    print(f"[soak] {settings.minutes} min; logs in {settings.logs}", flush=True)
    stack = start_stack(settings)
    try:
        figures = asyncio.run(soak(settings, stack))
    finally:
        stack.stop()
    figures["settings"] = {k: str(v) for k, v in vars(settings).items()}
    write_results(figures)
    print_report(figures, settings)
    return 0 if figures["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
