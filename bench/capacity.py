"""``concurrent_streams``: N token streams at once through ONE gateway process and ONE redis-server.

Fake-engine workers produce 20 tokens/s per job (``--fake-token-delay-s 0.05``) with enough workers x slots that
they are not the limit; half the clients read the FastChat chunk stream (``/worker_generate_stream``), half the
OpenAI SSE stream. The question starts with ``clock:``, so every token is the wall-clock time the engine made it
(broker_worker/model/fake_engine.py): a client's receive time minus that is the delay everything between the
engine and the client added (one machine, one clock). Clients run in their own processes (one per protocol) so
that parsing 20k events/s does not run on the loop whose delay is measured.

Per N: delivered tokens/s / (N x 20) (each stream's tokens over the time from its engine start to its last token's
arrival, summed); added delay per token p50/p99; gateway CPU per 1,000 relayed events and RSS per open stream
(psutil on the gateway pid); Redis CPU per published event (INFO cpu / INFO commandstats deltas); worker CPU per
published event. CPU figures cover the whole run, so they include each request's admission and setup.

Alone: ``python -m bench.capacity --n 100,300,1000`` (updates bench/results.json, other keys kept).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import psutil
import uvloop

if TYPE_CHECKING:
    from tests.helpers import RedisServer

RESULTS = Path(__file__).resolve().parent / "results.json"
TOKEN_DELAY_S = 0.05  # 20 tokens/s per job, as a served model streams
RATE = 1 / TOKEN_DELAY_S
SLOTS_PER_WORKER = 200


# --- clients (run as ``python -m bench.capacity --client PROTOCOL``) -----------------------------------------


def request_bytes(protocol: str, port: int, k: int, tokens: int) -> bytes:
    question = f"clock: stream {k}"
    if protocol == "fastchat":
        path = "/worker_generate_stream"
        body: dict[str, Any] = {
            "model": "fake",
            "prompt": [{"role": "user", "content": question}],
            "max_new_tokens": tokens,
        }
    else:
        path = "/v1/chat/completions"
        body = {
            "model": "fake",
            "stream": True,
            "max_tokens": tokens,
            "messages": [{"role": "user", "content": question}],
        }
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + data


def new_text(protocol: str, frame: bytes, seen: int) -> tuple[str, int]:
    """The text a frame adds (FastChat frames carry the whole text so far; SSE frames only the new piece)."""
    if protocol == "fastchat":
        chunk = json.loads(frame)
        if chunk["error_code"]:
            raise RuntimeError(f"error chunk: {chunk}")
        return chunk["text"][seen:], len(chunk["text"])
    if not frame.startswith(b"data: {"):
        return "", seen
    body = json.loads(frame[6:])
    if "error" in body:
        raise RuntimeError(f"error event: {body}")
    choices = body.get("choices") or [{}]
    piece = choices[0].get("delta", {}).get("content") or ""
    return piece, seen + len(piece)


class StreamReading(asyncio.Protocol):
    """One stream read by callbacks straight off its socket, for each token its receive time and added delay.

    The clients share this box's 2 cores with everything they measure, so each relayed event must cost them
    little: no task wake-up or ``readline`` per chunk, the chunked encoding parsed from each read.
    """

    def __init__(self, protocol: str, request: bytes, done: asyncio.Future[dict[str, Any]]) -> None:
        self._protocol, self._request, self._done = protocol, request, done
        self._sep = b"\0" if protocol == "fastchat" else b"\n\n"
        self._transport: asyncio.Transport | None = None
        self._buffer, self._frames, self._head = b"", b"", True
        self._seen, self._chunks = 0, 0
        self._recv: list[float] = []
        self._delay: list[float] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's TCP transport (not an asyncio subclass)
        self._transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        now = time.time()
        buffer = self._buffer + data
        if self._head:  # status line and headers: uvicorn streams with chunked transfer encoding
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                self._buffer = buffer
                return
            status = buffer[: buffer.find(b"\r\n")]
            if b" 200 " not in status:
                self._finish(status.decode(errors="replace").strip())
                return
            buffer, self._head = buffer[end + 4 :], False
        at = 0
        while (line := buffer.find(b"\r\n", at)) >= 0:
            size = int(buffer[at:line], 16)
            if size == 0:
                self._finish()
                return
            if len(buffer) < line + 2 + size + 2:
                break
            try:
                self._payload(buffer[line + 2 : line + 2 + size], now)
            except RuntimeError as exc:  # an error chunk or event: the stream failed
                self._finish(str(exc))
                return
            at = line + 2 + size + 2
        self._buffer = buffer[at:]

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(f"connection lost: {exc!r}" if exc else None)

    def _payload(self, payload: bytes, now: float) -> None:
        *frames, self._frames = (self._frames + payload).split(self._sep)
        for frame in frames:
            piece, self._seen = new_text(self._protocol, frame, self._seen)
            if piece:
                self._chunks += 1
            for token in piece.split():
                self._recv.append(now)
                self._delay.append(now - float(token[1:]))

    def _finish(self, error: str | None = None) -> None:
        if self._done.done():
            return
        if self._transport is not None:
            self._transport.close()
        result: dict[str, Any] = {"recv": self._recv, "delay": self._delay, "chunks": self._chunks}
        self._done.set_result(result | {"error": error} if error else result)


async def one_stream(protocol: str, port: int, k: int, tokens: int) -> dict[str, Any]:
    """Read one stream to its end."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[dict[str, Any]] = loop.create_future()
    request = request_bytes(protocol, port, k, tokens)
    await loop.create_connection(lambda: StreamReading(protocol, request, done), "127.0.0.1", port)
    return await done


