from __future__ import annotations

import random
from pathlib import Path

import pytest

from broker_worker.model.decoding import IncrementalDecoder, control_token_ids


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def stream(tokenizer, ids: list[int]) -> list[str]:  # type: ignore[no-untyped-def]
    decoder = IncrementalDecoder(tokenizer, control_token_ids(tokenizer))
    return [decoder.push(i) for i in ids] + [decoder.flush()]


@pytest.mark.parametrize(
    "text", ["héllo wörld", "你好，世界", "emoji 🎉👩‍👩‍👧 done", "<ref>cat</ref><box>[[1,2,3,4]]</box>"]
)
def test_multibyte_characters_never_split(tokenizer, text: str) -> None:  # type: ignore[no-untyped-def]
    ids = tokenizer(text)["input_ids"]
    deltas = stream(tokenizer, ids)
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    # the tiny tokenizer is byte-level: a 4-byte emoji is 4 tokens, released as one delta
    if "🎉" in text:
        assert "🎉" in deltas


def test_control_tokens_dropped_grounding_kept(tokenizer) -> None:  # type: ignore[no-untyped-def]
    ids = tokenizer("<ref>a</ref><|im_end|><img><IMG_CONTEXT></img>b")["input_ids"]
    assert "".join(stream(tokenizer, ids)) == "<ref>a</ref>b"


def test_random_ids_join_to_full_decode(tokenizer) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(5)
    skip = control_token_ids(tokenizer)
    for _ in range(200):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 40))]
        full = tokenizer.decode([i for i in ids if i not in skip], skip_special_tokens=False)
        assert "".join(stream(tokenizer, ids)) == full
