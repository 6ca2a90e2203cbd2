"""``broker-admin``: see and steer the queues through Redis (any URL form the workers accept).

  broker-admin status                          models (queued, running, oldest wait), workers (slots, tokens/s)
  broker-admin job ID                          a job's state, times, events, text, outcome
  broker-admin dead list [--limit N] | show REF | requeue REF… | --all | purge [--older-than 2h]
  broker-admin cancel ID… [--force]            cancel jobs (queued or running)
  broker-admin drain WORKER_ID… [--wait S]     a worker stops taking jobs, finishes or hands back its own, exits
  broker-admin failures [--limit N]            failed jobs still in Redis, counted by error code

``--json`` (before or after the command) prints JSON for scripts. Exit status: 0 ok, 1 not found (job, dead
letter, worker), 2 usage, 3 refused (exists but cannot be done: a dead letter with no runnable job, a job that
already ended), 4 Redis unreachable, 5 ``drain --wait`` timed out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import redis

from broker_worker import admin_ops as ops
from broker_worker import admin_read as read
from broker_worker import settings_cli
from broker_worker.admin_format import print_dead, print_failures, print_job, print_status
from broker_worker.protocol.connections import sync_redis
from broker_worker.protocol.redaction import redact
from broker_worker.settings import RedisSettings

Handler = Callable[[redis.Redis, argparse.Namespace], int]


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="broker-admin", description=__doc__.split("\n\n")[0])
    settings_cli.add_arguments(top, RedisSettings)
    top.add_argument("--json", action="store_true", help="JSON output for scripts")
    common = argparse.ArgumentParser(add_help=False)  # --json after the command too (SUPPRESS keeps the top's)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="JSON output for scripts")
    commands = top.add_subparsers(dest="command", required=True)
    commands.add_parser("status", parents=[common], help="models and workers")
    commands.add_parser("job", parents=[common], help="one job by id").add_argument("job_id")
    dead = commands.add_parser("dead", parents=[common], help="the dead-letter stream").add_subparsers(
        dest="dead_command", required=True
    )
    dead.add_parser("list", parents=[common], help="newest first").add_argument("--limit", type=int, default=20)
    dead.add_parser("show", parents=[common], help="one letter, with the entry's fields").add_argument("ref")
    requeue = dead.add_parser("requeue", parents=[common], help="run dead-lettered jobs again under their ids")
    requeue.add_argument("refs", nargs="*", help="letter id in ivl:dead, original entry id, or job id")
    requeue.add_argument("--all", action="store_true", help="every letter that holds a runnable job")
    purge = dead.add_parser("purge", parents=[common], help="delete dead letters")
    purge.add_argument("--older-than", default=None, help="only letters older than this (90s, 15m, 2h, 7d)")
    cancel = commands.add_parser("cancel", parents=[common], help="cancel jobs")
    cancel.add_argument("job_ids", nargs="+")
    cancel.add_argument("--force", action="store_true", help="set the cancel key even for an id Redis does not know")
    drain = commands.add_parser("drain", parents=[common], help="drain workers (through Redis: any host)")
    drain.add_argument("worker_ids", nargs="+")
    drain.add_argument("--wait", type=float, default=0.0, help="wait up to this many seconds for them to exit")
    failures = commands.add_parser("failures", parents=[common], help="recent failed jobs by error code")
    failures.add_argument("--limit", type=int, default=20)
    return top


def emit(args: argparse.Namespace, value: Any, text: Callable[[], None]) -> None:
    if args.json:
        print(json.dumps(value, indent=2, ensure_ascii=False))
    else:
        text()


def outcomes(args: argparse.Namespace, results: list[ops.Outcome], extra: dict[str, Any] | None = None) -> int:
    def lines() -> None:
        for result in results:
            print(result.message, file=sys.stdout if result.ok else sys.stderr)

    emit(args, {"results": [{**asdict(o), "ok": o.ok} for o in results], **(extra or {})}, lines)
    return max((o.code for o in results), default=ops.OK)


def cmd_status(r: redis.Redis, args: argparse.Namespace) -> int:
    status = read.status(r)
    emit(args, asdict(status), lambda: print_status(status))
    return ops.OK


def cmd_job(r: redis.Redis, args: argparse.Namespace) -> int:
    view = read.job_view(r, args.job_id)
    if view is None:
        return fail(args, ops.NOT_FOUND, f"unknown job {args.job_id!r} (or it expired)", job_id=args.job_id)
    emit(args, asdict(view), lambda: print_job(view))
    return ops.OK


def cmd_dead_list(r: redis.Redis, args: argparse.Namespace) -> int:
    letters = read.dead_letters(r, max(1, args.limit))
    emit(args, [{k: v for k, v in asdict(d).items() if k != "fields"} for d in letters], lambda: print_dead(letters))
    return ops.OK


def cmd_dead_show(r: redis.Redis, args: argparse.Namespace) -> int:
    letter = read.find_dead(r, args.ref)
    if letter is None:
        return fail(args, ops.NOT_FOUND, f"no dead letter {args.ref!r}")
    emit(args, asdict(letter), lambda: print_dead([letter], fields=True))
    return ops.OK


def cmd_dead_requeue(r: redis.Redis, args: argparse.Namespace) -> int:
    if bool(args.refs) == bool(args.all):
        return fail(args, ops.USAGE, "give dead letter ids, or --all")
    refs = [d.id for d in ops.runnable_letters(r)] if args.all else args.refs
    return outcomes(args, [ops.requeue(r, ref) for ref in refs])


def cmd_dead_purge(r: redis.Redis, args: argparse.Namespace) -> int:
    try:
        older = None if args.older_than is None else ops.parse_duration(args.older_than)
    except ValueError as exc:
        return fail(args, ops.USAGE, str(exc))
    removed = ops.purge(r, older)
    emit(args, {"purged": removed}, lambda: print(f"purged {removed} dead letter(s)"))
    return ops.OK


def cmd_cancel(r: redis.Redis, args: argparse.Namespace) -> int:
    return outcomes(args, [ops.cancel(r, job_id, args.force) for job_id in args.job_ids])


def cmd_drain(r: redis.Redis, args: argparse.Namespace) -> int:
    results = [ops.drain(r, worker_id) for worker_id in args.worker_ids]
    asked = [o.ref for o in results if o.ok]
    deadline = time.monotonic() + args.wait
    while asked and args.wait > 0 and time.monotonic() < deadline and not all(ops.worker_gone(r, w) for w in asked):
        time.sleep(0.2)
    left = [w for w in asked if args.wait > 0 and not ops.worker_gone(r, w)]
    for worker_id in left:
        results.append(ops.Outcome(worker_id, ops.TIMED_OUT, f"worker {worker_id} still alive after {args.wait}s"))
    return outcomes(args, results, {"exited": [w for w in asked if w not in left] if args.wait > 0 else []})


def cmd_failures(r: redis.Redis, args: argparse.Namespace) -> int:
    failures = read.recent_failures(r)
    counts = read.failures_by_code(failures)
    shown = failures[: max(1, args.limit)]
    value = {"by_error_code": {str(k): v for k, v in counts.items()}, "recent": [asdict(f) for f in shown]}
    emit(args, value, lambda: print_failures(counts, shown))
    return ops.OK


def fail(args: argparse.Namespace, code: int, message: str, **extra: str) -> int:
    if args.json:
        print(json.dumps({"error": message, "exit_code": code, **extra}))
    print(f"broker-admin: {message}", file=sys.stderr)
    return code


HANDLERS: dict[str, Handler] = {
    "status": cmd_status,
    "job": cmd_job,
    "dead list": cmd_dead_list,
    "dead show": cmd_dead_show,
    "dead requeue": cmd_dead_requeue,
    "dead purge": cmd_dead_purge,
    "cancel": cmd_cancel,
    "drain": cmd_drain,
    "failures": cmd_failures,
}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    url = settings_cli.build(RedisSettings, args).redis_url
    name = f"dead {args.dead_command}" if args.command == "dead" else args.command
    try:
        r = sync_redis(url)
    except ValueError as exc:  # a malformed URL
        return fail(args, ops.USAGE, f"bad --redis-url: {exc}")
    try:
        return HANDLERS[name](r, args)
    except (redis.ConnectionError, redis.TimeoutError, redis.AuthenticationError, OSError) as exc:
        return fail(args, ops.UNREACHABLE, f"Redis at {redact(url)} is unreachable: {exc}")
    except redis.ResponseError as exc:  # ACLs that forbid a command, a key of the wrong type…
        return fail(args, ops.REFUSED, f"Redis refused: {exc}")
    finally:
        r.close()


if __name__ == "__main__":
    sys.exit(main())
