"""The demo model's training examples: a question about a picture drawn by ``demo_images``, in one turn or after an
earlier turn that showed it, with or without a system message.

Each example goes through the functions the worker runs at inference: ``build_conversation`` (turns, tile budgets:
history images get one tile), ``tile_image`` (InternVL's dynamic tiling + thumbnail, ImageNet normalisation) and
``PromptEncoder`` (input ids with ``<img><IMG_CONTEXT>×n</img>``); the loss is on the answer and its
``<|im_end|>`` only.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from PIL import Image

from broker_worker.model.demo_images import KINDS, MIN_SIDE, Picture, picture, picture_size, words_of
from broker_worker.model.loading import LoadedModel
from broker_worker.model.prompt import build_conversation
from broker_worker.model.prompt_tokens import PromptEncoder
from broker_worker.model.tiling import tile_image
from broker_worker.protocol.messages import ChatMessage

LOOK = ("Look at this image.", "OK.")
SYSTEMS = [None, None, None, "You are InternVL, a helpful multimodal assistant.", "Answer in one word.", ""]


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    pixel_values: torch.Tensor
    #: (question kind, answer) as class indexes, for the training-only probe on the last tile (``Probe``).
    target: tuple[int, int] = (0, 0)


def conversation_for(pic: Picture, rng: random.Random) -> list[ChatMessage]:
    """One turn with the picture, or the picture in an earlier turn and the question after it."""
    system = rng.choice(SYSTEMS)
    head = [ChatMessage(role="system", content=system)] if system is not None else []
    if rng.random() < 0.75:
        return [*head, ChatMessage(role="user", content=pic.question, image=["0"])]
    first, reply = LOOK if rng.random() < 0.5 else (pic.question, pic.answer)
    return [
        *head,
        ChatMessage(role="user", content=first, image=["0"]),
        ChatMessage(role="assistant", content=reply),
        ChatMessage(role="user", content=pic.question),
    ]


def encode(
    loaded: LoadedModel,
    encoder: PromptEncoder,
    messages: list[ChatMessage],
    image: Image.Image,
    max_tiles: int,
    answer: str,
) -> Example:
    """The engine's own prompt building (``InternVLEngine.prepare``) with the answer and ``<|im_end|>`` appended."""
    conversation = build_conversation(messages, max_tiles)
    (budget,) = conversation.budgets
    pixels = tile_image(image, max_num=budget, image_size=loaded.image_size, use_thumbnail=loaded.use_thumbnail)
    spans = conversation.spans(loaded.template)
    prompt = encoder.encode(spans, [loaded.tokens_per_tile * int(pixels.shape[0])], loaded.context_len)
    end = int(loaded.tokenizer.convert_tokens_to_ids("<|im_end|>"))
    answer_ids = [*encoder.stretch(answer, at_start=False), end]
    return Example(prompt + answer_ids, [-100] * len(prompt) + answer_ids, pixels)


def examples(
    loaded: LoadedModel, rng: random.Random, max_tiles: int, max_side: int, mix: tuple[float, ...] | None
) -> Iterator[Example]:
    """Endless examples; ``max_side`` scales pictures down (same aspect ratios) for the cheap first phase;
    ``mix``: how often each question kind comes (None: equally often)."""
    encoder = PromptEncoder(loaded.tokenizer)
    while True:
        w, h = picture_size(rng)
        scale = min(1.0, max_side / max(w, h))
        kind = rng.choice(KINDS) if mix is None else rng.choices(KINDS, weights=mix)[0]
        pic = picture(rng, kind, (max(MIN_SIDE // 2, int(w * scale)), max(MIN_SIDE // 2, int(h * scale))))
        tiles = max_tiles if rng.random() < 0.6 else rng.randint(1, max_tiles)
        example = encode(loaded, encoder, conversation_for(pic, rng), pic.image, tiles, pic.answer)
        example.target = (KINDS.index(pic.kind), words_of(pic.kind).index(pic.answer))
        yield example


def collate(batch: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id)
    labels = torch.full((len(batch), width), -100)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[row, : len(e.labels)] = torch.tensor(e.labels)
        mask[row, : len(e.input_ids)] = 1
    pixels = torch.cat([e.pixel_values for e in batch])
    last_tile = torch.tensor([int(e.pixel_values.shape[0]) for e in batch]).cumsum(0) - 1
    targets = torch.tensor([e.target for e in batch])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pixels} | {
        "last_tile": last_tile,
        "targets": targets,
    }