async def run_clients(protocol: str, port: int, ks: list[int], tokens: int) -> list[dict[str, Any]]:
    results = await asyncio.gather(*(one_stream(protocol, port, k, tokens) for k in ks), return_exceptions=True)
    return [r if isinstance(r, dict) else {"error": repr(r), "recv": [], "delay": []} for r in results]


def client_main(protocol: str, port: int, first: int, count: int, tokens: int, out: Path) -> None:
    streams = uvloop.run(run_clients(protocol, port, list(range(first, first + count)), tokens))
    out.write_text(json.dumps({"streams": streams, "cpu_s": time.process_time()}))


# --- the scenario -----------------------------------------------------------------------------------------


def cpu_s(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def redis_snapshot(server: RedisServer) -> tuple[float, dict[str, float]]:
    """Redis' CPU seconds (INFO cpu) and, per command, the microseconds spent in it (INFO commandstats)."""
    r = server.client()
    cpu = r.info("cpu")
    stats = r.info("commandstats")
    usec = {name.removeprefix("cmdstat_"): float(v["usec"]) for name, v in stats.items()}
    usec["reads"] = float(r.info("stats")["total_reads_processed"])  # socket reads: how well clients pipeline
    usec.update({f"calls:{name.removeprefix('cmdstat_')}": float(v["calls"]) for name, v in stats.items()})
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]), usec


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def one_n(workdir: Path, n: int, tokens: int, interval_ms: int, profile: Path | None = None) -> dict[str, Any]:
    # Imported here: the client processes need none of it (tests.helpers pulls in the test stack).
    from tests.helpers import Proc, RedisServer, served_models, spawn, spawn_gateway, wait_for, worker_args

    server = RedisServer(workdir).start()
    procs: list[Proc] = []
    workers = max(2, math.ceil(n / SLOTS_PER_WORKER))
    slots = math.ceil(n / workers) + 4
    try:
        extra = ["--stream-interval-ms", str(interval_ms), "--heartbeat-s", "2"]
        for _ in range(workers):
            args = worker_args(server.url, delay=TOKEN_DELAY_S, slots=slots, lease_s=10.0, extra=extra)
            procs.append(spawn("worker", args, workdir))
        wait_for(lambda: len(server.client().zrange("ivl:workers", 0, -1)) >= workers, 120, "workers")
        gateway, base = spawn_gateway(
            server.url, workdir, "--log-level", "warning", "--max-queue", str(n + 100), "--redis-max-connections", "256"
        )
        procs.append(gateway)
        wait_for(lambda: bool(served_models(base)), 60, "gateway")
        port = int(base.rsplit(":", 1)[1])
        gw = psutil.Process(gateway.popen.pid)
        rss_before = gw.memory_info().rss
        worker_pids = [p.popen.pid for p in procs[:workers]]
        cpu0 = (cpu_s(gw.pid), sum(cpu_s(p) for p in worker_pids), *redis_snapshot(server))
        began = time.monotonic()
        halves = {"fastchat": (0, n // 2), "openai": (n // 2, n - n // 2)}
        outs = {name: workdir / f"clients-{name}-{n}.json" for name in halves}
        clients = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "bench.capacity",
                    "--client",
                    name,
                    "--port",
                    str(port),
                    "--first",
                    str(first),
                    "--count",
                    str(count),
                    "--tokens",
                    str(tokens),
                    "--out",
                    str(outs[name]),
                ],
                cwd=Path(__file__).resolve().parent.parent,
            )
            for name, (first, count) in halves.items()
        ]
        if profile is not None:  # py-spy (pip install py-spy) on the gateway and one worker while the streams run
            for pid, name in ((gw.pid, "gateway"), (worker_pids[0], "worker")):
                spy = [str(Path(sys.executable).parent / "py-spy"), "record", "-p", str(pid), "-r", "250"]
                spy += ["-d", str(int(tokens * TOKEN_DELAY_S)), "-f", "raw", "--nonblocking"]
                spy += ["-o", f"{profile}-{name}-{n}.txt"]
                subprocess.Popen(spy, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # RSS with every stream open: sampled while the clients run, the peak kept
        rss_peak = rss_before
        while any(c.poll() is None for c in clients):
            rss_peak = max(rss_peak, gw.memory_info().rss)
            time.sleep(0.5)
        cpu1 = (cpu_s(gw.pid), sum(cpu_s(p) for p in worker_pids), *redis_snapshot(server))
        wall_s = time.monotonic() - began
        reports = {name: json.loads(outs[name].read_text()) for name in halves}
        streams = {name: report["streams"] for name, report in reports.items()}
        clients_cpu_s = sum(report["cpu_s"] for report in reports.values())
    finally:
        for proc in procs:
            proc.stop(10)
        server.kill()
    summary = summarise(n, tokens, streams, cpu0, cpu1, rss_before, rss_peak, workers, slots, interval_ms)
    return summary | box_share(summary, cpu0, cpu1, clients_cpu_s, wall_s)


def box_share(
    summary: dict[str, Any],
    cpu0: tuple[float, float, float, dict[str, float]],
    cpu1: tuple[float, float, float, dict[str, float]],
    clients_cpu_s: float,
    wall_s: float,
) -> dict[str, Any]:
    """What the whole run took of the box: every process here shares its cores, so when their CPU per event
    times the event rate passes the cores there are, events queue (the added delay's tail), whatever each costs."""
    events = max(summary["events_published"], 1)
    total_s = sum(b - a for a, b in zip(cpu0[:3], cpu1[:3], strict=True)) + clients_cpu_s
    return {
        "clients_cpu_us_per_event": round(clients_cpu_s * 1e6 / events, 1),
        "all_processes_cpu_us_per_event": round(total_s * 1e6 / events, 1),
        "cores_busy": round(total_s / max(wall_s, 1e-9), 2),
        "cores": psutil.cpu_count(),
    }


def summarise(
    n: int,
    tokens: int,
    streams: dict[str, list[dict[str, Any]]],
    cpu0: tuple[float, float, float, dict[str, float]],
    cpu1: tuple[float, float, float, dict[str, float]],
    rss_before: int,
    rss_peak: int,
    workers: int,
    slots: int,
    interval_ms: int,
) -> dict[str, Any]:
    every = [s for half in streams.values() for s in half]
    errors = [s["error"] for s in every if "error" in s]
    complete = [s for s in every if len(s["recv"]) == tokens]
    # Per stream: tokens delivered over the time from the engine's start (one token period before its first
    # token) to the last token's arrival; 20 tokens/s when nothing between engine and client falls behind.
    # Summed over streams, as the issue asks, and robust to the ramp (N streams do not start at one instant).
    delivered = 0.0
    for s in every:
        if s["recv"]:
            began = s["recv"][0] - s["delay"][0] - TOKEN_DELAY_S
            delivered += len(s["recv"]) / max(s["recv"][-1] - began, 1e-9)
    starts = [s["recv"][0] - s["delay"][0] for s in every if s["recv"]]
    ramp = max(starts) - min(starts) if starts else 0.0
    events = sum(s.get("chunks", 0) for s in every)
    commands = {k: v - cpu0[3].get(k, 0.0) for k, v in cpu1[3].items()}
    # Also counted when called from the publish script; shard channels (SPUBLISH) since jobs publish per slot.
    published = int(commands.get("calls:spublish", 0) + commands.get("calls:publish", 0))
    busiest = sorted((k for k in commands if not k.startswith("calls:") and k != "reads"), key=lambda k: -commands[k])[
        :6
    ]
    gateway_cpu, worker_cpu, redis_cpu = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1], cpu1[2] - cpu0[2]

    def delays(which: list[dict[str, Any]], first_only: bool = False) -> dict[str, float]:
        values = [d for s in which for d in (s["delay"][:1] if first_only else s["delay"])]
        if not values:
            return {"p50": -1.0, "p99": -1.0}
        return {"p50": round(pct(values, 50) * 1000, 2), "p99": round(pct(values, 99) * 1000, 2)}

    return {
        "efficiency": round(delivered / (n * RATE), 3),
        "delivered_tokens_per_s": round(delivered),
        "expected_tokens_per_s": n * RATE,
        "ramp_s": round(ramp, 2),
        "added_delay_ms": delays(every),
        "added_delay_ms_by_protocol": {name: delays(half) for name, half in streams.items()},
        # Each stream's first token alone (its client's time to first token under this load, the requests'
        # ramp included), beside the per-chunk figure above: a run's first delta skips its worker's window.
        "first_token": {"added_delay_ms": delays(every, first_only=True)},
        "gateway_cpu_ms_per_1000_events": round(gateway_cpu * 1e6 / max(events, 1), 1),
        "gateway_rss_kb_per_stream": round((rss_peak - rss_before) / 1024 / n, 1),
        "redis_cpu_us_per_event": round(redis_cpu * 1e6 / max(published, 1), 2),
        # Inside commands only (a script's time includes the commands it calls); the rest of redis_cpu_us_per_event
        # is the event loop and socket I/O, and the workers' and gateways' other commands.
        "redis_command_us_per_event": {k: round(commands[k] / max(published, 1), 2) for k in busiest},
        "redis_socket_reads_per_event": round(commands.get("reads", 0.0) / max(published, 1), 3),
        # Commands sent per 1,000 published events (a script's inner commands included): events per publish call
        # is 1,000 / evalsha's figure, and anything else per event shows here.
        "redis_calls_per_1000_events": {
            k.removeprefix("calls:"): round(v * 1000 / max(published, 1), 1)
            for k, v in sorted(commands.items())
            if k.startswith("calls:") and v
        },
        "worker_cpu_us_per_event": round(worker_cpu * 1e6 / max(published, 1), 1),
        "events_relayed": events,
        "events_published": published,
        "streams_complete": len(complete),
        "errors": errors[:3],
        "error_count": len(errors),
        "setup": {"workers": workers, "slots_per_worker": slots, "stream_interval_ms": interval_ms, "tokens": tokens},
        "load_avg_1m": round(psutil.getloadavg()[0], 2),
    }


