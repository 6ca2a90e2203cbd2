"""``broker-batch``: ``run`` an OpenAI Batch API file through the workers over Redis, or show its ``status``.

Exit codes of ``run``: 0 every input line has an output line and none is an error; 3 every input line has an
output line and some are errors (bad lines, failed or cancelled requests); 1 it could not start (no input file,
Redis unreachable); 2 usage; 130 interrupted (Ctrl-C, SIGTERM): the jobs in flight stay queued, and running the
same command again collects them (``--cancel`` cancels them instead).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import time
from pathlib import Path

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from broker_batch import lines, status
from broker_batch.lines import Options
from broker_batch.progress import Progress
from broker_batch.results import Answered, ResultFile
from broker_batch.runner import BatchRunner
from broker_worker import settings_cli
from broker_worker.protocol.connections import async_redis
from broker_worker.protocol.redaction import redact
from broker_worker.settings import RedisSettings

EXIT_OK, EXIT_CANNOT_START, EXIT_USAGE, EXIT_ERROR_LINES, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    url = settings_cli.build(RedisSettings, args).redis_url
    if not args.input.is_file():
        print(f"broker-batch: no input file {args.input}", file=sys.stderr)
        return EXIT_CANNOT_START
    options = Options(args.input.resolve().parent, args.model, getattr(args, "priority", "batch"))
    try:
        return asyncio.run(_main(args, url, options))
    except KeyboardInterrupt:  # before the signal handlers were in place
        return EXIT_INTERRUPTED


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="broker-batch", description="OpenAI Batch API files over Redis Streams")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="answer every line of INPUT into --output (resumable)")
    run.add_argument("input", type=Path, help="OpenAI Batch API input (JSONL)")
    run.add_argument("--output", type=Path, required=True, help="results (JSONL); lines already there are skipped")
    run.add_argument("--max-in-flight", type=_positive, default=64, help="jobs queued or running at once")
    run.add_argument("--priority", choices=("batch", "interactive"), default="batch", help="lane (default batch)")
    run.add_argument("--cancel", action="store_true", help="cancel the jobs a run left queued or running; no run")
    show = commands.add_parser("status", help="how far a run of INPUT is")
    show.add_argument("input", type=Path)
    show.add_argument("--output", type=Path, default=None, help="the run's results (default: Redis only)")
    for command in (run, show):
        command.add_argument("--model", default=None, help="model for every line (default: each body's)")
        settings_cli.add_arguments(command, RedisSettings)
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: at least 1")
    return value


async def _main(args: argparse.Namespace, url: str, options: Options) -> int:
    redis = async_redis(url)
    task = asyncio.current_task()
    assert task is not None
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, task.cancel)
    try:
        await redis.ping()
    except (RedisError, OSError) as exc:
        print(f"broker-batch: Redis at {redact(url)} is unreachable: {exc}", file=sys.stderr)
        return EXIT_CANNOT_START
    try:
        if args.command == "status":
            return await _status(redis, args, options)
        return await (_cancel(redis, args, options) if args.cancel else _run(redis, args, options))
    except asyncio.CancelledError:
        return EXIT_INTERRUPTED
    except OSError as exc:  # the files: an output folder that does not exist, a file it may not read or write
        print(f"broker-batch: {exc}", file=sys.stderr)
        return EXIT_CANNOT_START
    finally:
        with contextlib.suppress(RedisError, OSError):
            await redis.aclose()


async def _status(redis: aioredis.Redis, args: argparse.Namespace, options: Options) -> int:
    answered = ResultFile(args.output).read() if args.output else Answered()
    print(await status.report(redis, args.input, options, answered, str(args.output or "")))
    return EXIT_OK


async def _cancel(redis: aioredis.Redis, args: argparse.Namespace, options: Options) -> int:
    answered = ResultFile(args.output).read()
    count = await status.cancel(redis, args.input, options, answered)
    print(f"broker-batch: cancelled {count} queued or running jobs of {args.input}")
    return EXIT_OK


async def _run(redis: aioredis.Redis, args: argparse.Namespace, options: Options) -> int:
    results = ResultFile(args.output)
    answered = results.open()
    total = sum(1 for _ in lines.scan(args.input))
    progress = Progress(total, answered.rows, answered.errors)
    runner = BatchRunner(redis, results, progress, args.max_in_flight)
    started = time.monotonic()
    try:
        await runner.run(lines.read(args.input, options, answered.has))
    except asyncio.CancelledError:
        progress.close()
        print(
            f"broker-batch: interrupted: {len(runner.in_flight)} jobs stay queued or running in Redis; run the same"
            " command again to collect their results, or add --cancel to cancel them",
            file=sys.stderr,
        )
        raise
    finally:
        results.close()
    progress.close()
    elapsed = time.monotonic() - started
    print(
        f"broker-batch: {answered.rows}/{total} lines in {args.output}, {answered.errors} with an error; this run "
        f"queued {runner.submitted} jobs, re-attached to {runner.attached}, in {elapsed:.1f}s",
        file=sys.stderr,
    )
    return EXIT_ERROR_LINES if answered.errors else EXIT_OK
