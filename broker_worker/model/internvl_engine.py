"""The InternVL engine: InternVL's model worker's semantics on a loaded checkpoint, with per-request state only.

Per request: conversation and tile budgets (prompt.py), images decoded with limits and tiled (cached by
content hash), input ids with ``<img><IMG_CONTEXT>×256·n</img>`` per image and client text that cannot form control
tokens, counted against the context as they are built (prompt_tokens.py), then ``model.generate`` with a
streamer that decodes incrementally and a stopping criterion that watches the cancel flag. Nothing on the model
object is changed per request (InternVL's model worker swaps ``model.system_message`` and races).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from broker_worker.model.decoding import control_token_ids
from broker_worker.model.engine import Finish, OnDelta
from broker_worker.model.generation import new_row, run_batch
from broker_worker.model.loading import LoadedModel
from broker_worker.model.prompt import Conversation, build_conversation
from broker_worker.model.prompt_tokens import PromptEncoder
from broker_worker.model.stops import generate_with_stops
from broker_worker.model.tiling import build_transform, tile_image
from broker_worker.protocol.errors import ErrorCode, JobError
from broker_worker.protocol.images import DEFAULT_LIMITS, ImageLimits, LruCache, content_key, decode_image
from broker_worker.protocol.messages import Job, Usage

TILE_CACHE_BYTES = 512 * 1024 * 1024
PixelStack = tuple[torch.Tensor, list[int]]


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


@dataclass
class Prepared:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor | None
    max_new_tokens: int
    #: The tokens of the text already sent (an earlier run's), as re-tokenized into ``input_ids``.
    prefix_tokens: int
    #: What the earlier runs are credited with: ``prefix_tokens``, but never so many that the job's usage could
    #: pass its ``max_new_tokens`` (their token ids are gone; text that does not round-trip, such as a U+FFFD
    #: from a character split across tokens, re-tokenizes into more tokens than were generated).
    earlier_tokens: int = 0

    def usage(self, generated: int) -> Usage:
        """Tokens of the request as the client sees it: text already sent by an earlier worker is completion."""
        return Usage(
            prompt_tokens=int(self.input_ids.shape[1]) - self.prefix_tokens,
            completion_tokens=self.earlier_tokens + generated,
        )


class InternVLEngine:
    def __init__(self, loaded: LoadedModel, model_name: str, image_limits: ImageLimits = DEFAULT_LIMITS) -> None:
        self.model_name = model_name
        self.device = loaded.device
        self.context_len = loaded.context_len
        self.loaded = loaded
        self._limits = image_limits
        self.encoder = PromptEncoder(loaded.tokenizer)
        self.skip_ids = control_token_ids(loaded.tokenizer)
        self.eos_ids = self._stop_ids(loaded)
        self._tiles: LruCache[torch.Tensor] = LruCache(TILE_CACHE_BYTES, tensor_bytes)
        self._stacks: LruCache[PixelStack] = LruCache(TILE_CACHE_BYTES, lambda s: tensor_bytes(s[0]))

    def generate(self, job: Job, answer_prefix: str, cancel: threading.Event, on_delta: OnDelta) -> Finish:
        return generate_with_stops(
            job, answer_prefix, cancel, on_delta, lambda flag, out: self._generate(job, answer_prefix, flag, out)
        )

    def _generate(self, job: Job, answer_prefix: str, cancel: threading.Event, on_delta: OnDelta) -> Finish:
        row = new_row(self, job, answer_prefix, cancel, on_delta)
        run_batch(self, [row])  # a single request is a batch of one
        return row.result()

    def count_tokens(self, job: Job) -> int:
        return int(self.prepare(job).input_ids.shape[1])

    def stop_ids(self, job: Job) -> frozenset[int]:
        """The model's end tokens and the job's own ``stop_token_ids``."""
        return self.eos_ids | frozenset(job.stop_token_ids)

    def prepare(self, job: Job, answer_prefix: str = "") -> Prepared:
        conversation = build_conversation(job.prompt, job.max_input_tiles)
        pixel_values, tiles_per_image = self.pixel_values(conversation)
        spans = conversation.spans(self.loaded.template, answer_prefix)
        image_tokens = [self.loaded.tokens_per_tile * tiles for tiles in tiles_per_image]
        input_ids = torch.tensor([self.encoder.encode(spans, image_tokens, self.loaded.context_len)])
        prefix_tokens = self.encoder.count(answer_prefix) if answer_prefix else 0
        room = self.loaded.context_len - int(input_ids.shape[1])
        max_new = max(1, min(job.max_new_tokens - prefix_tokens, room))
        earlier = min(prefix_tokens, job.max_new_tokens - max_new)  # = prefix_tokens unless it over-counts
        return Prepared(input_ids, torch.ones_like(input_ids), pixel_values, max_new, prefix_tokens, max(0, earlier))

    def pixel_values(self, conversation: Conversation) -> tuple[torch.Tensor | None, list[int]]:
        if not conversation.images:
            return None, []
        keys = tuple(zip(map(content_key, conversation.images), conversation.budgets, strict=True))

        def stack() -> PixelStack:
            pairs = zip(conversation.images, keys, strict=True)
            tiles = [self._tiles_for(b64, key, n) for n, (b64, key) in enumerate(pairs, start=1)]
            return (tiles[0] if len(tiles) == 1 else torch.cat(tiles)), [int(t.shape[0]) for t in tiles]

        # Chat clients resend every image each turn: the whole stack is cached too, not only each image.
        return self._stacks.get_or_make(keys, stack)

    def _tiles_for(self, b64: str, image_key: tuple[str, int], index: int) -> torch.Tensor:
        m = self.loaded
        budget = image_key[1]

        def make() -> torch.Tensor:
            image = decode_image(b64, index, self._limits)
            if not m.dynamic_image_size:
                return build_transform(m.image_size)(image).unsqueeze(0)
            return tile_image(image, max_num=budget, image_size=m.image_size, use_thumbnail=m.use_thumbnail)

        return self._tiles.get_or_make(image_key, make)

    def run_generate(
        self,
        job: Job,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None,
        max_new_tokens: int,
        streamer: BaseStreamer,
        stopping: StoppingCriteria,
    ) -> None:
        """``model.generate`` with the job's sampling settings (for one prompt or a left-padded batch)."""
        model = self.loaded.model
        kwargs: dict[str, Any] = {
            "input_ids": input_ids.to(model.device),
            "attention_mask": attention_mask.to(model.device),
            "max_new_tokens": max_new_tokens,
            "do_sample": job.temperature > 0,
            "num_beams": 1,
            "repetition_penalty": job.repetition_penalty,
            "eos_token_id": sorted(self.stop_ids(job)),
            "pad_token_id": self.pad_id(),
            "streamer": streamer,
            "stopping_criteria": StoppingCriteriaList([stopping]),
        }
        if job.temperature > 0:
            kwargs.update(temperature=job.temperature, top_p=job.top_p)
            if job.top_k is not None:  # None keeps the checkpoint's generation config; 0 turns top-k off
                kwargs["top_k"] = max(job.top_k, 0)
        if pixel_values is not None:
            kwargs["pixel_values"] = pixel_values.to(model.device, dtype=next(model.parameters()).dtype)
        try:
            with torch.inference_mode():
                model.generate(**kwargs)
        except torch.OutOfMemoryError as exc:
            torch.cuda.empty_cache()
            raise JobError(ErrorCode.CUDA_OUT_OF_MEMORY, f"CUDA out of memory: {exc}", retryable=True) from exc

    def pad_id(self) -> int:
        tok = self.loaded.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return int(pad) if pad is not None else 0

    @staticmethod
    def _stop_ids(loaded: LoadedModel) -> frozenset[int]:
        tok = loaded.tokenizer
        ids: set[int] = set()
        eos = getattr(loaded.model.generation_config, "eos_token_id", None)
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        vocab = tok.get_vocab()
        for token in (loaded.template.stop_token, "<|im_end|>", "<|end|>"):
            if token in vocab:
                ids.add(vocab[token])
        return frozenset(ids)
