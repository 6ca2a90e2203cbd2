"""Batched generation on the tiny model: each row as if it ran alone, each row stops on its own."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from broker_worker.model.batching import BatchingEngine
from broker_worker.model.engine import Finish
from broker_worker.model.internvl_engine import InternVLEngine
from broker_worker.model.loading import LoadOptions, load
from broker_worker.protocol.errors import JobError
from broker_worker.protocol.messages import Job
from tests.helpers import png_b64


@pytest.fixture(scope="module")
def engines(tiny_model: Path) -> tuple[InternVLEngine, BatchingEngine]:
    inner = InternVLEngine(load(LoadOptions(tiny_model)), "tiny")
    return inner, BatchingEngine(inner, max_batch=8)


def job(k: int, tokens: int = 16, images: list[str] | None = None, **params: object) -> Job:
    prompt = [{"role": "user", "content": f"Question {k} " * (k + 1), "image": images or []}]
    return Job.model_validate({"model": "tiny", "prompt": prompt, "temperature": 0, "max_new_tokens": tokens, **params})


def run(engine: InternVLEngine | BatchingEngine, j: Job, cancel: threading.Event | None = None) -> tuple[str, Finish]:
    out: list[str] = []
    finish = engine.generate(j, "", cancel or threading.Event(), out.append)
    return "".join(out), finish


def concurrently(engine: BatchingEngine, jobs: list[Job]) -> list[tuple[str, Finish]]:
    with ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(lambda j: run(engine, j), jobs))


def test_rows_equal_their_unbatched_runs(engines: tuple[InternVLEngine, BatchingEngine]) -> None:
    inner, batching = engines
    image = png_b64(500, 300)
    jobs = [job(k, tokens=10 + 3 * k, images=[image] if k % 3 == 0 else None) for k in range(6)]
    alone = [run(inner, j) for j in jobs]
    together = concurrently(batching, jobs)
    assert [t for t, _ in together] == [t for t, _ in alone]
    assert [f.usage for _, f in together] == [f.usage for _, f in alone]
    assert [f.usage.completion_tokens for _, f in together] == [10 + 3 * k for k in range(6)]


def test_a_cancelled_row_stops_alone(engines: tuple[InternVLEngine, BatchingEngine]) -> None:
    inner, batching = engines
    cancel = threading.Event()
    cancel.set()
    jobs = [job(k, tokens=40) for k in range(3)]
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(run, batching, j, cancel if k == 1 else None) for k, j in enumerate(jobs)]
        results = [f.result() for f in futures]
    assert results[1][1].usage.completion_tokens <= 1
    assert [results[0][0], results[2][0]] == [run(inner, jobs[0])[0], run(inner, jobs[2])[0]]


def test_different_sampling_settings_run_in_separate_batches(engines: tuple[InternVLEngine, BatchingEngine]) -> None:
    inner, batching = engines
    greedy = [job(k, tokens=8) for k in range(2)]
    penalised = [job(k, tokens=8, repetition_penalty=1.5) for k in range(2)]
    results = concurrently(batching, greedy + penalised)
    assert [t for t, _ in results] == [run(inner, j)[0] for j in greedy + penalised]


def test_bad_input_fails_its_own_job_only(engines: tuple[InternVLEngine, BatchingEngine]) -> None:
    _, batching = engines
    bad = Job.model_validate({"model": "tiny", "prompt": [{"role": "user", "content": "q", "image": ["!!"]}]})
    with pytest.raises(JobError) as err:
        run(batching, bad)
    assert err.value.code == 40001
    assert run(batching, job(1, tokens=4))[1].usage.completion_tokens == 4


def test_worker_batches_jobs_from_redis(  # type: ignore[no-untyped-def]
    engines: tuple[InternVLEngine, BatchingEngine], start_worker, r, tiny_model: Path
) -> None:
    from tests.helpers import submit, text_of, wait_terminal

    inner, _ = engines
    start_worker(model="tiny", model_path=tiny_model, extra=["--max-batch-size", "4"])
    jobs = [job(k, tokens=12).model_copy(update={"id": f"batched-{k}"}) for k in range(6)]
    for j in jobs:
        submit(r, j.model_dump(mode="json"))
    for k, j in enumerate(jobs):
        evs = wait_terminal(r, j.id)
        assert evs[-1]["type"] == "done", evs[-1]
        assert text_of(evs) == run(inner, j)[0], k
