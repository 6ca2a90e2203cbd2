"""The InternVL engine on the tiny random-weight checkpoint (its text is noise; the tests compare behaviour)."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from broker_worker.model.decoding import control_token_ids
from broker_worker.model.internvl_engine import InternVLEngine
from broker_worker.model.loading import CheckpointError, LoadOptions, load
from broker_worker.protocol.errors import JobError
from broker_worker.protocol.messages import Job
from tests.helpers import png_b64


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> InternVLEngine:
    return InternVLEngine(load(LoadOptions(tiny_model)), "tiny")


def make_job(
    question: str = "hi", images: int = 0, system: str = "SYS", size: tuple[int, int] = (300, 200), **params: object
) -> Job:
    prompt = [
        {"role": "system", "content": system},
        {"role": "user", "content": question, "image": [png_b64(*size, k) for k in range(images)]},
    ]
    return Job.model_validate({"model": "tiny", "prompt": prompt, "temperature": 0, "max_new_tokens": 24, **params})


def run(engine: InternVLEngine, job: Job, cancel: threading.Event | None = None) -> tuple[list[str], object]:
    deltas: list[str] = []
    finish = engine.generate(job, "", cancel or threading.Event(), deltas.append)
    return deltas, finish


def non_streamed(engine: InternVLEngine, job: Job, prefix: str = "") -> tuple[list[int], str, int]:
    """Plain ``model.generate`` on the engine's own prompt: new token ids, their text, and the prompt length."""
    prepared = engine.prepare(job, prefix)
    images = {} if prepared.pixel_values is None else {"pixel_values": prepared.pixel_values}
    with torch.inference_mode():
        out = engine.loaded.model.generate(
            input_ids=prepared.input_ids,
            attention_mask=prepared.attention_mask,
            **images,
            max_new_tokens=prepared.max_new_tokens,
            do_sample=False,
            repetition_penalty=job.repetition_penalty,
            eos_token_id=sorted(engine.eos_ids),
            pad_token_id=engine.pad_id(),
        )
    prompt_len = int(prepared.input_ids.shape[1])
    # native models return prompt + answer; remote-code ones (inputs_embeds) only the answer
    new_ids = out[0, prompt_len:].tolist() if engine.loaded.format == "native" else out[0].tolist()
    skip = control_token_ids(engine.loaded.tokenizer)
    return (
        new_ids,
        engine.loaded.tokenizer.decode([i for i in new_ids if i not in skip], skip_special_tokens=False),
        prompt_len,
    )


def test_loads_native_checkpoint(engine: InternVLEngine) -> None:
    m = engine.loaded
    assert (m.format, m.image_size, m.tokens_per_tile, m.context_len, m.use_thumbnail) == (
        "native",
        448,
        256,
        8192,
        True,
    )
    assert engine.context_len == 8192


def test_greedy_stream_equals_non_streamed_output(engine: InternVLEngine) -> None:
    job = make_job("describe", images=1)
    deltas, finish = run(engine, job)
    new_ids, expected, prompt_len = non_streamed(engine, job)
    assert "".join(deltas) == expected
    assert finish.usage.completion_tokens == len(new_ids)  # type: ignore[attr-defined]
    assert finish.usage.prompt_tokens == prompt_len  # type: ignore[attr-defined]


def test_image_tokens_expanded_per_tile(engine: InternVLEngine) -> None:
    prepared = engine.prepare(make_job("q", images=2, max_input_tiles=4))
    context_id = engine.loaded.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    tiles = prepared.pixel_values.shape[0]  # type: ignore[union-attr]
    assert int((prepared.input_ids == context_id).sum()) == 256 * tiles
    # 300x200 with budget 2 (4 // 2 images): the 2x1 grid ties with 1x1 and the image is small -> 1 tile each
    assert tiles == 2


def test_concurrent_system_prompts_do_not_leak(engine: InternVLEngine) -> None:
    jobs = [make_job("same question", system=f"system prompt {k} " * (k + 1)) for k in range(4)]
    serial = ["".join(run(engine, j)[0]) for j in jobs]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(lambda j: "".join(run(engine, j)[0]), jobs * 2))
    assert parallel == serial * 2
    assert len(set(serial)) > 1  # different system prompts give different (noise) answers
    for k, job in enumerate(jobs):
        assert f"system prompt {k}" in engine.loaded.tokenizer.decode(engine.prepare(job).input_ids[0])


