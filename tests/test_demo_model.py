"""The demo model sees: the committed checkpoint answers what is in the picture through every path a client takes.

These tests assert meaning (the picture's color, shape or top-left color), not tensors: a broken image path
(decode, tiling, tile budget, image tokens, vision model) gives wrong answers, and the last test shows that a
preprocessing broken on purpose (channels swapped, in a test double) is caught by the same check.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import redis
import torch
from PIL import Image

from broker_worker.model import internvl_engine
from broker_worker.model.demo_images import COLORS, KINDS, Picture, answered, picture, png_base64
from broker_worker.model.internvl_engine import InternVLEngine
from broker_worker.model.loading import LoadOptions, load
from broker_worker.protocol.client import Client
from broker_worker.protocol.messages import Delta, Job
from tests.helpers import ROOT, Proc, RedisServer, events, submit, text_of, wait_for, wait_terminal

DEMO = ROOT / "demo_model"
MODEL = "demo-internvl"
GREEDY: dict[str, Any] = {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 16, "repetition_penalty": 1.0}


def solid(name: str, width: int, height: int) -> Picture:
    return Picture("color", Image.new("RGB", (width, height), COLORS[name]), name)


def user(pic: Picture) -> dict[str, Any]:
    return {"role": "user", "content": pic.question, "image": [png_base64(pic.image)]}


def stream_text(base: str, prompt: list[dict[str, Any]], **params: Any) -> str:
    body = {"model": MODEL, "prompt": [*prompt, {"role": "assistant", "content": None}], **GREEDY, **params}
    raw = httpx.post(base + "/worker_generate_stream", json=body, timeout=120).content
    last = json.loads(raw.split(b"\0")[-2])
    assert last["error_code"] == 0, last
    return str(last["text"])


@pytest.fixture(scope="module")
def engine() -> InternVLEngine:
    return InternVLEngine(load(LoadOptions(DEMO)), MODEL)


def engine_text(engine: InternVLEngine, prompt: list[dict[str, Any]]) -> str:
    job = Job.model_validate({"model": MODEL, "prompt": prompt, **GREEDY, "max_input_tiles": 12})
    out: list[str] = []
    engine.generate(job, "", threading.Event(), out.append)
    return "".join(out)


def misread(engine: InternVLEngine, pictures: list[Picture]) -> list[tuple[str, str]]:
    """(wanted, answered) for each picture the engine gets wrong."""
    texts = [engine_text(engine, [user(p)]) for p in pictures]
    return [(p.answer, t) for p, t in zip(pictures, texts, strict=True) if not answered(t, p)]


# Eight colors, each at a different size and aspect ratio: 1 to 12 tiles plus the thumbnail.
EIGHT = [
    solid(name, w, h)
    for name, (w, h) in zip(
        COLORS,
        [(300, 300), (1600, 540), (540, 1600), (1200, 1200), (900, 300), (250, 700), (1400, 1000), (640, 480)],
        strict=True,
    )
]


def test_committed_checkpoint_is_small_and_names_eight_colors(engine: InternVLEngine) -> None:
    files = list(DEMO.iterdir())
    assert sum(f.stat().st_size for f in files) <= 10 * 1024 * 1024
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= {f.name for f in files}
    assert type(engine.loaded.model).__name__ == "InternVLForConditionalGeneration"
    assert misread(engine, EIGHT) == []


def test_top_left_quadrants_on_fresh_pictures(engine: InternVLEngine) -> None:
    rng = random.Random(2024)  # not a training stream (seeds 0, 1, 2)
    pictures = [picture(rng, "quadrant") for _ in range(8)]
    assert len(misread(engine, pictures)) <= 1, misread(engine, pictures)


def test_shapes_on_fresh_pictures(engine: InternVLEngine) -> None:
    rng = random.Random(2025)  # not a training stream (seeds 0 to 5)
    pictures = [picture(rng, "shape") for _ in range(12)]
    assert {p.answer for p in pictures} == {"circle", "square", "triangle"}
    assert len(misread(engine, pictures)) <= 1, misread(engine, pictures)


def test_broken_preprocessing_is_caught(engine: InternVLEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    """A test double of the tiling that swaps red and blue: the same meaning check now fails."""
    right_tiles = internvl_engine.tile_image

    def swapped(image: Image.Image, **kwargs: Any) -> torch.Tensor:
        return right_tiles(Image.fromarray(np.asarray(image.convert("RGB"))[:, :, ::-1].copy()), **kwargs)

    pictures = [solid("red", 800, 400), solid("blue", 400, 800)]
    assert misread(engine, pictures) == []
    fresh = InternVLEngine(engine.loaded, MODEL)  # no tiles cached from the right pipeline
    monkeypatch.setattr(internvl_engine, "tile_image", swapped)
    assert [want for want, _ in misread(fresh, pictures)] == ["red", "blue"]


@pytest.fixture
def demo_worker(start_worker) -> Iterator[Any]:  # type: ignore[no-untyped-def]
    def start(**kwargs: Any) -> Proc:
        return start_worker(model=MODEL, model_path=DEMO, **kwargs)  # type: ignore[no-any-return]

    yield start


def test_worker_generate_stream_and_openai_chat(demo_worker, start_gateway) -> None:  # type: ignore[no-untyped-def]
    demo_worker()
    _, base = start_gateway()
    assert answered(stream_text(base, [user(solid("green", 1500, 500))], max_input_tiles=12), solid("green", 1, 1))
    data_url = "data:image/png;base64," + png_base64(solid("purple", 700, 1300).image)
    body = {
        "model": MODEL,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url}},
                    {"type": "text", "text": "What color is the image?"},
                ],
            }
        ],
        "temperature": 0,
        "max_tokens": 16,
    }
    reply = httpx.post(base + "/v1/chat/completions", json=body, timeout=120).json()
    assert answered(reply["choices"][0]["message"]["content"], solid("purple", 1, 1)), reply


def test_image_only_in_an_earlier_turn_is_answered(demo_worker, start_gateway) -> None:  # type: ignore[no-untyped-def]
    """InternVL's tile budget gives a history image one tile; the model still reads it."""
    demo_worker()
    _, base = start_gateway()
    for name in ("orange", "black"):
        image = png_base64(solid(name, 1200, 600).image)
        prompt = [
            {"role": "user", "content": "Look at this image.", "image": [image]},
            {"role": "assistant", "content": "OK."},
            {"role": "user", "content": "What color is the image?"},
        ]
        assert answered(stream_text(base, prompt, max_input_tiles=12), solid(name, 1, 1)), name


