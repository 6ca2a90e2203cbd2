"""``broker-batch``: OpenAI Batch API files through real workers over a real Redis; resume after kill -9."""

from __future__ import annotations

import base64
import json
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import redis

from broker_batch.lines import Options, Request, read
from broker_batch.results import ResultFile
from broker_worker.model.fake_engine import fake_tokens
from broker_worker.protocol.messages import Job
from tests.helpers import ROOT, Proc, RedisServer, png_b64, spawn, wait_for

BATCH = [sys.executable, "-m", "broker_batch"]


def line(custom_id: str, content: Any, max_tokens: int, model: str = "fake", **extra: Any) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body} | extra)


def question(k: int) -> str:
    return f"Question {k}: " + "why " * (k % 7)


def plain_file(path: Path, n: int, prefix: str = "q") -> list[str]:
    """``n`` lines of varied questions and lengths; returns their custom_ids."""
    ids = [f"{prefix}-{k}" for k in range(n)]
    path.write_text("".join(line(cid, question(k), 3 + k % 5) + "\n" for k, cid in enumerate(ids)))
    return ids


def alone(k: int) -> str:
    """The text line ``k`` of ``plain_file`` gets as one request by itself (the fake engine's answer)."""
    job = Job(model="fake", prompt=[{"role": "user", "content": question(k)}], max_new_tokens=3 + k % 5)
    return "".join(fake_tokens(job))


def rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def content(row: dict[str, Any]) -> str:
    return str(row["response"]["body"]["choices"][0]["message"]["content"])


def run_batch(url: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*BATCH, *args, "--redis-url", url], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def batch_states(r: redis.Redis) -> dict[str, dict[str, str]]:
    return {k: r.hgetall(k) for k in r.scan_iter("ivl:job:{batch-*}:state", count=1000)}


def started_events(r: redis.Redis, state_key: str) -> int:
    events = r.xrange(state_key.replace(":state", ":events"))
    return sum(json.loads(f["e"])["type"] == "started" for _, f in events)


