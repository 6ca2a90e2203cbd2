"""The demo InternVL itself: its notice, image geometry and config, a fresh model, and the ``LoadedModel`` the serving
code would see for it.

The model has the classes and tokenizer of ``tiny_model`` (InternViT-style vision tower, pixel shuffle, Qwen2 LLM,
byte-level tokenizer with InternVL's special tokens, ChatML). Patches are 28 px (16x16 per 448 px tile, 64 tokens per
tile after the pixel shuffle) instead of InternVL's 14 px: with 1 to 13 tiles an image, that makes training about ten
times cheaper on a CPU, and the serving code reads the count from ``image_seq_length`` like any InternVL
checkpoint's.
"""

from __future__ import annotations

from typing import Any

import torch

from broker_worker.model.loading import LoadedModel, native_loaded
from broker_worker.model.tiny_model import make_config, make_tokenizer

DEMO_NOTICE = (
    "demo InternVL trained on drawn pictures for three questions only: 'What color is the image?', 'What shape is "
    "in the image?' and 'What color is the top-left part?' (8 colors, 3 shapes); README.md says how often it is right"
)
IMAGE_SIZE, PATCH = 448, 28
TOKENS_PER_TILE = (IMAGE_SIZE // PATCH) ** 2 // 4  # after the 0.5 pixel shuffle
CONTEXT = 8192


def demo_config(vocab_size: int, image_token_id: int, eos_token_id: int) -> Any:
    return make_config(
        vocab_size, image_token_id, eos_token_id, patch=PATCH, vision_layers=3, text_layers=3, context=CONTEXT
    )


def new_model(seed: int) -> tuple[Any, Any]:
    from transformers import GenerationConfig, InternVLForConditionalGeneration

    tokenizer = make_tokenizer()
    ids = tokenizer.convert_tokens_to_ids  # type: ignore[attr-defined]
    eos = ids("<|im_end|>")
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(demo_config(len(tokenizer), ids("<IMG_CONTEXT>"), eos))  # type: ignore[arg-type]
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=ids("<|endoftext|>"))
    return model, tokenizer


def in_memory(model: Any, tokenizer: Any) -> LoadedModel:
    """What ``loading.load`` gives for this checkpoint, without a round trip through the disk."""
    return native_loaded(model, tokenizer)