def test_redis_client_job(demo_worker, redis_server: RedisServer) -> None:  # type: ignore[no-untyped-def]
    demo_worker()
    pic = solid("yellow", 600, 1500)
    job = Job.model_validate({"model": MODEL, "prompt": [user(pic)], **GREEDY})
    client = Client(redis_server.url)
    try:
        evs = list(client.generate(job, timeout_s=120))
    finally:
        client.close()
    assert evs[-1].type == "done"
    assert answered("".join(e.text for e in evs if isinstance(e, Delta)), pic)


def test_batched_worker_answers_each_row(demo_worker, r: redis.Redis) -> None:  # type: ignore[no-untyped-def]
    pictures = [solid("red", 1600, 600), solid("white", 300, 300), solid("blue", 500, 1400), solid("black", 800, 800)]
    for k, pic in enumerate(pictures):  # queued before the worker starts: it takes them together
        submit(r, {"id": f"batched-{k}", "model": MODEL, "prompt": [user(pic)], **GREEDY})
    demo_worker(extra=["--max-batch-size", "4"])
    for k, pic in enumerate(pictures):
        evs = wait_terminal(r, f"batched-{k}", 120)
        assert evs[-1]["type"] == "done" and answered(text_of(evs), pic), (pic.answer, text_of(evs))


