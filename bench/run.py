"""``make bench``: performance figures, each a ratio or difference of two things measured side by side.

Writes bench/results.json and prints a table. The tiny model's text is noise; its timings prove the plumbing,
not a real model's speed. On a GPU with a real checkpoint: ``python -m bench.run --model-path DIR --device cuda``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import batch, capacity, cluster, measures, refusals

RESULTS = Path(__file__).resolve().parent / "results.json"
GOALS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "ttft_overhead_ms.p50": ("<= 2 ms", lambda v: v <= 2.0),
    "ttft_overhead_ms.p99": ("<= 5 ms", lambda v: v <= 5.0),
    "tiling_speedup": (">= 1.0", lambda v: v >= 1.0),
    "tiling_max_abs_diff": ("== 0", lambda v: v == 0.0),
    "repeat_image_speedup": (">= 10", lambda v: v >= 10.0),
    "scaling_efficiency.4": (">= 0.95", lambda v: v >= 0.95),
    "redis_bytes_per_output_byte": ("<= 3", lambda v: v <= 3.0),
    "relay_chunks_per_s": (">= 20000", lambda v: v >= 20000),
    "batching_speedup_8": (">= 3 (stretch)", lambda v: v >= 3.0),
    "refusal_ms.max": ("<= 1000 ms", lambda v: v <= 1000.0),
    "refusal_rss_growth_mb": ("<= 150 MB", lambda v: v <= 150.0),
    "batch_speedup_vs_one_by_one": (">= 5", lambda v: v >= 5.0),
    "interactive_wait_behind_backlog_over_job_ms": ("<= 1", lambda v: v <= 1.0),
    **{
        f"concurrent_streams.{n}.{key}": goal
        for n in ("100", "300", "1000")
        for key, goal in (
            ("efficiency", (">= 0.95", lambda v: v >= 0.95)),
            ("gateway_cpu_ms_per_1000_events", ("<= 50 ms", lambda v: v <= 50.0)),
            ("redis_cpu_us_per_event", ("<= 20 us", lambda v: v <= 20.0)),
        )
    },
    "concurrent_streams.1000.added_delay_ms.p99": ("<= 50 ms", lambda v: v <= 50.0),
}


def lookup(results: dict[str, Any], dotted: str) -> Any:
    value: Any = results
    for part in dotted.split("."):
        value = value[part]
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-path", type=Path, default=None, help="checkpoint (default: the tiny model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--requests", type=int, default=200, help="TTFT pairs")
    parser.add_argument("--only", nargs="*", default=None, help="run only these measures")
    parser.add_argument(
        "--streams",
        type=lambda v: [int(n) for n in v.split(",")],
        default=[100, 300, 1000],
        help="concurrent_streams: stream counts, comma-separated",
    )
    args = parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model_path = args.model_path or measures.tiny_model(workdir)
        steps: dict[str, Callable[[], dict[str, Any]]] = {
            "tiling": measures.tiling_speed,
            "repeat_image": lambda: measures.repeat_image(model_path),
            "ttft": lambda: measures.ttft(workdir, model_path, args.device, args.requests),
            "scaling": lambda: measures.scaling(workdir),
            "bytes": lambda: measures.redis_bytes(workdir),
            "relay": lambda: measures.relay(workdir),
            "batching": lambda: measures.batching(workdir, model_path, args.device),
            "refusals": lambda: refusals.refusals(workdir),
            "batch": lambda: batch.throughput(workdir),
            "lanes": lambda: batch.lanes(workdir),
            "concurrent_streams": lambda: capacity.concurrent_streams(workdir, args.streams),
            "cluster": lambda: cluster.measure(workdir),
        }
        results: dict[str, Any] = {}
        for name, step in steps.items():
            if args.only and name not in args.only:
                continue
            print(f"[bench] {name} …", flush=True)
            results.update(step())
    results["seconds"] = round(time.monotonic() - started, 1)
    results["model"] = str(args.model_path or "tiny random-weight InternVL (output is noise)")
    if RESULTS.exists():  # keep what this run did not measure (bench.soak's "soak", steps left out by --only)
        results = json.loads(RESULTS.read_text()) | results
    RESULTS.write_text(json.dumps(results, indent=2, sort_keys=True))
    print_table(results)


def print_table(results: dict[str, Any]) -> None:
    print(f"\n{'figure':56} {'value':>14}  {'goal':>15}  ok")
    for key, (goal, ok) in GOALS.items():
        try:
            value = lookup(results, key)
        except KeyError:
            continue
        print(f"{key:56} {value:>14.4g}  {goal:>15}  {'yes' if ok(value) else 'NO'}")
    print(
        f"\nwrote {RESULTS} ({results['seconds']} s); details: {', '.join(sorted(k for k in results if '.' not in k))}"
    )


if __name__ == "__main__":
    main()
