"""``broker-worker``: ``run`` a worker, ``check`` that one is alive (healthchecks), ``make-tiny-model``."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys

from broker_worker import settings_cli
from broker_worker.model.engine import Engine
from broker_worker.protocol.connections import async_redis, plain_url_problem
from broker_worker.protocol.errors import USER_REFUSED
from broker_worker.protocol.redaction import redact
from broker_worker.settings import RedisSettings, WorkerSettings
from broker_worker.stall import EXIT_STALLED, EngineStalled

GIL_SWITCH_S = 0.0005

log = logging.getLogger("broker_worker.cli")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="broker-worker", description="InternVL worker fed by Redis Streams")
    commands = parser.add_subparsers(dest="command", required=True)
    settings_cli.add_arguments(
        commands.add_parser("run", help="serve one model from a Redis job stream"), WorkerSettings
    )
    check = commands.add_parser("check", help="exit 0 when a live worker serves the model")
    settings_cli.add_arguments(check, RedisSettings)
    check.add_argument("--model", default=None, help="model name (default: any model)")
    tiny = commands.add_parser("make-tiny-model", help="write a tiny random-weight InternVL checkpoint (noise!)")
    tiny.add_argument("directory")
    tiny.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "run":
        return run(settings_cli.build(WorkerSettings, args))
    if args.command == "check":
        return asyncio.run(check_alive(settings_cli.build(RedisSettings, args).redis_url, args.model))
    return make_tiny(args.directory, args.seed)


def make_tiny(directory: str, seed: int) -> int:
    from broker_worker.model.tiny_model import NOISE_NOTICE, make_tiny_model

    path = make_tiny_model(directory, seed)
    print(f"wrote {path}: {NOISE_NOTICE}")
    return 0


def build_engine(settings: WorkerSettings) -> Engine:
    if settings.fake_engine:
        from broker_worker.model.fake_engine import FakeEngine

        return FakeEngine(settings.resolved_model_name(), settings.fake_token_delay_s)
    if settings.model_path is None:
        raise SystemExit("broker-worker run: --model-path is required (or --fake-engine)")
    import torch

    from broker_worker.model.internvl_engine import InternVLEngine
    from broker_worker.model.loading import CheckpointError, LoadOptions, load

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)

    try:
        loaded = load(LoadOptions.from_settings(settings))
    except CheckpointError as exc:
        raise SystemExit(f"broker-worker: cannot serve {settings.model_path}: {exc}") from exc
    engine = InternVLEngine(loaded, settings.resolved_model_name())
    if settings.max_batch_size > 1:
        from broker_worker.model.batching import BatchingEngine

        return BatchingEngine(engine, settings.max_batch_size)
    return engine


def run(settings: WorkerSettings) -> int:
    from broker_worker.logs import configure

    configure(settings.log_level, settings.log_format)
    log.info("connecting to %s", redact(settings.redis_url))
    if problem := plain_url_problem(settings.redis_url):  # before the model loads: fail in seconds, not minutes
        raise SystemExit(f"broker-worker: {problem}")
    engine = build_engine(settings)
    # The engine runs Python in its own thread; with the default 5 ms GIL switch interval the event loop could wait
    # that long to publish a token the engine just made (measured: most of the TTFT overhead). 0.5 ms bounds it.
    sys.setswitchinterval(GIL_SWITCH_S)
    # The model and every import live as long as the process: frozen out of the collector's sight, a full
    # collection scans only what jobs allocate (a pass over torch and transformers' objects stalls every stream).
    gc.freeze()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is not built for every platform
        return asyncio.run(_serve(settings, engine))
    return uvloop.run(_serve(settings, engine))


async def _serve(settings: WorkerSettings, engine: Engine) -> int:
    from broker_worker.worker import Worker

    redis = async_redis(settings.redis_url, encoding_errors="surrogateescape")
    worker = Worker(settings, engine, redis)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    try:
        await worker.run()
    except EngineStalled as exc:
        log.error("%s; exiting with status %d", exc, EXIT_STALLED)
        logging.shutdown()
        os._exit(EXIT_STALLED)  # not SystemExit: the interpreter would wait for the stuck engine thread for ever
    except USER_REFUSED as exc:  # a setup error: one line, no retry
        raise SystemExit(
            f"broker-worker: Redis refused this worker's user ({exc}); the ACL a worker needs is in "
            "docs/reliability.md, 'Security model'"
        ) from exc
    finally:
        await redis.aclose()
    return 0


async def check_alive(redis_url: str, model: str | None) -> int:
    from broker_worker.protocol import health

    if problem := plain_url_problem(redis_url):
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    redis = async_redis(redis_url)
    try:
        workers = await health.live_workers(redis)
    except Exception as exc:
        print(f"unhealthy: redis unreachable: {exc}", file=sys.stderr)
        return 1
    finally:
        await redis.aclose()
    serving = [w for w in workers if model is None or w.model == model]
    if not serving:
        print(f"unhealthy: no live worker for {model or 'any model'}", file=sys.stderr)
        return 1
    print(f"ok: {len(serving)} live worker(s): {', '.join(w.worker_id for w in serving)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