def test_job_resumed_after_kill_9_of_its_worker(demo_worker, r: redis.Redis) -> None:  # type: ignore[no-untyped-def]
    victim = demo_worker(lease_s=1.5)
    pic = solid("purple", 1600, 1200)
    job_id = catch_mid_job(r, victim, pic)
    os.kill(victim.popen.pid, signal.SIGKILL)
    victim.popen.wait()
    demo_worker(lease_s=1.5, wait=False)  # the victim's health entry may or may not have expired yet
    evs = wait_terminal(r, job_id, 120)
    assert evs[-1]["type"] == "done"
    assert [e["resumed"] for e in evs if e["type"] == "started"] == [False, True]
    assert answered(text_of(evs), pic), text_of(evs)


def catch_mid_job(r: redis.Redis, worker: Proc, pic: Picture) -> str:
    """Queue jobs until one is caught running: the worker is stopped (SIGSTOP) as soon as its job shows as
    started, and taken as caught only if the job had not ended by then (else the worker goes on: SIGCONT)."""
    for attempt in range(10):
        job_id = f"k9-{attempt}"
        submit(r, {"id": job_id, "model": MODEL, "prompt": [user(pic)], **GREEDY})
        wait_for(lambda: any(e["type"] == "started" for e in events(r, job_id)), 60, f"{job_id} to start")  # noqa: B023
        worker.signal(signal.SIGSTOP)
        if events(r, job_id)[-1]["type"] not in ("done", "failed", "cancelled"):
            return job_id
        worker.signal(signal.SIGCONT)
    raise AssertionError("the worker finished each of 10 jobs before it could be stopped")


def test_chat_ui_says_what_the_demo_model_is_and_asks_its_questions(  # type: ignore[no-untyped-def]
    start_worker, start_gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Streamlit's AppTest runs ui/app.py against a gateway whose model is named like the demo model (a fake
    engine: this checks the page, not the answer); an example button sends its question."""
    from streamlit.testing.v1 import AppTest

    start_worker(model=MODEL)
    _, base = start_gateway()
    monkeypatch.setenv("GATEWAY_URL", base)
    app = AppTest.from_file(str(ROOT / "ui" / "app.py"), default_timeout=60).run()
    assert "tiny InternVL trained on drawn pictures" in app.sidebar.info[0].value
    labels = [b.label for b in app.sidebar.button]
    assert labels[:3] == ["What color is the image?", "What color is the top-left part?", "What shape is in the image?"]
    app.sidebar.button[1].click().run()
    assert [m["content"] for m in app.session_state["messages"]][:1] == ["What color is the top-left part?"]
    assert app.session_state["messages"][1]["role"] == "assistant"


def test_training_examples_are_what_the_worker_builds(engine: InternVLEngine) -> None:
    """Training goes through the worker's own prompt and tiling path: same input ids, same pixels."""
    from broker_worker.model.demo_examples import conversation_for, encode
    from broker_worker.model.prompt_tokens import PromptEncoder
    from broker_worker.protocol.messages import ChatMessage

    rng = random.Random(7)
    for kind in KINDS:
        pic = picture(rng, kind)
        messages = conversation_for(pic, rng)
        example = encode(engine.loaded, PromptEncoder(engine.loaded.tokenizer), messages, pic.image, 12, pic.answer)
        with_image = [m.model_copy(update={"image": [png_base64(pic.image)] if m.image else []}) for m in messages]
        job = Job(model=MODEL, prompt=with_image, max_input_tiles=12)
        prepared = engine.prepare(job)
        prompt_ids = prepared.input_ids[0].tolist()
        assert example.input_ids[: len(prompt_ids)] == prompt_ids
        assert engine.loaded.tokenizer.decode(example.input_ids[len(prompt_ids) :]) == pic.answer + "<|im_end|>"
        assert prepared.pixel_values is not None and torch.equal(example.pixel_values, prepared.pixel_values)
        assert isinstance(messages[-1], ChatMessage)


def test_committed_recipe_is_what_make_demo_model_runs() -> None:
    """``make demo-model`` (the training CLIs' defaults: demo_training's stages, then demo_shapes' phases) is the
    recipe recorded with the committed weights."""
    from broker_worker.model.demo_shapes import recipe

    recorded = json.loads((DEMO / "tiny_model.json").read_text())
    assert recorded.pop("notice").startswith("demo InternVL trained on drawn pictures")
    assert recorded == json.loads(json.dumps(recipe()))
