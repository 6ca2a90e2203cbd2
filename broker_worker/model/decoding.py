"""Incremental detokenization: text deltas that never split a multi-byte character.

Decodes a small window of recent ids (from the last complete character on) instead of the whole
output each step. Only a trailing U+FFFD is held back: it may be the start of a character whose next bytes are
still to come, while an earlier U+FFFD is final (invalid bytes stay invalid). The window restarts only after a
complete character, so the joined deltas equal one full decode, and garbage bytes still stream.
Control tokens are dropped by id; grounding tokens (``<ref>``, ``<box>``...) are kept as text.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

CONTROL_TOKENS = (
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<video>",
    "<|end|>",
    "<|return|>",
    "<s>",
    "</s>",
    "<|user|>",
    "<|assistant|>",
    "<|system|>",
)


def control_token_ids(tokenizer: Any) -> frozenset[int]:
    vocab = tokenizer.get_vocab()
    return frozenset(vocab[t] for t in CONTROL_TOKENS if t in vocab)


class IncrementalDecoder:
    def __init__(self, tokenizer: Any, skip_ids: Collection[int]) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_ids
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._emitted = 0  # characters of the current window already released
        self.count = 0  # every id pushed, control tokens included (usage counts them)

    def push(self, token_id: int) -> str:
        self.count += 1
        if token_id in self._skip:
            return ""
        self._ids.append(token_id)
        text = self._decode(self._ids[self._prefix_offset :])
        if text.endswith("\ufffd"):
            return self._release(text[:-1])
        delta = self._release(text)
        self._prefix_offset, self._emitted = len(self._ids), 0
        return delta

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        delta = self._release(self._decode(self._ids[self._prefix_offset :]))
        self._prefix_offset, self._emitted = len(self._ids), 0
        return delta

    def _release(self, text: str) -> str:
        delta = text[self._emitted :]
        self._emitted = max(self._emitted, len(text))
        return delta

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        text: str = self._tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return text
