"""The individual measurements of ``make bench``; each returns its fields of results.json."""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import redis
import torch
from PIL import Image

from broker_worker.model import tiling
from broker_worker.model.prompt import build_conversation
from broker_worker.protocol.messages import ChatMessage, Job
from tests import internvl_reference
from tests.helpers import Proc, RedisServer, png_b64, served_models, spawn, spawn_gateway, wait_for, worker_args


def tiny_model(workdir: Path) -> Path:
    from broker_worker.model.tiny_model import make_tiny_model

    return make_tiny_model(workdir / "tiny-internvl")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


@contextmanager
def stack(
    workdir: Path, workers: list[dict[str, Any]], gateway: bool = True
) -> Iterator[tuple[RedisServer, str, list[Proc]]]:
    """A redis-server, worker processes (``worker_args`` keywords each) and a gateway; all stopped afterwards."""
    server = RedisServer(workdir).start()
    procs: list[Proc] = []
    try:
        for kwargs in workers:
            procs.append(spawn("worker", worker_args(server.url, **{"slots": 8, **kwargs}), workdir))
        wait_for(lambda: len(server.client().zrange("ivl:workers", 0, -1)) >= len(workers), 120, "workers")
        base = ""
        if gateway:
            proc, base = spawn_gateway(server.url, workdir, "--log-level", "warning", "--max-new-tokens", "16384")
            procs.append(proc)
            wait_for(lambda: bool(served_models(base)), 60, "gateway")
        yield server, base, procs
    finally:
        for proc in procs:
            proc.stop(10)
        server.kill()


def run_jobs(r: redis.Redis, model: str, ids: list[str], tokens: int, poll_s: float = 0.01, **params: Any) -> None:
    """Queue jobs straight on the model's stream and wait until each is done."""
    for job_id in ids:
        job = {"id": job_id, "model": model, "max_new_tokens": tokens, "prompt": [{"role": "user", "content": "go"}]}
        r.xadd(f"ivl:jobs:{model}", {"job": json.dumps(job | params)})

    def finished() -> bool:
        return all(r.hget(f"ivl:job:{{{job_id}}}:state", "status") == "done" for job_id in ids)

    wait_for(finished, 300, f"{len(ids)} jobs", step=poll_s)


# --- tiling ---------------------------------------------------------------------------------------------------


def noise(width: int, height: int) -> Image.Image:
    base = Image.effect_noise((width, height), 60).convert("L")
    return Image.merge("RGB", [base, base.transpose(Image.Transpose.FLIP_LEFT_RIGHT), base.rotate(180)])


def tiling_speed() -> dict[str, Any]:
    torch.set_num_threads(1)
    sizes = [(1920, 1080), (800, 600), (1024, 4000), (640, 480), (3000, 2000), (448, 448), (1280, 720)]
    images = [noise(*s) for s in sizes]
    internvl_times, ours_times, max_diff = [], [], 0.0
    for _ in range(5):
        for image in images:
            t0 = time.perf_counter()
            expected = internvl_reference.pixel_values(image, 12)
            t1 = time.perf_counter()
            actual = tiling.tile_image(image, max_num=12)
            t2 = time.perf_counter()
            internvl_times.append(t1 - t0)
            ours_times.append(t2 - t1)
            max_diff = max(max_diff, float((expected - actual).abs().max()))
    torch.set_num_threads(torch.get_num_threads())
    return {
        "tiling_speedup": round(sum(internvl_times) / sum(ours_times), 3),
        "tiling_max_abs_diff": max_diff,
        "tiling_ms": {
            "internvl_median": round(statistics.median(internvl_times) * 1000, 2),
            "tile_image_median": round(statistics.median(ours_times) * 1000, 2),
        },
    }


# --- repeated images --------------------------------------------------------------------------------------------