def publish_cost(workdir: Path, jobs: int = 200, rounds: int = 50) -> dict[str, float]:
    """Redis CPU per event of ``lua/publish.lua`` alone, by events per call (a worker's calls carry what its jobs
    made during one round trip or ``--publish-window-ms``), with a subscriber on every job's channel: what one
    Redis node's core costs per event at each batch size, without the rest of the stack on the CPU."""
    from broker_worker.protocol import constants as c
    from broker_worker.protocol.script_pipeline import lua
    from tests.helpers import RedisServer

    server = RedisServer(workdir).start()
    try:
        r = server.client()
        sha = r.script_load(lua("publish"))
        pubsub = r.pubsub()
        pubsub.ssubscribe(*[c.job_channel(f"p{j}") for j in range(jobs)])
        body = '"type":"delta","text":"@1764000000.123456 "'
        out: dict[str, float] = {}
        for per_call in (1, 3, 10, 30):
            r.flushall()
            for j in range(jobs):
                r.hset(c.job_state_key(f"p{j}"), mapping={"owner": "t", "seq": 0, "status": "running"})
            cpu0 = redis_snapshot(server)[0]
            for seq in range(1, rounds + 1):
                for first in range(0, jobs, per_call):
                    keys: list[str] = []
                    args: list[str | int] = [c.REPLAY_MAXLEN, c.JOB_TTL_S]
                    for j in range(first, min(first + per_call, jobs)):
                        keys += [c.job_state_key(f"p{j}"), c.job_events_key(f"p{j}"), c.job_cancel_key(f"p{j}")]
                        args += ["t", body, seq]
                    r.evalsha(sha, len(keys), *keys, *args)
                while pubsub.get_sharded_message(timeout=0) is not None:
                    pass
            out[str(per_call)] = round((redis_snapshot(server)[0] - cpu0) * 1e6 / (jobs * rounds), 2)
        pubsub.close()
    finally:
        server.kill()
    return out