def test_500_lines_each_answered_once_with_the_text_it_gets_alone(  # type: ignore[no-untyped-def]
    r: redis.Redis, redis_server: RedisServer, start_worker, tmp_path: Path
) -> None:
    start_worker(delay=0.001, slots=20)
    start_worker(delay=0.001, slots=20)
    ids = plain_file(tmp_path / "in.jsonl", 500)
    done = run_batch(redis_server.url, "run", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"))
    assert done.returncode == 0, done.stderr[-2000:]
    out = rows(tmp_path / "out.jsonl")
    assert len(out) == 500 and sorted(Counter(o["custom_id"] for o in out).values()) == [1] * 500
    by_id = {o["custom_id"]: o for o in out}
    assert [content(by_id[cid]) for cid in ids] == [alone(k) for k in range(500)]
    assert all(o["response"]["status_code"] == 200 and o["error"] is None for o in out)
    assert "500/500 lines" in done.stderr and "queued 500 jobs, re-attached to 0" in done.stderr
    assert r.xlen("ivl:jobs:fake:batch") == 0 and r.xlen("ivl:jobs:fake") == 0  # all on the batch lane, all done
    states = batch_states(r)
    assert len(states) == 500 and {s["attempts"] for s in states.values()} == {"1"}


def test_kill_9_of_the_submitter_half_way_then_the_same_command_runs_nothing_twice(  # type: ignore[no-untyped-def]
    r: redis.Redis, redis_server: RedisServer, start_worker, tmp_path: Path, procs: list[Proc]
) -> None:
    start_worker(delay=0.03, slots=8)
    start_worker(delay=0.03, slots=8)
    ids = plain_file(tmp_path / "in.jsonl", 300)
    out = tmp_path / "out.jsonl"
    args = ["run", str(tmp_path / "in.jsonl"), "--output", str(out), "--redis-url", redis_server.url]
    submitter = spawn("batch", [*BATCH, *args, "--max-in-flight", "40"], tmp_path)
    procs.append(submitter)
    wait_for(lambda: out.exists() and out.read_text().count("\n") >= 150, 120, "half of the lines answered")
    submitter.popen.send_signal(signal.SIGKILL)
    submitter.popen.wait()
    assert out.read_text().count("\n") < 300, "the kill must hit a run that was not finished"
    again = run_batch(redis_server.url, *args[:-2])
    assert again.returncode == 0, again.stderr[-2000:]
    attached = int(re.search(r"re-attached to (\d+)", again.stderr).group(1))  # type: ignore[union-attr]
    assert attached >= 1  # jobs the killed run had queued were streamed from Redis, not queued again
    out_rows = rows(out)
    assert sorted(o["custom_id"] for o in out_rows) == sorted(ids)
    by_id = {o["custom_id"]: o for o in out_rows}
    assert [content(by_id[cid]) for cid in ids] == [alone(k) for k in range(300)]
    states = batch_states(r)
    assert len(states) == 300  # one job per line over both runs
    assert {s["attempts"] for s in states.values()} == {"1"}
    assert {started_events(r, key) for key in states} == {1}


def test_images_as_a_path_relative_to_the_input_and_as_a_data_url_on_the_tiny_model(  # type: ignore[no-untyped-def]
    r: redis.Redis, redis_server: RedisServer, start_worker, tiny_model: Path, tmp_path: Path
) -> None:
    start_worker(model="tiny-internvl", model_path=tiny_model)
    folder = tmp_path / "inputs"
    (folder / "pics").mkdir(parents=True)
    (folder / "pics" / "cat.png").write_bytes(base64.b64decode(png_b64(320, 240, 1)))
    as_path = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "pics/cat.png"}}]
    data = "data:image/png;base64," + png_b64(256, 256, 2)
    as_data = [{"type": "text", "text": "Describe it."}, {"type": "image_url", "image_url": {"url": data}}]
    text_only = "What is this?"
    lines = [line(c, m, 4, "tiny-internvl") for c, m in (("path", as_path), ("data", as_data), ("text", text_only))]
    (folder / "in.jsonl").write_text("\n".join(lines) + "\n")
    done = run_batch(redis_server.url, "run", str(folder / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"))
    assert done.returncode == 0, done.stderr[-2000:]
    by_id = {o["custom_id"]: o for o in rows(tmp_path / "out.jsonl")}
    assert {c: o["response"]["status_code"] for c, o in by_id.items()} == {"path": 200, "data": 200, "text": 200}
    prompt = {c: o["response"]["body"]["usage"]["prompt_tokens"] for c, o in by_id.items()}
    assert prompt["path"] > prompt["text"] + 64 and prompt["data"] > prompt["text"] + 64  # the images were read


def test_bad_lines_become_error_lines_and_the_rest_runs(  # type: ignore[no-untyped-def]
    redis_server: RedisServer, start_worker, tmp_path: Path
) -> None:
    start_worker(delay=0.001)
    missing = [{"type": "text", "text": "?"}, {"type": "image_url", "image_url": {"url": "nowhere.png"}}]
    remote = [{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]
    source = [
        line("good", "fine", 4),
        "{not json",
        line("url", "x", 4, url="/v1/embeddings"),
        line("image", missing, 4),
        line("good", "the same custom_id again", 4),
        json.dumps({"method": "POST", "url": "/v1/chat/completions", "body": {}}),
        line("remote", remote, 4),
        line("get", "x", 4, method="GET"),
        "",
        json.dumps(
            {
                "custom_id": "n2",
                "url": "/v1/chat/completions",
                "body": json.loads(line("n2", "x", 4))["body"] | {"n": 2},
            }
        ),
    ]
    (tmp_path / "in.jsonl").write_text("\n".join(source) + "\n")
    done = run_batch(redis_server.url, "run", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"))
    assert done.returncode == 3, done.stderr[-2000:]  # README: every line answered, some with an error
    out = rows(tmp_path / "out.jsonl")
    by_line = {o.get("input_line"): o for o in out}
    assert len(out) == 9  # the blank line is no request
    good = [o for o in out if o["custom_id"] == "good" and "input_line" not in o]
    assert len(good) == 1 and content(good[0]) == "".join(f"t{i}:4 " for i in range(4))
    assert sorted(k for k in by_line if k is not None) == [2, 3, 4, 5, 6, 7, 8, 10]
    assert {k: by_line[k]["error"]["code"] for k in by_line if k} == {
        2: 40001,
        3: 40001,
        4: 40001,
        5: 40001,
        6: 40001,
        7: 40001,
        8: 40001,
        10: 40302,
    }
    assert "not JSON" in by_line[2]["error"]["message"] and by_line[2]["custom_id"] is None
    assert "/v1/embeddings" in by_line[3]["error"]["message"]
    assert "nowhere.png" in by_line[4]["error"]["message"] and "not found" in by_line[4]["error"]["message"]
    assert "used by an earlier line" in by_line[5]["error"]["message"]
    assert "remote images are not fetched" in by_line[7]["error"]["message"]
    assert all(o["response"] is None for k, o in by_line.items() if k is not None)
    again = run_batch(redis_server.url, "run", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"))
    assert again.returncode == 3 and len(rows(tmp_path / "out.jsonl")) == 9  # nothing answered twice


def test_status_interrupt_cancel_and_a_torn_last_line(  # type: ignore[no-untyped-def]
    r: redis.Redis, redis_server: RedisServer, start_worker, tmp_path: Path, procs: list[Proc]
) -> None:
    plain_file(tmp_path / "in.jsonl", 30)
    out, source = tmp_path / "out.jsonl", str(tmp_path / "in.jsonl")
    args = ["run", source, "--output", str(out), "--redis-url", redis_server.url, "--max-in-flight", "10"]
    submitter = spawn("batch", [*BATCH, *args], tmp_path)  # no worker yet: everything waits
    procs.append(submitter)
    wait_for(lambda: r.xlen("ivl:jobs:fake:batch") >= 10, 30, "ten jobs queued")
    submitter.signal(signal.SIGINT)
    assert submitter.popen.wait(30) == 130
    assert "10 jobs stay queued" in submitter.log()
    assert r.xlen("ivl:jobs:fake:batch") == 10  # nothing consumed them, so it never had more than 10 queued
    status = run_batch(redis_server.url, "status", source, "--output", str(out))
    assert status.stdout.strip().endswith(
        "0 answered in " + str(out) + " (0 error lines); not answered yet: 20 not queued, 10 queued"
    )
    cancel = run_batch(redis_server.url, "run", source, "--output", str(out), "--cancel")
    assert "cancelled 10 queued or running jobs" in cancel.stdout
    out.write_text(line("torn", "x", 1)[:25])  # a write cut off by a kill: no newline, not JSON
    start_worker(delay=0.001)
    done = run_batch(redis_server.url, *args[:-2])
    assert done.returncode == 3, done.stderr[-2000:]
    out_rows = rows(out)  # the torn line is gone, every line is answered once
    assert len(out_rows) == 30 and len({o["custom_id"] for o in out_rows}) == 30
    assert Counter(o["error"]["type"] if o["error"] else "ok" for o in out_rows) == {"cancelled": 10, "ok": 20}


def job_ids(path: Path, options: Options) -> list[str]:
    requests = list(read(path, options, lambda *_: False))
    assert all(isinstance(p, Request) for p in requests)
    return [p.job.id for p in requests if isinstance(p, Request)]


def test_job_ids_follow_the_line_not_the_run(tmp_path: Path) -> None:
    plain_file(tmp_path / "a.jsonl", 3)
    plain_file(tmp_path / "b.jsonl", 4)
    options = Options(tmp_path)
    first = job_ids(tmp_path / "a.jsonl", options)
    assert job_ids(tmp_path / "b.jsonl", options)[:3] == first and len(set(job_ids(tmp_path / "b.jsonl", options))) == 4
    assert set(job_ids(tmp_path / "a.jsonl", Options(tmp_path, model="other"))).isdisjoint(first)
    results = ResultFile(tmp_path / "out.jsonl")
    (tmp_path / "out.jsonl").write_text('{"custom_id": "q-0", "error": null}\n{"custom_id": "q-1"')
    answered = results.open()
    results.close()
    assert answered.custom_ids == {"q-0"} and (tmp_path / "out.jsonl").read_text().count("\n") == 1
    left = [p.custom_id for p in read(tmp_path / "a.jsonl", options, answered.has)]
    assert left == ["q-1", "q-2"]


def test_broker_batch_imports_no_web_framework() -> None:
    """It is a Redis client: a machine with only the core package (no FastAPI) runs it."""
    code = "import sys; import broker_batch.cli; sys.exit(int('fastapi' in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], timeout=60, cwd=ROOT).returncode == 0