def repeat_image(model_path: Path) -> dict[str, Any]:
    """InternVL's app resends every image with every turn: preprocessing per request, with and without the cache."""
    from broker_worker.model.internvl_engine import InternVLEngine, tensor_bytes
    from broker_worker.model.loading import LoadOptions, load
    from broker_worker.protocol.images import LruCache

    engine = InternVLEngine(load(LoadOptions(model_path)), "tiny")
    images = [png_b64(1280, 720, 1), png_b64(800, 600, 2)]
    turns = [[ChatMessage(role="user", content="Compare these.", image=images)]]
    for k in range(2, 6):
        turns.append(
            [
                *turns[-1],
                ChatMessage(role="assistant", content=f"answer {k}"),
                ChatMessage(role="user", content=f"question {k}"),
            ]
        )
    timings: dict[str, list[float]] = {"cache": [], "no_cache": []}
    for mode in ("no_cache", "cache", "no_cache", "cache"):
        size = 512 * 2**20 if mode == "cache" else 0
        engine._tiles = LruCache(size, tensor_bytes)
        engine._stacks = LruCache(size, lambda s: tensor_bytes(s[0]))
        for prompt in turns:
            conversation = build_conversation(prompt, 12)
            t0 = time.perf_counter()
            engine.pixel_values(conversation)
            timings[mode].append(time.perf_counter() - t0)
    resent = {m: [t for k, t in enumerate(v) if k % 5 != 0] for m, v in timings.items()}  # turns 2-5
    return {
        "repeat_image_speedup": round(statistics.mean(resent["no_cache"]) / statistics.mean(resent["cache"]), 1),
        "repeat_image_5_turn_total_speedup": round(sum(timings["no_cache"]) / sum(timings["cache"]), 2),
        "repeat_image_ms": {
            "no_cache_per_request": round(statistics.mean(resent["no_cache"]) * 1000, 2),
            "cache_per_request": round(statistics.mean(resent["cache"]) * 1000, 3),
        },
    }


# --- time to first token ----------------------------------------------------------------------------------------


def ttft(workdir: Path, model_path: Path, device: str, requests: int) -> dict[str, Any]:
    from broker_worker.model.internvl_engine import InternVLEngine
    from broker_worker.model.loading import LoadOptions, load

    # Both sides get one torch thread: on 2 cores the worker shares the CPU with Redis, the gateway and this
    # client, while the in-process engine would have it to itself.
    torch.set_num_threads(1)
    engine = InternVLEngine(load(LoadOptions(model_path, device=device)), "tiny")  # type: ignore[arg-type]
    worker = {"model": "tiny", "model_path": model_path, "extra": ["--device", device, "--torch-threads", "1"]}
    with stack(workdir, [worker]) as (server, base, _procs):
        local, remote, direct = [], [], []
        r = server.client()
        with httpx.Client(timeout=60) as client:
            for k in range(requests):
                body = {
                    "model": "tiny",
                    "prompt": [{"role": "user", "content": f"Question number {k}: what is it?"}],
                    "temperature": 0,
                    "max_new_tokens": 4,
                }
                first = (
                    _ttft_local(engine, body),
                    _ttft_http(client, base, body),
                    _ttft_redis(r, body | {"id": f"direct-{k}"}),
                )
                if k >= 5:  # warm-up excluded
                    local.append(first[0])
                    remote.append(first[1])
                    direct.append(first[2])
    diffs = [r - loc for r, loc in zip(remote, local, strict=True)]

    def ms(values: list[float], q: float, minus: list[float] | None = None) -> float:
        return round((pct(values, q) - (pct(minus, q) if minus else 0.0)) * 1000, 3)

    return {
        "ttft_overhead_ms": {
            "p50": ms(remote, 50, local),
            "p99": ms(remote, 99, local),
            "paired_p50": ms(diffs, 50),
            "paired_p99": ms(diffs, 99),
            "redis_and_worker_only_p50": ms(direct, 50, local),
        },
        "ttft_ms": {
            "in_process_p50": ms(local, 50),
            "in_process_p99": ms(local, 99),
            "gateway_p50": ms(remote, 50),
            "gateway_p99": ms(remote, 99),
            "redis_client_p50": ms(direct, 50),
            "pairs": len(diffs),
        },
    }