def concurrent_streams(
    workdir: Path, ns: list[int], tokens: int = 200, interval_ms: int = 20, profile: Path | None = None
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for n in ns:
        print(f"[bench] concurrent_streams N={n} …", flush=True)
        out[str(n)] = one_n(workdir, n, tokens, interval_ms, profile)
        print(json.dumps(out[str(n)]), flush=True)
    out["redis_publish_us_per_event_by_events_per_call"] = publish_cost(workdir)
    print(json.dumps(out["redis_publish_us_per_event_by_events_per_call"]), flush=True)
    return {"concurrent_streams": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", default="100,300,1000", help="stream counts, comma-separated")
    parser.add_argument("--tokens", type=int, default=200, help="tokens per stream (200 = 10 s at 20 tokens/s)")
    parser.add_argument("--stream-interval-ms", type=int, default=20, help="the workers' coalescing window")
    parser.add_argument("--py-spy", type=Path, default=None, help="profile the gateway: raw stacks to PATH-N.txt")
    parser.add_argument("--client", choices=["fastchat", "openai"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        client_main(args.client, args.port, args.first, args.count, args.tokens, args.out)
        return
    with tempfile.TemporaryDirectory() as tmp:
        found = concurrent_streams(
            Path(tmp), [int(v) for v in args.n.split(",")], args.tokens, args.stream_interval_ms, args.py_spy
        )
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    merged = results.get("concurrent_streams", {}) | found["concurrent_streams"]
    RESULTS.write_text(json.dumps(results | {"concurrent_streams": merged}, indent=2, sort_keys=True))
    print(f"wrote concurrent_streams for N = {', '.join(found['concurrent_streams'])} to {RESULTS}")


if __name__ == "__main__":
    main()