def test_cancel_stops_within_one_token(engine: InternVLEngine) -> None:
    cancel = threading.Event()
    cancel.set()
    _deltas, finish = run(engine, make_job("long", max_new_tokens=400, temperature=0.9), cancel)
    assert finish.usage.completion_tokens == 1  # type: ignore[attr-defined]  # the token in flight, no more


def test_cancel_during_generation(engine: InternVLEngine) -> None:
    cancel = threading.Event()
    seen: list[str] = []

    def on_delta(text: str) -> None:
        seen.append(text)
        if len("".join(seen)) >= 3:
            cancel.set()

    finish = engine.generate(make_job("long", max_new_tokens=400, temperature=0.9), "", cancel, on_delta)
    assert cancel.is_set()
    assert finish.usage.completion_tokens < 400  # type: ignore[attr-defined]
    assert len(seen) <= 4


def test_resume_prefix_is_continued_not_restarted(engine: InternVLEngine) -> None:
    job = make_job("story", max_new_tokens=24)
    full = "".join(run(engine, job)[0])
    prefix = full[: len(full) // 2]
    deltas: list[str] = []
    finish = engine.generate(job, prefix, threading.Event(), deltas.append)
    prepared = engine.prepare(job, prefix)
    assert engine.loaded.tokenizer.decode(prepared.input_ids[0]).endswith(prefix)  # the prompt side
    assert prepared.max_new_tokens == 24 - prepared.prefix_tokens > 0
    # The output side: what plain model.generate continues after that prompt, never the answer from its start
    # (greedy prefix + continuation need not equal the full answer: the noise re-tokenizes differently).
    new_ids, expected, _ = non_streamed(engine, job, prefix)
    assert "".join(deltas) == expected and len(expected) > 0
    assert not "".join(deltas).startswith(prefix)
    assert finish.usage.completion_tokens == prepared.prefix_tokens + len(new_ids)  # type: ignore[attr-defined]


def test_a_resumed_job_never_reports_more_tokens_than_asked(engine: InternVLEngine) -> None:
    """A resume counts the text already sent by re-tokenizing it (the earlier run's token ids are gone); text
    that does not round-trip (U+FFFD here) re-tokenizes into more tokens than were generated: it used to report
    25 of 24. The earlier run is now credited with at most what the job allows beside this run's tokens."""
    job = make_job("story 7", max_new_tokens=24)
    deltas, finish = run(engine, job)
    assert finish.usage.completion_tokens == 24  # type: ignore[attr-defined]
    resumed = engine.generate(job, "".join(deltas[: len(deltas) // 2]), threading.Event(), lambda _text: None)
    assert (resumed.finish_reason, resumed.usage.completion_tokens) == ("length", 24)  # type: ignore[attr-defined]


def test_finish_reason_is_stop_when_the_model_emits_a_stop_token(engine: InternVLEngine) -> None:
    job = make_job("describe", max_new_tokens=12)
    new_ids, _, _ = non_streamed(engine, job)
    assert run(engine, job)[1].finish_reason == "length"  # type: ignore[attr-defined]  # noise never stops
    stopping = InternVLEngine(engine.loaded, "tiny")
    stopping.eos_ids = frozenset({new_ids[3]})  # as a checkpoint whose stop token is the 4th greedy token
    _, finish = run(stopping, job)
    assert finish.finish_reason == "stop"  # type: ignore[attr-defined]
    assert finish.usage.completion_tokens == new_ids.index(new_ids[3]) + 1  # type: ignore[attr-defined]


def test_context_overflow_is_typed(engine: InternVLEngine) -> None:
    job = make_job("q", images=3, size=(1200, 900), max_input_tiles=36)  # 3 x (grid 12 + thumbnail) x 256 tokens > 8192
    with pytest.raises(JobError) as err:
        engine.prepare(job)
    assert err.value.code == 40303
    assert "context is 8192" in err.value.message


def test_bad_image_is_typed(engine: InternVLEngine) -> None:
    job = Job.model_validate({"model": "tiny", "prompt": [{"role": "user", "content": "q", "image": ["!!"]}]})
    with pytest.raises(JobError) as err:
        run(engine, job)
    assert err.value.code == 40001


def test_repeated_images_come_from_the_tile_cache(engine: InternVLEngine) -> None:
    first, second = png_b64(300, 200), png_b64(300, 200)

    def job_with(images: list[str], tiles: int) -> Job:
        return Job.model_validate(
            {"model": "tiny", "max_input_tiles": tiles, "prompt": [{"role": "user", "content": "q", "image": images}]}
        )

    job = job_with([first], 5)
    engine.prepare(job)
    tile_hits, stack_hits = engine._tiles.hits, engine._stacks.hits
    engine.prepare(job)
    assert engine._stacks.hits == stack_hits + 1  # the same images again: nothing decoded or tiled
    engine.prepare(job_with([first, second], 10))  # budgets 5 and 5: the first image's tiles are cached
    assert engine._tiles.hits == tile_hits + 1  # same image, other conversation: the image's tiles are reused


def test_grounding_tokens_survive(engine: InternVLEngine) -> None:
    tok = engine.loaded.tokenizer
    ids = tok("<ref>dog</ref><box>[[1, 2, 3, 4]]</box>")["input_ids"]
    from broker_worker.model.decoding import IncrementalDecoder

    decoder = IncrementalDecoder(tok, control_token_ids(tok))
    assert "".join([decoder.push(i) for i in ids] + [decoder.flush()]) == "<ref>dog</ref><box>[[1, 2, 3, 4]]</box>"


def test_refuses_what_cannot_load(tmp_path: Path, tiny_model: Path) -> None:
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        load(LoadOptions(tmp_path))
    remote = tmp_path / "internlm2"
    remote.mkdir()
    (remote / "config.json").write_text(
        json.dumps(
            {
                "model_type": "internvl_chat",
                "llm_config": {"architectures": ["InternLM2ForCausalLM"], "num_hidden_layers": 24},
            }
        )
    )
    with pytest.raises(CheckpointError, match="convert_internvl_weights_to_hf"):
        load(LoadOptions(remote))


@pytest.mark.skipif(torch.cuda.is_available(), reason="refusals of a machine without CUDA")
def test_refuses_cuda_options_without_cuda(tiny_model: Path) -> None:
    with pytest.raises(CheckpointError, match="need a CUDA GPU"):
        load(LoadOptions(tiny_model, load_8bit=True))
    with pytest.raises(CheckpointError, match="needs CUDA"):
        load(LoadOptions(tiny_model, device="auto"))


@pytest.fixture(scope="module")
def remote_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.remote_code import make_remote_checkpoint

    return make_remote_checkpoint(tmp_path_factory.mktemp("remote") / "tiny-remote-internvl")


def test_loads_remote_code_checkpoint_and_streams(remote_checkpoint: Path) -> None:
    loaded = load(LoadOptions(remote_checkpoint))
    assert (loaded.format, loaded.template.name, loaded.image_size, loaded.tokens_per_tile) == (
        "remote",
        "internvl2_5",
        448,
        256,
    )
    engine = InternVLEngine(loaded, "tiny-remote")
    job = make_job("describe", images=1)
    deltas, finish = run(engine, job)
    new_ids, expected, _ = non_streamed(engine, job)
    assert "".join(deltas) == expected
    assert finish.usage.completion_tokens == len(new_ids)  # type: ignore[attr-defined]


@pytest.mark.parametrize("remote", [False, True])
def test_device_map_names_match_the_loaded_modules(remote: bool, tiny_model: Path, remote_checkpoint: Path) -> None:
    from broker_worker.model.device_map import split_model

    loaded = load(LoadOptions(remote_checkpoint if remote else tiny_model))
    modules = {name for name, _ in loaded.model.named_modules()}
    layers = 3 if remote else 4  # the two tiny checkpoints
    device_map = split_model(layers, 2, remote_code=remote)
    assert set(device_map) <= modules, set(device_map) - modules