def _ttft_redis(r: redis.Redis, job: dict[str, Any]) -> float:
    """The same job through Redis alone: subscribe, XADD, first delta on the channel (a shard channel: SSUBSCRIBE)."""
    pubsub = r.pubsub()
    pubsub.ssubscribe(f"ivl:job:{{{job['id']}}}:chan")
    pubsub.get_sharded_message(timeout=1)
    t0 = time.perf_counter()
    r.xadd("ivl:jobs:tiny", {"job": json.dumps(job)})
    first = 0.0
    while True:
        message = pubsub.get_sharded_message(timeout=10)
        if message is None:
            raise AssertionError("no event within 10 s")
        if message["type"] != "smessage":
            continue
        event = json.loads(message["data"])
        if not first and event["type"] == "delta" and event["text"]:
            first = time.perf_counter()
        if event["type"] in ("done", "failed", "cancelled"):
            pubsub.close()
            return (first or time.perf_counter()) - t0


def _ttft_local(engine: Any, body: dict[str, Any]) -> float:
    job = Job.model_validate(body)
    first: list[float] = []
    t0 = time.perf_counter()
    engine.generate(job, "", threading.Event(), lambda _text: first.append(time.perf_counter()) if not first else None)
    return (first[0] if first else time.perf_counter()) - t0


def _ttft_http(client: httpx.Client, base: str, body: dict[str, Any]) -> float:
    t0 = time.perf_counter()
    first = 0.0
    with client.stream("POST", base + "/worker_generate_stream", json=body) as response:
        buffer = b""
        for piece in response.iter_raw():
            buffer += piece
            while not first and b"\0" in buffer:
                frame, buffer = buffer.split(b"\0", 1)
                if json.loads(frame)["text"]:
                    first = time.perf_counter()
    return (first or time.perf_counter()) - t0


# --- scaling --------------------------------------------------------------------------------------------------


def scaling(workdir: Path) -> dict[str, Any]:
    """Worker processes with a fake engine of fixed per-token latency: throughput of N over N x one."""
    tokens, delay, slots = 40, 0.005, 2
    rates: dict[str, float] = {}
    for n in (1, 2, 4, 1):  # 1 again at the end: the baseline is the better of two runs
        with stack(workdir, [{"delay": delay, "slots": slots}] * n, gateway=False) as (server, _, _procs):
            r = server.client()
            jobs = 8 * slots * n
            t0 = time.perf_counter()
            run_jobs(r, "fake", [f"s{n}-{k}" for k in range(jobs)], tokens)
            rate = jobs * tokens / (time.perf_counter() - t0)
            rates[str(n)] = max(rates.get(str(n), 0.0), rate)
    return {
        "scaling_efficiency": {n: round(rates[n] / (int(n) * rates["1"]), 3) for n in ("1", "2", "4")},
        "scaling_tokens_per_s": {n: round(v, 1) for n, v in rates.items()},
    }


# --- bytes written to Redis -----------------------------------------------------------------------------------


def redis_bytes(workdir: Path) -> dict[str, Any]:
    """Bytes clients send to Redis (its total_net_input_bytes) per byte of generated text, for a 2,000-token answer.

    The headline figure is at the default 20 ms coalescing window with an engine at 200 tokens/s; the other runs
    show the trade-off between update rate and bytes (each event costs ~200 bytes of command overhead).
    """
    out: dict[str, Any] = {}
    runs = [
        ("max_speed", 0.0, 20),
        ("200_tok_per_s", 0.005, 20),
        ("200_tok_per_s_interval_50ms", 0.005, 50),
        ("200_tok_per_s_interval_100ms", 0.005, 100),
    ]
    for label, delay, interval in runs:
        extra = ["--heartbeat-s", "30", "--stream-interval-ms", str(interval)]
        with stack(workdir, [{"delay": delay, "extra": extra}], gateway=False) as (server, _, _):
            r = server.client()
            before = int(r.info("stats")["total_net_input_bytes"])
            run_jobs(r, "fake", ["bytes"], 2000, poll_s=1.0)  # rare polls: our own commands count as input too
            written = int(r.info("stats")["total_net_input_bytes"]) - before
            text = "".join(json.loads(f["e"]).get("text", "") for _, f in r.xrange("ivl:job:{bytes}:events"))
            events = r.xlen("ivl:job:{bytes}:events")
            out[label] = {
                "bytes_per_output_byte": round(written / len(text.encode()), 3),
                "events": events,
                "output_bytes": len(text.encode()),
            }
    # InternVL's model worker re-sends the whole text with every token: the sum of the prefix lengths.
    pieces = [f"t{i}:2 " for i in range(2000)]
    cumulative = sum(len("".join(pieces[: i + 1])) for i in range(len(pieces)))
    out["internvl_cumulative_bytes_per_output_byte"] = round(cumulative / len("".join(pieces)), 1)
    return {"redis_bytes_per_output_byte": out["200_tok_per_s"]["bytes_per_output_byte"], "redis_bytes": out}


