"""Stop strings, stop token ids and top-k in the engines: what the OpenAI and FastChat ``stop`` promise."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from broker_worker.model.batching import BatchingEngine
from broker_worker.model.engine import Finish
from broker_worker.model.fake_engine import FakeEngine
from broker_worker.model.internvl_engine import InternVLEngine
from broker_worker.model.loading import LoadOptions, load
from broker_worker.model.stops import StopWatch
from broker_worker.protocol.messages import Job, Usage

Engine = InternVLEngine | BatchingEngine | FakeEngine


def watch(stops: list[str], deltas: list[str], published: str = "") -> tuple[list[str], str]:
    out: list[str] = []
    stop_watch = StopWatch(stops, out.append, threading.Event(), published)
    for delta in deltas:
        stop_watch.feed(delta)
    return out, stop_watch.finish(Finish("length", Usage())).finish_reason


def test_text_before_the_stop_goes_out_and_nothing_after() -> None:
    assert watch(["END"], ["hello ", "wor", "ld E", "N", "D and more", "x"]) == (["hello ", "wor", "ld "], "stop")


def test_the_earliest_of_several_stop_strings_wins() -> None:
    assert watch(["cd", "b"], ["abcd"]) == (["a"], "stop")


def test_a_possible_beginning_is_held_then_released() -> None:
    # "E" and "EN" may begin "END": held until the next text decides, then published as they were
    assert watch(["END"], ["a E", "Nx", "y"]) == (["a ", "ENx", "y"], "length")
    assert watch(["END"], ["tail E"]) == (["tail ", "E"], "length")  # held text never lost at the end


def test_a_stop_string_across_the_text_an_earlier_worker_published() -> None:
    assert watch(["ab"], ["bc"], published="xa") == ([], "stop")


def test_the_engine_is_told_to_stop_and_the_job_cancel_stays_apart() -> None:
    cancel = threading.Event()
    stop_watch = StopWatch(["x"], [].append, cancel)
    assert not stop_watch.flag.is_set()
    stop_watch.feed("ax")
    assert stop_watch.flag.is_set() and not cancel.is_set()
    other = StopWatch(["x"], [].append, cancel)
    cancel.set()
    assert other.flag.is_set()  # the job's own cancel still reaches the engine


@pytest.fixture(scope="module")
def engines(tiny_model: Path) -> tuple[InternVLEngine, BatchingEngine]:
    inner = InternVLEngine(load(LoadOptions(tiny_model)), "tiny")
    return inner, BatchingEngine(inner, max_batch=8)


def job(question: str = "Tell me a story", **params: object) -> Job:
    prompt = [{"role": "user", "content": question}]
    return Job.model_validate({"model": "tiny", "prompt": prompt, "temperature": 0, "max_new_tokens": 24, **params})


def run(engine: Engine, j: Job) -> tuple[str, Finish]:
    out: list[str] = []
    finish = engine.generate(j, "", threading.Event(), out.append)
    return "".join(out), finish


def stop_probe(text: str) -> tuple[str, str]:
    """A two-character stop string from the middle of ``text`` (printable, first seen there) and the text
    before it: what a correct stop leaves."""
    for i in sorted(range(1, len(text) - 1), key=lambda i: abs(i - len(text) // 2)):
        probe = text[i : i + 2]
        if probe.isprintable() and "\ufffd" not in probe and text.find(probe) == i:
            return probe, text[:i]
    raise AssertionError(f"no stop string to probe in {text!r}")


@pytest.mark.parametrize("which", ["plain", "batching"])
def test_engine_stops_at_a_stop_string(engines: tuple[InternVLEngine, BatchingEngine], which: str) -> None:
    engine = engines[0] if which == "plain" else engines[1]
    full, finish = run(engine, job())
    assert finish.usage.completion_tokens == 24
    stop, before = stop_probe(full)
    text, stopped = run(engine, job(stop=["never appears", stop]))
    assert text == before
    assert stopped.finish_reason == "stop"
    assert stopped.usage.completion_tokens < 24  # generation ended there, not only the text


def test_a_stopped_row_leaves_concurrent_rows_alone(engines: tuple[InternVLEngine, BatchingEngine]) -> None:
    inner, batching = engines
    plain, other = job(), job("Another question")
    stop, before = stop_probe(run(inner, plain)[0])
    alone = run(inner, other)
    with ThreadPoolExecutor(2) as pool:
        stopped, mate = pool.map(lambda j: run(batching, j), [plain.model_copy(update={"stop": [stop]}), other])
    assert stopped[0] == before and stopped[1].finish_reason == "stop"
    assert mate == alone


def test_fake_engine_stops_at_a_stop_string() -> None:
    text, finish = run(FakeEngine(), job("q", stop=["t3:"], max_new_tokens=10))
    assert (text, finish.finish_reason) == ("t0:1 t1:1 t2:1 ", "stop")


@pytest.mark.parametrize("which", ["plain", "batching"])
def test_stop_token_ids_end_generation(engines: tuple[InternVLEngine, BatchingEngine], which: str) -> None:
    inner = engines[0]
    engine = inner if which == "plain" else engines[1]
    ids = greedy_ids(inner, job())
    k = next(k for k in range(3, len(ids)) if ids[k] not in ids[:k] and ids[k] not in inner.skip_ids)
    full, _ = run(engine, job())
    text, finish = run(engine, job(stop_token_ids=[ids[k]]))
    assert finish.finish_reason == "stop"
    assert finish.usage.completion_tokens == k + 1  # the stop token is generated (and shown, as FastChat does)
    assert full.startswith(text) and len(text) < len(full)


def greedy_ids(engine: InternVLEngine, j: Job) -> list[int]:
    """The token ids of the greedy answer, from plain ``model.generate``."""
    prepared = engine.prepare(j)
    with torch.inference_mode():
        out = engine.loaded.model.generate(
            input_ids=prepared.input_ids,
            attention_mask=prepared.attention_mask,
            max_new_tokens=j.max_new_tokens,
            do_sample=False,
            repetition_penalty=j.repetition_penalty,
            eos_token_id=sorted(engine.eos_ids),
            pad_token_id=engine.pad_id(),
        )
    ids: list[int] = out[0, int(prepared.input_ids.shape[1]) :].tolist()
    return ids


@pytest.mark.parametrize("which", ["plain", "batching"])
def test_top_k_one_samples_the_greedy_answer(engines: tuple[InternVLEngine, BatchingEngine], which: str) -> None:
    engine = engines[0] if which == "plain" else engines[1]
    greedy, _ = run(engine, job())
    # sampling the random-weight model at temperature 1.5 without top-k never repeats the greedy answer
    assert run(engine, job(temperature=1.5, top_k=-1))[0] != greedy
    assert run(engine, job(temperature=1.5, top_k=1))[0] == greedy