# --- relay throughput -----------------------------------------------------------------------------------------


def relay(workdir: Path) -> dict[str, Any]:
    """Text chunks per second from a max-speed fake engine through Redis and the gateway to an HTTP client.

    ``relay_chunks_per_s`` counts engine chunks (tokens) delivered, with the worker's default coalescing: text
    produced while a publish is in flight rides in the next event. ``relay_events_per_s`` is the event rate
    itself (publish -> pub/sub -> gateway -> SSE line) with coalescing off and an engine faster than the relay.
    """
    tokens = 16_000  # the protocol's max_new_tokens limit is 16,384
    body = {"model": "fake", "stream": True, "max_tokens": tokens, "messages": [{"role": "user", "content": "go"}]}
    out: dict[str, Any] = {}
    for label, worker in (
        ("default", {"delay": 0.0}),
        ("no_coalescing", {"delay": 0.00002, "extra": ["--stream-interval-ms", "0"]}),
    ):
        with stack(workdir, [worker]) as (_, base, _procs):
            best = (0.0, 0, 0.0)
            for _ in range(3):
                t0 = time.perf_counter()
                pieces = _sse_pieces(base, body)
                elapsed = time.perf_counter() - t0
                if "".join(pieces).count(" ") != tokens:
                    raise AssertionError(f"relay lost or duplicated text: {''.join(pieces).count(' ')} of {tokens}")
                if tokens / elapsed > best[0]:
                    best = (tokens / elapsed, len(pieces), len(pieces) / elapsed)
            out[label] = {"engine_chunks_per_s": round(best[0]), "events": best[1], "events_per_s": round(best[2])}
    return {
        "relay_chunks_per_s": out["default"]["engine_chunks_per_s"],
        "relay_events_per_s": out["no_coalescing"]["events_per_s"],
        "relay": out,
    }


def _sse_pieces(base: str, body: dict[str, Any]) -> list[str]:
    pieces: list[str] = []
    with httpx.stream("POST", base + "/v1/chat/completions", timeout=120, json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
                if delta:
                    pieces.append(delta)
    return pieces


# --- batching (stretch) ---------------------------------------------------------------------------------------


def batching(workdir: Path, model_path: Path, device: str) -> dict[str, Any]:
    """Tokens/s of one worker with 8 concurrent jobs vs one at a time (tiny model, ``--max-batch-size 8``)."""
    worker = {"model": "tiny", "model_path": model_path, "extra": ["--device", device, "--max-batch-size", "8"]}
    with stack(workdir, [worker], gateway=False) as (server, _, _procs):
        r = server.client()

        def run(n: int, tag: str) -> float:
            t0 = time.perf_counter()
            run_jobs(r, "tiny", [f"{tag}{k}" for k in range(n)], 64, temperature=0)
            return n * 64 / (time.perf_counter() - t0)

        serial = sum(run(1, f"one{k}-") for k in range(4)) / 4
        concurrent = run(8, "eight-")
    return {
        "batching_speedup_8": round(concurrent / serial, 2),
        "batching_tokens_per_s": {"one_at_a_time": round(serial, 1), "eight_concurrent": round(concurrent, 1)},
    }
